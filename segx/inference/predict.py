"""`predict_images`: label masks and overlays for any images, from a checkpoint alone.

`segx-predict ckpt=PATH input=<image, folder or glob> output=DIR [batch_size=16] [device=auto]`
writes `DIR/<name>.png` (a VOC-palette mask at the image's own size) and `DIR/overlays/<name>.jpg`.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from segx.core.errors import ConfigError, SegxError
from segx.data.cache import resize_image, resized_shape
from segx.data.voc_classes import VOC_PALETTE
from segx.inference.checkpoint import (
    CHECKPOINT_KEY,
    checkpoint_classes,
    checkpoint_path,
    load_checkpoint,
    network_from_checkpoint,
    run_config,
)
from segx.inference.evaluate import resolve_device, save_palette_png
from segx.inference.predictor import Predictor, TestTimeAugmentation
from segx.inference.sliding import InferenceMode, SlidingWindow

log = logging.getLogger(__name__)

#: What a folder input is filtered by (case-insensitive); a single file or a glob is taken as given.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
OVERLAY_ALPHA = 0.55  # weight of the class colour over the image, on pixels not predicted as background
# Upsampled logits are built a few classes at a time above this many floats, so a 24-megapixel photo
# needs ~0.4 GB instead of 2.2 GB (21 classes × H × W float32); the labels are identical either way.
_MAX_UPSAMPLED_ELEMENTS = 1 << 24
# PIL's errors for a file that is not a decodable image (UnidentifiedImageError and truncation are OSErrors).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class Predictions:
    """What `predict_images` wrote, and how it ran."""

    masks: list[Path]
    overlays: list[Path]
    output: Path
    device: str
    precision: str
    image_size: int
    seconds: float = 0.0
    inputs: list[Path] = field(default_factory=list)


def find_images(pattern: str | Path) -> list[Path]:
    """An image file, every image directly in a folder (by suffix), or every file a glob matches (`**` recurses)."""
    text = str(pattern)
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SegxError(
                f"input={text} is a folder with no image files in it (looked for {', '.join(IMAGE_SUFFIXES)}, "
                "not in subfolders). Point input at the folder that holds the images, or use a glob such as "
                f"input='{path}/**/*.jpg'."
            )
        return files
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise SegxError(
                f"input={text} matches no file. Check the pattern (quote it so the shell leaves it to segx) and "
                "that the folder exists; `**` matches subfolders."
            )
        return files
    raise SegxError(
        f"input={text} does not exist. Pass an image file, a folder of images, or a quoted glob such as "
        "input='photos/*.jpg'."
    )


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale as 8-bit greyscale: PIL's own convert clips them to 0..255 (a
    16-bit scan turns almost white). 16-bit values map 0..65535 → 0..255; I and F images by the range they use."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if image.mode == "I" and low >= 0 and high <= 255:
            scaled = values
        elif image.mode == "I" and low >= 0 and high <= 65535:
            scaled = values / 257.0
        elif image.mode == "F" and low >= 0 and high <= 1:
            scaled = values * 255.0
        else:
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.nan_to_num(scaled).clip(0, 255).round().astype(np.uint8), mode="L")


def load_rgb(path: Path) -> Image.Image:
    """The image as upright RGB (EXIF rotation applied); RGBA, greyscale (8- and 16-bit, integer and float) and
    palette images are converted."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # phones store sideways pixels and an orientation tag
        if image.mode.startswith("I") or image.mode == "F":
            image = _high_depth_to_8bit(image)
        return image.convert("RGB")


def _check_readable(path: Path) -> str | None:
    """Decode the whole file (a truncated JPEG opens fine and fails only here); the reason it failed, if so."""
    try:
        load_rgb(path)
    except _DECODE_ERRORS as error:
        return (str(error).splitlines() or [type(error).__name__])[0]
    return None


def network_input(image: Image.Image, size: int, resize: str = "square",
                  interpolation: str = "antialias") -> torch.Tensor:
    """uint8 [3,size,size], exactly as the training cache resized (segx.data.cache): bilinear (with antialiasing
    unless `interpolation=cv2`), stretched (`square`) or with its ratio kept and the rest padded (`keep_ratio`)."""
    return resize_image(TF.pil_to_tensor(image), size, resize, interpolation)


def labels_at_size(
    logits: torch.Tensor, height: int, width: int, max_elements: int = _MAX_UPSAMPLED_ELEMENTS,
) -> torch.Tensor:
    """Argmax of logits [C,h,w] upsampled (bilinear) to [height,width] (uint8 for up to 256 classes), a few
    classes at a time for big images."""
    classes = logits.shape[0]
    step = max(1, min(classes, max_elements // max(1, height * width)))
    label_dtype = torch.uint8 if classes <= 256 else torch.long
    best_value = best_label = None
    for start in range(0, classes, step):
        up = F.interpolate(logits[None, start:start + step].float(), size=(height, width), mode="bilinear",
                           align_corners=False)[0]
        label = up.argmax(0, keepdim=True)  # the first of tied classes, as one argmax over all would pick
        value = up.gather(0, label)[0]
        label = (label[0] + start).to(label_dtype)
        if best_value is None:
            best_value, best_label = value, label
        else:
            better = value > best_value  # strict: ties keep the earlier class
            best_value = torch.where(better, value, best_value)
            best_label = torch.where(better, label, best_label)
    return best_label


def overlay(image: Image.Image, labels: np.ndarray, palette: np.ndarray | None = None,
            background: int | None = 0) -> Image.Image:
    """The image | the image tinted with each pixel's class colour (the background class left untinted), side by
    side; `palette` uint8 [256, 3], VOC's by default."""
    colours = Image.fromarray((VOC_PALETTE if palette is None else palette)[labels])
    objects = Image.fromarray(np.where(labels != background, 255, 0).astype(np.uint8))
    tinted = Image.composite(Image.blend(image, colours, OVERLAY_ALPHA), image, objects)
    pair = Image.new("RGB", (2 * image.width, image.height))
    pair.paste(image, (0, 0))
    pair.paste(tinted, (image.width, 0))
    return pair


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for begin in range(0, len(items), size):
        yield items[begin:begin + size]


def _check_output(output: Path, files: list[Path]) -> None:
    if output.exists() and not output.is_dir():
        raise SegxError(f"output={output} exists and is a file; predictions go into a folder. Pass a folder path.")
    by_name: dict[str, Path] = {}
    inputs = {f.resolve() for f in files}
    for path in files:
        other = by_name.setdefault(path.stem, path)
        if other is not path:
            raise SegxError(
                f"Input images {other} and {path} would both be written to {output / (path.stem + '.png')}. "
                "Rename one of them or predict them in separate runs."
            )
        if (output / f"{path.stem}.png").resolve() in inputs:
            raise SegxError(
                f"output={output} would overwrite the input image {path} with its mask. Choose another output "
                "folder."
            )


def _check_images(files: list[Path]) -> None:
    workers = min(8, len(files))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decodes with the GIL released
        reasons = list(pool.map(_check_readable, files))
    bad = [f"{path} ({reason})" for path, reason in zip(files, reasons, strict=True) if reason is not None]
    if bad:
        raise SegxError(
            f"{len(bad)} of {len(files)} input file(s) are not readable images, so nothing was written: "
            f"{'; '.join(bad)}. Remove or replace them, or narrow input= to the images."
        )


def _progress_bar() -> Progress:
    return Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


def _labels(predictor: Predictor, slider: SlidingWindow | None, images: list[Image.Image], size: int,
            resize: str, interpolation: str = "antialias") -> Iterator[np.ndarray]:
    """Each image's label mask at its own size: by sliding windows over it, or from one batch of them resized."""
    if slider is not None:
        for image in images:
            yield slider.labels(TF.pil_to_tensor(image)).cpu().numpy().astype(np.uint8)
        return
    logits = predictor.logits(torch.stack([network_input(image, size, resize, interpolation) for image in images]))
    for image, image_logits in zip(images, logits, strict=True):
        covered_h, covered_w = resized_shape(image.height, image.width, size, resize)  # the padding aside
        yield labels_at_size(image_logits[:, :covered_h, :covered_w], image.height,
                             image.width).cpu().numpy().astype(np.uint8)


@torch.inference_mode()
def predict_images(
    ckpt: str | Path,
    inputs: str | Path,
    output: str | Path,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = False,
    tta: TestTimeAugmentation | None = None,
    inference: InferenceMode | None = None,
    precision: str = "auto",
) -> Predictions:
    """Masks for every image `inputs` names (file, folder or glob); nothing is written unless all are readable.

    Each image is seen as in training (resized to the run's `data.image_size`, its mean/std) and its
    logits are upsampled to the image's own size, so masks line up with the originals; with
    `inference.mode=slide` it is predicted at its own size in overlapping windows instead.
    """
    start = time.perf_counter()
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1.")
    ckpt = checkpoint_path(ckpt)  # a file, or an MLflow models:/ or runs:/ URI
    checkpoint = load_checkpoint(ckpt)
    files = find_images(inputs)
    out_dir = Path(output).expanduser()
    _check_output(out_dir, files)
    _check_images(files)

    config = run_config(checkpoint)
    _, palette = checkpoint_classes(checkpoint)  # the dataset's colours, stored with the weights
    background = checkpoint[CHECKPOINT_KEY].get("background_index", 0)
    size = int(config.data.image_size)
    resize = str(config.data.get("resize", "square"))
    interpolation = str(config.data.get("interpolation", "antialias"))
    target = resolve_device(device)
    predictor = Predictor.from_run(network_from_checkpoint(checkpoint), config, target, int(batch_size), tta=tta,
                                   precision=precision)
    inference = inference or InferenceMode()
    slider = SlidingWindow(predictor, *inference.window(size)) if inference.sliding else None

    overlay_dir = out_dir / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    masks: list[Path] = []
    overlays: list[Path] = []
    bar = _progress_bar() if progress and len(files) > 1 else None
    task = bar.add_task("predict", total=len(files)) if bar is not None else None
    with bar if bar is not None else contextlib.nullcontext():
        for group in _batches(files, int(batch_size)):
            images = []
            for path in group:
                try:
                    images.append(load_rgb(path))
                except _DECODE_ERRORS as error:  # changed on disk since it was checked
                    raise SegxError(f"Input image {path} can no longer be read ({error}).") from error
            labelled = _labels(predictor, slider, images, size, resize, interpolation)
            for path, image, labels in zip(group, images, labelled, strict=True):
                mask_path, overlay_path = out_dir / f"{path.stem}.png", overlay_dir / f"{path.stem}.jpg"
                save_palette_png(labels, mask_path, palette)
                overlay(image, labels, palette, background).save(overlay_path, quality=90)
                masks.append(mask_path)
                overlays.append(overlay_path)
            if bar is not None:
                bar.advance(task, len(group))
    log.debug("Predicted %d images on %s (%s)", len(files), target, predictor.precision)
    return Predictions(masks, overlays, out_dir, str(target), predictor.precision, size, time.perf_counter() - start,
                       files)
