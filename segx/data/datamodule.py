"""`VOCDataModule`: Pascal VOC 2012 through torchvision's reader and the cached tensor store."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import VOCSegmentation

from segx.core.errors import SegxError
from segx.data.augment import BatchAugment
from segx.data.cache import CachedSplit, load_or_build, name_list
from segx.data.device_batches import DeviceBatches, EpochOrderSampler
from segx.data.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from segx.data.voc import IGNORE_INDEX, NUM_CLASSES, SPLITS, VOC_CLASSES

log = logging.getLogger(__name__)

AUGMENT_SEED_STRIDE = 1_000_003  # rank r augments with seed + 1 + r * stride: streams apart, rank 0 unchanged
ON_DEVICE_CHOICES = ("auto", True, False)


def check_on_device(setting: str | bool) -> str | bool:
    """`data.on_device` as given, when it is one of the choices."""
    if setting not in ON_DEVICE_CHOICES:
        raise SegxError(f"data.on_device={setting!r} is not a choice; use auto, true or false.")
    return setting


def keep_on_device(setting: str | bool, split_bytes: int, device: torch.device, memory_fraction: float) -> bool:
    """Whether a split is served from the training device (`data.on_device`).

    `auto`: yes when its uint8 tensors fit in `memory_fraction` of the device's free memory (on the CPU the
    split is already in memory, so always); `true`: always; `false`: never (a DataLoader with `num_workers`).
    """
    if check_on_device(setting) != "auto":
        return bool(setting)
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return split_bytes <= memory_fraction * free


def split_bytes(split: CachedSplit) -> int:
    return split.images.nbytes + split.masks.nbytes


class CachedSplitDataset(Dataset):
    """Indexes the cached uint8 tensors; `__getitems__` slices a whole batch at once."""

    def __init__(self, split: CachedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.images[index], self.split.masks[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.split.images[index], self.split.masks[index]


def _keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # __getitems__ already returns stacked tensors


def _layout_problem(root: Path, split: str) -> str | None:
    """What is missing from a VOC tree under `root`, naming each missing path and what belongs there."""
    voc_dir = root / "VOCdevkit" / "VOC2012"
    if not root.is_dir():
        return None  # the reader's own "not found" message below says what data.root should hold
    if not voc_dir.is_dir():
        hint = ""
        if (root / "JPEGImages").is_dir():
            hint = f" data.root points at the VOC2012 folder itself: set data.root={root.parent.parent}."
        elif (root / "VOC2012").is_dir():
            hint = f" data.root points at VOCdevkit: set data.root={root.parent}."
        return (
            f"data.root={root} exists but holds no VOCdevkit/VOC2012 folder ({voc_dir} is missing).{hint} "
            "data.root must be the folder that holds VOCdevkit/VOC2012 as extracted from "
            "VOCtrainval_11-May-2012.tar; set data.download=true to fetch it (about 2 GB, needs internet), or "
            "use data=shapes for the embedded dataset."
        )
    expected = {
        voc_dir / "JPEGImages": "folder of the <id>.jpg images",
        voc_dir / "SegmentationClass": "folder of the <id>.png class masks",
        voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt": f"the {split} split file, one image id per line",
    }
    missing = [f"{path} ({what})" for path, what in expected.items() if not path.exists()]
    if not missing:
        return None
    return (
        f"The Pascal VOC 2012 copy under data.root={root} is incomplete: {'; '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} missing. Place the missing part(s) there as in the official "
        "VOCtrainval_11-May-2012.tar (extract it over data.root), or use data=shapes for the embedded dataset."
    )


def voc_split_files(root: Path, split: str, download: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(ids, image files, mask files) of a split, read through torchvision's VOCSegmentation."""
    if split not in SPLITS:
        raise SegxError(f"Unknown VOC split {split!r}; choose one of {', '.join(SPLITS)}.")
    voc_dir = root / "VOCdevkit" / "VOC2012"
    if not download:
        problem = _layout_problem(root, split)
        if problem is not None:
            raise SegxError(problem)
    try:
        dataset = VOCSegmentation(str(root), year="2012", image_set=split, download=download)
    except (OSError, RuntimeError) as error:
        if download:
            raise SegxError(
                f"Downloading Pascal VOC 2012 into data.root={root} failed ({error}). This machine may have no "
                "internet access: fetch VOCtrainval_11-May-2012.tar elsewhere, extract it so that "
                f"{voc_dir}/JPEGImages exists, and run again with data.download=false."
            ) from error
        raise SegxError(
            f"Pascal VOC 2012 was not found under data.root={root} (expected {voc_dir} with JPEGImages, "
            f"SegmentationClass and ImageSets/Segmentation/{split}.txt; the reader said: {error}). Point "
            "data.root at the folder that holds VOCdevkit, set data.download=true to fetch it (about 2 GB, needs "
            "internet), or use data=shapes for the embedded dataset."
        ) from error
    missing_images = [f for f in dataset.images if not os.path.isfile(f)]
    missing_masks = [f for f in dataset.masks if not os.path.isfile(f)]
    if missing_images or missing_masks:
        groups = [
            f"{len(files)} {kind} missing from {folder}: {name_list([Path(f).name for f in files])}"
            for files, kind, folder in ((missing_images, "image(s)", voc_dir / "JPEGImages"),
                                        (missing_masks, "mask(s)", voc_dir / "SegmentationClass"))
            if files
        ]
        count = len({Path(f).stem for f in (*missing_images, *missing_masks)})
        raise SegxError(
            f"The VOC {split} split under data.root={root} lists {count} id(s) whose files do not exist: "
            f"{'; '.join(groups)}. The copy is incomplete: re-extract the VOC archive, or remove those ids from "
            f"{voc_dir}/ImageSets/Segmentation/{split}.txt."
        )
    ids = [Path(f).stem for f in dataset.images]
    return ids, list(dataset.images), list(dataset.masks)


def class_frequencies(masks: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Fraction of labelled (non-255) pixels in each class, float64 [num_classes]."""
    counts = torch.bincount(masks.flatten().long(), minlength=256)[:num_classes].double()
    total = counts.sum()
    if total == 0:
        raise SegxError("The training masks hold no labelled pixel (all 255); class weights cannot be computed.")
    return counts / total


class VOCDataModule(pl.LightningDataModule):
    """Pascal VOC 2012 segmentation at a fixed square size, served from the cached tensor store.

    Batches leave the loader as uint8; `on_after_batch_transfer` converts, augments (training only)
    and normalises them on the training device, so the same code path feeds CPU and GPU runs. With
    `on_device` (default `auto`) the loaders are `DeviceBatches` over splits moved to that device once.
    """

    def __init__(
        self,
        root: str = "data/voc",
        download: bool = False,
        image_size: int = 128,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        train_split: str = "train",
        val_split: str = "val",
        cache_dir: str | None = None,
        augment: dict[str, Any] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_classes: int = NUM_CLASSES,
        class_names: Sequence[str] = VOC_CLASSES,
        seed: int = 0,
        on_device: str | bool = "auto",
        on_device_memory_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if int(image_size) < 16:
            raise SegxError(f"data.image_size={image_size} is too small; use 16 or more (the study used 128).")
        if int(batch_size) < 1:
            raise SegxError(f"data.batch_size={batch_size} must be at least 1.")
        if len(class_names) != num_classes:
            raise SegxError(
                f"data.class_names has {len(class_names)} names but data.num_classes={num_classes}; make them agree."
            )
        self.root = Path(root).expanduser().resolve()
        self.download = bool(download)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.train_split, self.val_split = train_split, val_split
        self.cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir else self.root / "segx-cache"
        self.augment = BatchAugment(**dict(augment or {}), seed=int(seed) + 1)
        if not 0 < float(on_device_memory_fraction) <= 1:
            raise SegxError(f"data.on_device_memory_fraction={on_device_memory_fraction} must be in (0, 1].")
        self.on_device = check_on_device(on_device)  # refused before any data is read
        self.on_device_memory_fraction = float(on_device_memory_fraction)
        self.normalizer = Normalize(mean, std)
        self.mean, self.std = self.normalizer.mean, self.normalizer.std
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.seed = int(seed)
        self._splits: dict[str, CachedSplit] = {}
        self._resident: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.target_device: torch.device | None = None  # where batches go without a Trainer (the benchmark)

    # -- data on disk -------------------------------------------------------------------------------
    def prepare_source(self) -> None:
        """Download VOC when asked and it is missing (once, under a lock shared by parallel sweep jobs).

        Called before any split is read, not only from Lightning's `prepare_data`, because the class
        weights of the loss need the training split before the Trainer exists. Subclasses generate theirs.
        """
        if not self.download or (self.root / "VOCdevkit" / "VOC2012").is_dir():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".segx-download.lock")):
            if not (self.root / "VOCdevkit" / "VOC2012").is_dir():
                log.info("Downloading Pascal VOC 2012 (about 2 GB) into %s", self.root)
                voc_split_files(self.root, self.train_split, download=True)

    def prepare_data(self) -> None:
        self.prepare_source()

    def split_files(self, split: str) -> tuple[list[str], list[str], list[str]]:
        self.prepare_source()
        return voc_split_files(self.root, split, download=False)

    def load_split(self, split: str) -> CachedSplit:
        """The split as cached uint8 tensors at `image_size` (built on first use)."""
        if split not in self._splits:
            ids, images, masks = self.split_files(split)
            if not ids:
                raise SegxError(f"The VOC {split} split under data.root={self.root} is empty; check its split file.")
            self._splits[split] = load_or_build(
                self.cache_dir, split, ids, images, masks, self.image_size, num_classes=self.num_classes,
            )
        return self._splits[split]

    def setup(self, stage: str | None = None) -> None:
        # Each DDP rank augments its own shard: the same flips on every rank would halve their variety.
        self.augment.reseed(self.seed + 1 + AUGMENT_SEED_STRIDE * self._rank_and_world()[0])
        if stage in (None, "fit"):
            self.load_split(self.train_split)
        if stage in (None, "fit", "validate"):
            self.load_split(self.val_split)

    def class_frequencies(self) -> torch.Tensor:
        """Pixel frequencies of the training split, for class-weighted losses."""
        return class_frequencies(self.load_split(self.train_split).masks, self.num_classes)

    # -- loaders ------------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)

    def _device(self) -> torch.device:
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device
        return self.target_device or torch.device("cpu")

    def _current_epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    def serves_from_device(self, split: str) -> bool:
        """Whether `split` is drawn from tensors on the training device (see `keep_on_device`)."""
        return keep_on_device(self.on_device, split_bytes(self.load_split(split)), self._device(),
                              self.on_device_memory_fraction)

    def _device_batches(self, split: str, batch_size: int, shuffle: bool) -> DeviceBatches:
        device = self._device()
        key = (split, str(device))
        if key not in self._resident:
            cached = self.load_split(split)
            self._resident[key] = (cached.images.to(device), cached.masks.to(device))
            log.info("data.on_device: the %s split (%d images, %.0f MB) is served from %s", split, len(cached),
                     split_bytes(cached) / 1e6, device)
        images, masks = self._resident[key]
        rank, world = self._rank_and_world()
        return DeviceBatches(images, masks, batch_size, shuffle=shuffle, seed=self.seed, rank=rank, world_size=world,
                             pad=shuffle, epoch=self._current_epoch)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        """The path for data kept off the device: same order as `DeviceBatches` (an `EpochOrderSampler`)."""
        dataset = CachedSplitDataset(self.load_split(split))
        rank, world = self._rank_and_world()
        sampler = EpochOrderSampler(len(dataset), shuffle, self.seed, self._current_epoch, rank, world, pad=shuffle)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers, collate_fn=_keep_batch,
            pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        if self.serves_from_device(self.train_split):
            return self._device_batches(self.train_split, self.batch_size, shuffle=True)
        return self._loader(self.train_split, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        """Under DDP each rank scores a disjoint shard without padding: Lightning's DistributedSampler would
        repeat images to even the shards out, and the summed confusion matrix would count them twice."""
        if self.serves_from_device(self.val_split):
            return self._device_batches(self.val_split, self.val_batch_size, shuffle=False)
        return self._loader(self.val_split, self.val_batch_size, shuffle=False)

    # -- tensors on the device ----------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] → float, scaled to [0,1] and standardised with `mean`/`std`."""
        return self.normalizer(images)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Back to [0,1] floats, for pictures of what the network saw."""
        return self.normalizer.invert(images)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, torch.Tensor):  # the module's example input (Lightning's model summary), not data
            return batch
        return self.prepare_batch(batch, training=self.trainer is not None and self.trainer.training)

    def prepare_batch(self, batch: tuple[torch.Tensor, torch.Tensor],
                      training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A uint8 batch on its device → normalised float images and long masks, augmented when `training`."""
        images, masks = batch
        if training:  # flips move bytes: cheaper on uint8 than on floats, and they commute with normalising
            images, masks = self.augment.flip(images, masks)
        images, masks = self.normalize(images), masks.long()
        if training:
            images, masks = self.augment.rescale(images, masks)
        return images, masks


__all__ = ["VOCDataModule", "CachedSplitDataset", "voc_split_files", "class_frequencies", "IGNORE_INDEX"]
