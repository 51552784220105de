"""The embedded `shapes` dataset: coloured shapes written as a Pascal VOC 2012 tree.

The demo and the test suite need segmentation data that exists on a machine with no internet, costs a
few seconds to make, and is learnable by a small U-Net in a few epochs. Writing it in the exact VOC
layout (JPEG images, palette PNG masks with 255 "void" borders, split files) means everything after
generation - torchvision's reader, the tensor cache, full-resolution scoring - runs the same code a
real VOC run does, so the tests exercise the real path rather than a mock.
"""

from __future__ import annotations

import colorsys
import json
import operator
import os
import shutil
import time
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw

from segx.core.errors import ConfigError, DataRootTakenError
from segx.data.source import IGNORE_INDEX
from segx.data.voc_classes import NUM_CLASSES, VOC_PALETTE

# Bump whenever the drawing changes, so trees written by an older version are regenerated, not reused.
FORMAT_VERSION = 2  # 2: every class in every split of 10+ images (two cycled classes per image)
MARKER_NAME = "segx-shapes.json"
LOCK_NAME = "segx-shapes.lock"
TMP_PREFIX = ".VOC2012.segx-tmp-"  # a build in progress (or killed half-way); lives beside VOC2012
OLD_PREFIX = ".VOC2012.segx-old-"  # a replaced tree waiting to be deleted
JPEG_QUALITY = 90
SPLIT_CODES = {"train": 0, "val": 1}  # seeds the per-image generators, so train and val are independent
SHAPE_KINDS = ("ellipse", "rectangle", "triangle", "diamond")


def _class_colours() -> np.ndarray:
    """A fixed, saturated colour per foreground class (row 0 unused).

    Classes 1-10 are bright, 11-20 dark, each set on ten hues 36 degrees apart (the dark set offset by
    18 degrees), so any two classes differ clearly in hue or brightness - by far more than JPEG's chroma
    blur moves an interior - and even the dark ones are much more saturated than the grey backgrounds.
    Consecutive classes step 7/10 of the way round the wheel, so classes that often co-occur in one
    image are never near-neighbours; class c and c + 10 also get different shapes (c % 4 differs by 2).
    """
    colours = np.zeros((NUM_CLASSES, 3), dtype=np.float32)
    for cls in range(1, NUM_CLASSES):
        k = cls - 1
        bright = k < 10
        hue = ((k * 7) % 10 + (0.0 if bright else 0.5)) / 10.0
        colours[cls] = np.array(colorsys.hsv_to_rgb(hue, 0.9, 0.95 if bright else 0.55)) * 255.0
    return colours


CLASS_COLOURS = _class_colours()


def shape_kind(cls: int) -> str:
    """Shape drawn for a class: fixed, so shape is a second cue besides colour."""
    return SHAPE_KINDS[cls % len(SHAPE_KINDS)]


def _check_count(name: str, value: object, minimum: int, fix: str) -> int:
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}; {fix}.") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {number}; {fix}.")
    return number


_TOO_SMALL = "images under 16 px leave no room for shapes with an interior"


def check_shapes_options(num_train: object, num_val: object, seed: object, min_size: object, max_size: object,
                         names: dict[str, str] | None = None) -> dict:
    """The generator's arguments as ints, or a ConfigError naming the bad one (as `names` calls it: the data
    module's `data.shapes_seed` is the generator's `seed`)."""
    names = names or {}

    def count(key: str, value: object, minimum: int, fix: str) -> int:
        return _check_count(names.get(key, key), value, minimum, fix)

    params = {
        "num_train": count("num_train", num_train, 1, "ask for at least one training image"),
        "num_val": count("num_val", num_val, 1, "ask for at least one validation image"),
        "seed": count("seed", seed, 0, "use a non-negative integer seed"),
        "min_size": count("min_size", min_size, 16, _TOO_SMALL),
        "max_size": count("max_size", max_size, 16, _TOO_SMALL),
    }
    if params["min_size"] > params["max_size"]:
        raise ConfigError(
            f"{names.get('min_size', 'min_size')} ({params['min_size']}) is larger than "
            f"{names.get('max_size', 'max_size')} ({params['max_size']}); set min_size <= max_size."
        )
    return params


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth, low-saturation gradient: varied enough that "not grey" is what marks an object,
    never a single background colour the network could memorise."""
    grey = rng.uniform(70, 190, size=(2, 2, 1))
    tint = rng.uniform(-14, 14, size=(2, 2, 3))
    corners = (grey + tint).astype(np.float32)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top = corners[0, 0] * (1 - xs) + corners[0, 1] * xs
    bottom = corners[1, 0] * (1 - xs) + corners[1, 1] * xs
    return top * (1 - ys) + bottom * ys


def _place(
    rng: np.random.Generator, height: int, width: int, boxes: list[tuple[int, int, int, int]]
) -> tuple[int, int, int, int]:
    """A random box 20-50 % of each image side, preferring spots that barely overlap earlier shapes
    (partial overlap is allowed and kept: it teaches occlusion, with the later shape winning)."""
    best: tuple[int, int, int, int] | None = None
    best_overlap = np.inf
    for _ in range(10):
        bw = int(rng.integers(max(8, int(0.2 * width)), max(8, int(0.5 * width)) + 1))
        bh = int(rng.integers(max(8, int(0.2 * height)), max(8, int(0.5 * height)) + 1))
        x0 = int(rng.integers(0, width - bw + 1))
        y0 = int(rng.integers(0, height - bh + 1))
        box = (x0, y0, x0 + bw - 1, y0 + bh - 1)
        overlap = 0.0
        for ox0, oy0, ox1, oy1 in boxes:
            iw = min(box[2], ox1) - max(box[0], ox0) + 1
            ih = min(box[3], oy1) - max(box[1], oy0) + 1
            if iw > 0 and ih > 0:
                smaller = min(bw * bh, (ox1 - ox0 + 1) * (oy1 - oy0 + 1))
                overlap = max(overlap, iw * ih / smaller)
        if overlap < best_overlap:
            best, best_overlap = box, overlap
        if overlap <= 0.25:
            break
    assert best is not None
    return best


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: int) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if kind == "ellipse":
        draw.ellipse(box, fill=fill)
    elif kind == "rectangle":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _void_borders(labels: np.ndarray) -> np.ndarray:
    """Where VOC puts 255: a band one pixel either side of every edge between two different labels
    (object/background and object/object), so boundary pixels whose class annotators could not agree
    on are ignored by the loss and the metrics, as on the real data."""
    void = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    void[:, 1:] |= horizontal
    void[:, :-1] |= horizontal
    vertical = labels[1:, :] != labels[:-1, :]
    void[1:, :] |= vertical
    void[:-1, :] |= vertical
    return void


CYCLED_PER_IMAGE = 2
MIN_IMAGES_FOR_ALL_CLASSES = -(-(NUM_CLASSES - 1) // CYCLED_PER_IMAGE)  # 10


def cycled_classes(seed: int, split: str, index: int) -> list[int]:
    """The two classes image `index` is guaranteed to show, drawn on top of any other shape.

    Images 0-9 of a split walk through a shuffled list of the 20 classes two at a time, as do images
    10-19 (shuffled afresh, so pairs vary), and so on: any split of MIN_IMAGES_FOR_ALL_CLASSES images or
    more holds every class (a val split without a class would score it as absent in `make demo`). A
    pure function of its arguments, like `render_sample`. Tiny images (under ~24 px) may rarely hide a
    cycled shape under the other one."""
    per_round = MIN_IMAGES_FOR_ALL_CLASSES
    order = np.random.default_rng([seed, SPLIT_CODES[split], index // per_round, 0xC1A55]).permutation(
        np.arange(1, NUM_CLASSES))
    start = (index % per_round) * CYCLED_PER_IMAGE
    return [int(c) for c in order[start:start + CYCLED_PER_IMAGE]]


def render_sample(
    seed: int, split: str, index: int, min_size: int, max_size: int
) -> tuple[Image.Image, Image.Image]:
    """One (RGB image, palette mask) pair, a pure function of its arguments.

    The image is coloured *from* the drawn label map, so image and mask agree to the pixel; the
    generator is seeded by (seed, split, index), so a split's content does not depend on the other
    split's size or on generation order.
    """
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    width = int(rng.integers(min_size, max_size + 1))
    height = int(rng.integers(min_size, max_size + 1))
    cycled = cycled_classes(seed, split, index)
    others = np.setdiff1d(np.arange(1, NUM_CLASSES), cycled)
    extra = rng.choice(others, size=int(rng.integers(0, 2)), replace=False)
    classes = [*extra.tolist(), *cycled]  # the cycled classes are drawn last, on top of the extra one

    label_image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(label_image)
    boxes: list[tuple[int, int, int, int]] = []
    for cls in classes:
        box = _place(rng, height, width, boxes)
        boxes.append(box)
        _draw_shape(draw, shape_kind(int(cls)), box, int(cls))
    labels = np.asarray(label_image, dtype=np.uint8)

    pixels = _background(rng, height, width)
    for cls in classes:
        # a small per-object shift in colour: the class stays recognisable, but not by an exact RGB value
        colour = CLASS_COLOURS[cls] + rng.uniform(-8, 8, size=3).astype(np.float32)
        pixels[labels == cls] = colour
    pixels += rng.normal(0.0, 5.0, size=pixels.shape).astype(np.float32)
    rgb = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    mask = labels.copy()
    mask[_void_borders(labels)] = IGNORE_INDEX
    mask_image = Image.frombytes("P", (width, height), mask.tobytes())
    mask_image.putpalette(VOC_PALETTE.tobytes())
    return Image.frombytes("RGB", (width, height), rgb.tobytes()), mask_image


def _split_ids(split: str, count: int) -> list[str]:
    return [f"shapes_{split}_{i:06d}" for i in range(count)]


def _build_tree(target: Path, params: dict) -> None:
    """Write every file of the tree under `target` (a fresh temp dir), the marker last."""
    images_dir = target / "JPEGImages"
    masks_dir = target / "SegmentationClass"
    lists_dir = target / "ImageSets" / "Segmentation"
    for folder in (images_dir, masks_dir, lists_dir):
        folder.mkdir(parents=True)
    all_ids: list[str] = []
    for split, count in (("train", params["num_train"]), ("val", params["num_val"])):
        ids = _split_ids(split, count)
        for index, sample_id in enumerate(ids):
            image, mask = render_sample(params["seed"], split, index, params["min_size"], params["max_size"])
            image.save(images_dir / f"{sample_id}.jpg", format="JPEG", quality=JPEG_QUALITY)
            mask.save(masks_dir / f"{sample_id}.png", format="PNG")
        (lists_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        all_ids.extend(ids)
    (lists_dir / "trainval.txt").write_text("".join(f"{i}\n" for i in all_ids))
    (target / MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def _read_marker(voc_dir: Path) -> dict | None:
    """The parameters a tree was written with; None when it has no marker (not ours). A marker that
    cannot be parsed is still ours (the name is), so it reads as 'different parameters' and the tree is
    regenerated rather than refused."""
    marker = voc_dir / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _refuse_foreign(voc_dir: Path) -> None:
    raise DataRootTakenError(
        f"{voc_dir} already exists and was not written by the shapes generator (it has no {MARKER_NAME} "
        "marker), so it is probably a real Pascal VOC 2012 copy or other data; refusing to overwrite it. "
        "Choose another data.root for data=shapes (for example data/shapes), or use data=voc to train on "
        "what that folder holds."
    )


def _remove_leftovers(devkit: Path) -> None:
    """Temp trees of killed builds and replaced trees whose deletion was interrupted; only called under
    the lock, when no other generator can be using them."""
    for path in devkit.iterdir():
        if path.is_dir() and path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def write_shapes_dataset(
    root: str | Path,
    num_train: int = 200,
    num_val: int = 50,
    seed: int = 0,
    min_size: int = 96,
    max_size: int = 160,
) -> Path:
    """Make sure `root/VOCdevkit/VOC2012` holds the shapes tree for these parameters; returns that folder.

    Every sweep job calls this at start-up, so a matching tree costs one small JSON read. Otherwise the
    tree is built under a file lock (parallel jobs build it once) in a temp folder beside VOC2012 and
    renamed into place whole: the marker is written inside it last, so a tree with a marker is always
    complete, and a killed build leaves only a hidden temp folder the next build removes. Images are
    `num_train` + `num_val` JPEGs with sides drawn from [min_size, max_size]; identical arguments give
    byte-identical files.

    Raises ValueError for unusable arguments, and FileExistsError when VOC2012 exists without our
    marker: that is someone's real data, which must never be replaced.
    """
    params = {"version": FORMAT_VERSION, **check_shapes_options(num_train, num_val, seed, min_size, max_size)}
    root = Path(root)
    devkit = root / "VOCdevkit"
    voc_dir = devkit / "VOC2012"
    if voc_dir.is_dir() and _read_marker(voc_dir) == params:
        return voc_dir

    devkit.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / LOCK_NAME)):
        if voc_dir.exists():
            existing = _read_marker(voc_dir)
            if existing is None:
                _refuse_foreign(voc_dir)
            if existing == params:
                return voc_dir  # another process built it while we waited for the lock
        _remove_leftovers(devkit)
        stamp = f"{os.getpid()}-{time.time_ns()}"
        tmp_dir = devkit / f"{TMP_PREFIX}{stamp}"
        tmp_dir.mkdir()
        try:
            _build_tree(tmp_dir, params)
            if voc_dir.exists():
                # Move the stale tree aside first: if we die between the renames, VOC2012 is simply
                # missing and the next call regenerates, never a mix of old and new files.
                old_dir = devkit / f"{OLD_PREFIX}{stamp}"
                os.replace(voc_dir, old_dir)
                os.replace(tmp_dir, voc_dir)
                shutil.rmtree(old_dir, ignore_errors=True)
            else:
                os.replace(tmp_dir, voc_dir)
        finally:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir, ignore_errors=True)
    return voc_dir
