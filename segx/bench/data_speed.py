"""`data_speedup`: one epoch through segx's data path against the path a user would write with torchvision.

Both read the same VOC-layout tree at its own image sizes (real VOC with `--data-root`, else shapes
generated at VOC's ~500 × 375) and hand the training loop batches of the same size on the same device.
segx: the cached uint8 split (built once, timed separately), resident on the device, flipped and
normalised there. The user's path: `VOCSegmentation` + PIL resize + to-tensor in a DataLoader with one
worker per CPU core, then `.to(device)`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import VOCSegmentation

from segx.bench.peak import synchronize
from segx.data import CachedSegmentationDataModule, VOCDataModule
from segx.data.shapes import write_shapes_dataset

VOC_MIN_SIDE, VOC_MAX_SIDE = 375, 500  # most VOC photos are 500 × 375 or 375 × 500


def voc_sized_tree(root: Path, num_train: int, num_val: int) -> Path:
    """A shapes tree in the VOC layout at VOC's image sizes (reused when it already matches)."""
    write_shapes_dataset(root, num_train=num_train, num_val=num_val, seed=0, min_size=VOC_MIN_SIDE,
                         max_size=VOC_MAX_SIDE)
    return root


class UserTransform:
    """What a user writes for VOCSegmentation: PIL resize of image (bilinear) and mask (nearest), to tensors."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.resize((self.size, self.size), Image.BILINEAR)
        mask = mask.resize((self.size, self.size), Image.NEAREST)
        return TF.to_tensor(image), torch.as_tensor(np.array(mask), dtype=torch.long)


def torchvision_epoch(root: Path, size: int, batch_size: int, device: torch.device, workers: int) -> tuple[float, int]:
    """Seconds for one shuffled epoch (worker start-up included, as every epoch pays it) and the image count."""
    dataset = VOCSegmentation(str(root), year="2012", image_set="train", transforms=UserTransform(size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda")
    start = time.perf_counter()
    for images, masks in loader:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
    synchronize(device)
    return time.perf_counter() - start, len(dataset)


def segx_epoch(datamodule: CachedSegmentationDataModule) -> float:
    """Seconds for one epoch of training batches: drawn, flipped and normalised on the device."""
    start = time.perf_counter()
    for batch in datamodule.train_dataloader():
        datamodule.prepare_batch(batch, training=True)
    synchronize(datamodule._device())
    return time.perf_counter() - start


def data_speedup(root: Path, size: int, batch_size: int, device: torch.device, epochs: int = 3,
                 workers: int | None = None) -> dict[str, Any]:
    """images/s of segx's path ÷ images/s of the torchvision path: segx's the median of 5 × `epochs` epochs
    (each takes milliseconds) after one untimed epoch that moves the split to the device, torchvision's the
    mean of `epochs` - 1 epochs (at least one)."""
    if workers is None:
        workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="segx-bench-cache-") as cache_dir:
        datamodule = VOCDataModule(root=str(root), image_size=size, batch_size=batch_size, cache_dir=cache_dir,
                                   augment={"hflip": True})
        datamodule.target_device = device
        start = time.perf_counter()
        images = len(datamodule.load_split(datamodule.train_split))
        cache_seconds = time.perf_counter() - start
        segx_epoch(datamodule)
        segx_seconds = statistics.median(segx_epoch(datamodule) for _ in range(5 * epochs))
    user = [torchvision_epoch(root, size, batch_size, device, workers) for _ in range(max(1, epochs - 1))]
    user_seconds = statistics.fmean(seconds for seconds, _ in user)
    segx_rate, user_rate = images / segx_seconds, user[0][1] / user_seconds
    return {"ratio": segx_rate / user_rate, "segx_images_per_second": segx_rate,
            "torchvision_images_per_second": user_rate, "images": images, "batch_size": batch_size,
            "torchvision_workers": workers, "cache_build_seconds": cache_seconds,
            "segx_path": "cached uint8 split on the device, hflip + normalise there",
            "torchvision_path": "VOCSegmentation + PIL resize + to_tensor, DataLoader, .to(device)"}
