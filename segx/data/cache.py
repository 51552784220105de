"""Cached tensor store: decode a VOC split once, keep it as uint8 tensors at the training size.

Decoding ~1,500 JPEGs and palette PNGs takes minutes on a small machine and is identical for every
run of a sweep, so it is done once per (split, size, file list) and written atomically under a file
lock: parallel sweep jobs build it once, and a build killed half-way leaves only a temp file behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from filelock import FileLock
from PIL import Image

from segx.errors import SegxError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass
class CachedSplit:
    """One split at one size: `images` uint8 [N,3,S,S], `masks` uint8 [N,S,S] (255 = ignore)."""

    split: str
    image_size: int
    ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    original_sizes: torch.Tensor  # int32 [N,2] (height, width) of the source files, for full-res scoring

    def __len__(self) -> int:
        return len(self.ids)


def fingerprint(image_files: list[str], mask_files: list[str]) -> str:
    """Names, byte sizes and modification times of every file: any change to the split list or to a
    file gives a new cache (a copied tree without preserved mtimes is decoded once more, never misread)."""
    digest = hashlib.sha1()
    for path in [*image_files, *mask_files]:
        stat = os.stat(path)
        digest.update(f"{os.path.basename(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def decode_pair(image_file: str, mask_file: str, size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Images are resized bilinear with antialiasing, masks with nearest neighbour so labels stay labels."""
    with Image.open(image_file) as img:
        image = TF.pil_to_tensor(img.convert("RGB"))
    with Image.open(mask_file) as msk:
        if msk.mode not in ("P", "L"):
            raise SegxError(
                f"Mask {mask_file} has PIL mode {msk.mode!r}; VOC masks are palette ('P') PNGs holding class "
                "indices 0..20 and 255. Convert it to a palette or greyscale index image."
            )
        mask = torch.from_numpy(np.array(msk, dtype=np.uint8))[None]
    if image.shape[-2:] != mask.shape[-2:]:
        raise SegxError(
            f"Image {image_file} is {tuple(image.shape[-2:])} but its mask {mask_file} is "
            f"{tuple(mask.shape[-2:])}; each mask must have its image's height and width."
        )
    original = (int(image.shape[-2]), int(image.shape[-1]))
    image = TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask, [size, size], interpolation=TF.InterpolationMode.NEAREST_EXACT)
    return image, mask[0], original


def _atomic_save(obj: object, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build(
    split: str, ids: list[str], image_files: list[str], mask_files: list[str], size: int,
    progress: Callable[[int, int], None] | None,
) -> CachedSplit:
    n = len(ids)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    masks = torch.empty((n, size, size), dtype=torch.uint8)
    original = torch.empty((n, 2), dtype=torch.int32)
    # PIL decodes and resizes with the GIL released, so threads use every core without pickling tensors.
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda pair: decode_pair(pair[0], pair[1], size), zip(image_files, mask_files, strict=True))
        for i, (image, mask, hw) in enumerate(results):
            images[i], masks[i], original[i] = image, mask, torch.tensor(hw)
            if progress is not None:
                progress(i + 1, n)
    return CachedSplit(split, size, list(ids), images, masks, original)


def load_or_build(
    cache_dir: Path, split: str, ids: list[str], image_files: list[str], mask_files: list[str], size: int,
) -> CachedSplit:
    """Return the cached split, building it first if no cache matches this file list and size."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{split}-{size}px-{fingerprint(image_files, mask_files)}.pt"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if blob.get("format") == CACHE_FORMAT and blob["ids"] == list(ids):
                    return CachedSplit(split, size, blob["ids"], blob["images"], blob["masks"], blob["original_sizes"])
            except Exception as error:  # an unreadable cache is rebuilt, never trusted
                log.warning("Cache %s is unreadable (%s); rebuilding it.", path, error)
        start = last_report = time.perf_counter()

        def progress(done: int, total: int) -> None:
            nonlocal last_report
            now = time.perf_counter()
            if done == total or now - last_report > 5:
                last_report = now
                log.info("Caching %s split at %dpx: %d/%d images (%.0fs)", split, size, done, total, now - start)

        log.info("Building the %s cache at %dpx from %d images into %s", split, size, len(ids), path)
        cached = _build(split, ids, image_files, mask_files, size, progress)
        blob = {
            "format": CACHE_FORMAT, "ids": cached.ids, "images": cached.images, "masks": cached.masks,
            "original_sizes": cached.original_sizes,
        }
        _atomic_save(blob, path)
        log.info("Cached %d %s images in %.1fs", len(ids), split, time.perf_counter() - start)
        return cached
