"""Folder datasets made on the fly for the tests: images of mixed sizes with index or RGB masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

RGB_COLOURS = [[0, 0, 0], [200, 30, 30], [30, 30, 200]]  # background, square, disc


def draw_sample(rng: np.random.Generator, height: int, width: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its class-index mask: a background and up to three filled shapes of other classes,
    each class drawn in its own colour so a network can learn them."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(3):
        label = int(rng.integers(1, num_classes))
        top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        mask[top:top + height // 3, left:left + width // 3] = label
    colours = np.stack([(37 * np.arange(256)) % 256, (91 * np.arange(256)) % 256, (53 * np.arange(256)) % 256], 1)
    image = colours[mask].astype(np.uint8)
    noise = rng.integers(0, 20, size=image.shape, dtype=np.uint8)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8), mask


def write_folder_dataset(root: Path, num_classes: int = 3, rgb_masks: bool = False, zero_is_other: bool = False,
                         counts: dict[str, int] | None = None, sizes: tuple[tuple[int, int], ...] = ((40, 56), (48, 48),
                                                                                                   (64, 40)),
                         seed: int = 0) -> Path:
    """images/<split>/<id>.jpg and annotations/<split>/<id>.png under `root`, image sizes cycling through `sizes`.

    rgb_masks: masks are colour images in RGB_COLOURS; zero_is_other: masks store class c as c + 1 and 0 for
    unlabelled pixels (ADE20K's convention, read back with reduce_zero_label)."""
    rng = np.random.default_rng(seed)
    for split, count in (counts or {"train": 12, "val": 6}).items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            height, width = sizes[index % len(sizes)]
            image, mask = draw_sample(rng, height, width, num_classes)
            name = f"{split}_{index:03d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=95)
            if rgb_masks:
                Image.fromarray(np.asarray(RGB_COLOURS, dtype=np.uint8)[mask]).save(
                    root / "annotations" / split / f"{name}.png")
            else:
                stored = mask + 1 if zero_is_other else mask
                if zero_is_other:
                    stored[: height // 8] = 0  # a band of "other": ignored after reduce_zero_label
                Image.fromarray(stored.astype(np.uint8), mode="L").save(root / "annotations" / split / f"{name}.png")
    return root


def write_binary_dataset(root: Path, count: int = 16, size: int = 40, seed: int = 0) -> Path:
    """An electron-microscopy-like set in its authors' convention: greyscale masks of 0 (membrane) and 255 (cell),
    a train split only (no val), ids in sub-folders (`stack_a/00`), classes.txt naming the two classes."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        stack = "stack_a" if index % 2 else "stack_b"
        mask = np.full((size, size), 255, dtype=np.uint8)
        for line in rng.integers(2, size - 2, size=3):  # membranes: thin dark lines between cells
            mask[int(line):int(line) + 2, :] = 0
            mask[:, int(line):int(line) + 2] = 0
        image = np.where(mask[..., None] == 0, 40, 200).astype(np.uint8).repeat(3, axis=2)
        image = np.clip(image.astype(np.int16) + rng.integers(0, 20, size=image.shape), 0, 255).astype(np.uint8)
        for folder, array, suffix in (("images", image, ".png"), ("annotations", mask, ".png")):
            path = root / folder / "train" / stack / f"{index:02d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
    (root / "classes.txt").write_text("membrane\ncell\n")
    return root


def save_palette_mask(path: Path, labels: np.ndarray, colours: list[list[int]], order: list[int]) -> None:
    """Class ids `labels` drawn in `colours`, saved as a palette PNG whose index i holds class order[i]'s colour: the
    per-file palette order of tools that number colours as they meet them."""
    index_of = np.zeros(len(colours), dtype=np.uint8)
    for index, cls in enumerate(order):
        index_of[cls] = index
    image = Image.fromarray(index_of[labels], mode="P")
    image.putpalette([c for cls in order for c in colours[cls]])
    image.save(path)
