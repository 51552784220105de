"""`evaluate_checkpoint`: score a trained network on a split, at training size or full resolution (whole images
resized to the training size, or sliding windows at each image's own size)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from segx.core.errors import ConfigError
from segx.data.cache import resized_shape
from segx.data.voc_classes import VOC_PALETTE
from segx.inference.checkpoint import checkpoint_path, load_checkpoint, network_from_checkpoint, run_config
from segx.inference.predictor import Predictor, TestTimeAugmentation
from segx.inference.sliding import InferenceMode, SlidingWindow
from segx.metrics import confusion_matrix_metric, segmentation_scores
from segx.models.contract import check_input_size

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` means the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"device={device!r} is not a device name; use auto, cpu, cuda or cuda:<index>.") from error
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for but this machine has no CUDA GPU; use device=cpu or auto.")
    return target


def save_palette_png(labels: np.ndarray, path: Path, palette: np.ndarray | None = None) -> None:
    """A label map as a palette PNG (the format VOC's own masks use), in `palette`'s colours (default VOC's)."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette((VOC_PALETTE if palette is None else palette).flatten().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)  # ids may hold sub-folders (Cityscapes' cities)
    image.save(path)


def prediction_path(pred_dir: Path, image_id: str) -> Path:
    """Where an image's predicted mask goes: `<pred_dir>/<id>.png`, sub-folders of the id kept, never outside
    `pred_dir` (an id from a list of absolute paths loses its root, and `..` its climb)."""
    parts = [part for part in Path(image_id).parts if part not in ("..", ".", Path(image_id).anchor)]
    return pred_dir.joinpath(*parts).with_name(f"{parts[-1]}.png") if parts else pred_dir / "_.png"


def window_scale(original_sizes: torch.Tensor, image_size: int, resize: str) -> float:
    """How much larger objects look to sliding windows over the images at their own size than they did in training
    (each image resized to `image_size`): the median over the split of sqrt(height ratio × width ratio)."""
    ratios = []
    for height, width in original_sizes.tolist():
        covered_h, covered_w = resized_shape(int(height), int(width), image_size, resize)
        ratios.append((height / covered_h * width / covered_w) ** 0.5)
    return float(np.median(ratios)) if ratios else 1.0


def _say_what_differs_from_training(net: torch.nn.Module, config: Any, data_cfg: Any) -> None:
    """An image size the network cannot take is refused; another size than training's, or a generated dataset
    that does not exist yet, is scored as asked, with a warning saying so."""
    trained, asked = int(config.data.image_size), int(data_cfg.image_size)
    if asked != trained:
        check_input_size(net, asked, f"the checkpoint's {config.model._target_}")
        log.warning("Scoring at data.image_size=%d while the network trained at %d: these scores are not comparable "
                    "with the val/* of its training.", asked, trained)
    generated = str(data_cfg.get("_target_", "")).endswith("ShapesDataModule")
    if generated and data_cfg.get("root") and not Path(str(data_cfg.root)).expanduser().exists():
        log.warning("data.root=%s does not exist: the shapes dataset is generated there anew from its settings "
                    "(shapes_seed %s), the images training saw only if those settings are the training run's.",
                    data_cfg.root, data_cfg.get("shapes_seed"))


@torch.inference_mode()
def evaluate_checkpoint(
    ckpt: str | Path,
    split: str = "val",
    data_overrides: Mapping[str, Any] | None = None,
    full_res: bool = False,
    save_predictions: bool = False,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    tta: TestTimeAugmentation | None = None,
    inference: InferenceMode | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Returns segx.metrics.segmentation_scores' scores (`miou`, `mdice`, `macc`, ..., per class), `n_images`,
    `seconds`.

    At training size the score matches what training logged as `val/*`. With `full_res` the logits
    are upsampled (bilinear) to each image's original size and scored against the original mask —
    the standard VOC protocol, and the number to compare with published results. `inference.mode=slide`
    predicts each image at its own size in windows, and so always scores at full resolution.
    """
    start = time.perf_counter()
    ckpt = checkpoint_path(ckpt)  # a file, or an MLflow models:/ or runs:/ URI
    checkpoint = load_checkpoint(ckpt)
    config = run_config(checkpoint)
    overrides = {k: v for k, v in dict(data_overrides or {}).items() if v is not None}
    data_cfg = OmegaConf.merge(config.data, overrides)
    net = network_from_checkpoint(checkpoint)
    _say_what_differs_from_training(net, config, data_cfg)
    target = resolve_device(device)
    tta = tta or TestTimeAugmentation()
    predictor = Predictor.from_run(net, config, target, int(batch_size), tta=tta, precision=precision)
    inference = inference or InferenceMode()
    slider = SlidingWindow(predictor, *inference.window(int(config.data.image_size))) if inference.sliding else None
    datamodule = instantiate(data_cfg)
    cached = datamodule.load_split(split)
    confmat = confusion_matrix_metric(datamodule.num_classes, datamodule.ignore_index).to(target)
    pred_dir = Path(out_dir or ".") / "predictions"
    if save_predictions:
        pred_dir.mkdir(parents=True, exist_ok=True)

    def score(index: int, pred: torch.Tensor, mask: torch.Tensor) -> None:
        confmat.update(pred, mask.to(target).long())
        if save_predictions:
            save_palette_png(pred[0].cpu().numpy(), prediction_path(pred_dir, cached.ids[index]), datamodule.palette)

    scale = None
    if slider is not None:
        scale = window_scale(cached.original_sizes, datamodule.image_size, datamodule.resize)
        if not 0.8 <= scale <= 1.25:
            log.warning("inference.mode=slide predicts each image at its own size, where objects are %.2f× the size "
                        "this network saw in training (data.image_size=%d, data.resize=%s; median over the split). "
                        "Its scores will suffer; inference.mode=whole predicts at the training scale.", scale,
                        datamodule.image_size, datamodule.resize)
        if not full_res:
            log.info("inference.mode=slide predicts each image at its own size, so it is scored at full resolution.")
        full_res = True
        _, image_files, mask_files = datamodule.split_files(split)
        for index, (image_file, mask_file) in enumerate(zip(image_files, mask_files, strict=True)):
            pred = slider.labels(datamodule.read_image(image_file)).long()[None]
            score(index, pred, torch.from_numpy(datamodule.read_mask(mask_file))[None])
            log.debug("Evaluated %d/%d images", index + 1, len(image_files))
    else:
        mask_files = datamodule.split_files(split)[2] if full_res else []
        for begin, logits in predictor.batches(cached.images):
            end = begin + len(logits)
            if not full_res:
                preds = logits.argmax(1)
                confmat.update(preds, cached.masks[begin:end].to(target).long())
                if save_predictions:
                    for i, pred in enumerate(preds.cpu().numpy()):
                        save_palette_png(pred, prediction_path(pred_dir, cached.ids[begin + i]), datamodule.palette)
                continue
            for i in range(end - begin):
                height, width = (int(v) for v in cached.original_sizes[begin + i])
                # keep_ratio: only the top-left part of the logits saw the image, the rest its padding
                covered_h, covered_w = resized_shape(height, width, datamodule.image_size, datamodule.resize)
                full = F.interpolate(logits[i:i + 1, :, :covered_h, :covered_w].float(), size=(height, width),
                                     mode="bilinear", align_corners=False)
                score(begin + i, full.argmax(1), torch.from_numpy(datamodule.read_mask(mask_files[begin + i]))[None])
            log.debug("Evaluated %d/%d images", end, len(cached))

    counts = confmat.compute().cpu()
    scores = segmentation_scores(counts, datamodule.class_names, datamodule.background_index,
                                 float(config.get("fscore_beta", 1.0)))
    return {
        **scores,
        "confusion_matrix": counts.long().tolist(),  # rows: ground truth, columns: prediction
        "class_names": list(datamodule.class_names),
        "n_images": len(cached),
        "seconds": time.perf_counter() - start,
        "checkpoint": str(Path(ckpt).resolve()),
        "split": split,
        "full_res": bool(full_res),
        "image_size": datamodule.image_size,
        "tta": tta.label or "none",  # scores made with test-time augmentation are labelled so
        **({"tta_scales": list(tta.scales)} if tta.mode == "ms_flip" else {}),
        "inference": ({"mode": "slide", "crop": slider.crop, "stride": slider.stride, "scale_ratio": scale}
                      if slider is not None else {"mode": "whole"}),
        "precision": predictor.precision,  # the precision the network predicted in
        "device": str(target),
    }
