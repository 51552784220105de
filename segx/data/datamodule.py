"""`CachedSegmentationDataModule`: any segmentation source, checked and cached as uint8 tensors, batched on the
training device. The sources (VOC, shapes) only list files and name classes; see `segx.data.source`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from segx.core.errors import ConfigError, DatasetUnavailableError, SegxError
from segx.data.augment import augment_from_config
from segx.data.cache import CachedSplit, check_interpolation, check_resize, load_or_build, read_image
from segx.data.census import LabelCensus, check_census, check_label_options
from segx.data.device_batches import EPOCH_SEED_STRIDE, DeviceBatches, EpochOrderSampler
from segx.data.masks import MaskDecoder
from segx.data.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from segx.data.source import IGNORE_INDEX, SegmentationSource, SplitFiles

log = logging.getLogger(__name__)

# Rank r augments epoch e with generator seed (seed + 1 + r * stride) * EPOCH_SEED_STRIDE + e: streams apart
AUGMENT_SEED_STRIDE = 1_000_003
ON_DEVICE_CHOICES = ("auto", True, False)
VOID_LABELS = ("ignore", "background")


def check_on_device(setting: str | bool) -> str | bool:
    """`data.on_device` as given, when it is one of the choices."""
    if setting not in ON_DEVICE_CHOICES:
        raise ConfigError(f"data.on_device={setting!r} is not a choice; use auto, true or false.")
    return setting


def check_memory_fraction(fraction: object) -> float:
    """`data.on_device_memory_fraction` as a float in (0, 1]."""
    try:
        value = float(fraction)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value <= 1:  # NaN fails this too
        raise ConfigError(f"data.on_device_memory_fraction={fraction} must be in (0, 1].")
    return value


def gpu_share() -> float:
    """The share of each of its GPUs this process was given: a Ray job's `num_gpus` below 1 (0.5: two jobs on one
    GPU), else 1."""
    import sys

    ray = sys.modules.get("ray")  # only a process that Ray started has imported it
    try:
        if ray is not None and ray.is_initialized():
            assigned = ray.get_runtime_context().get_assigned_resources().get("GPU")
            if assigned:
                return min(1.0, float(assigned))
    except Exception:  # the driver, or a Ray without the runtime context: a whole GPU
        pass
    return 1.0


def keep_on_device(setting: str | bool, split_bytes: int, device: torch.device, memory_fraction: float,
                   share: float = 1.0) -> bool:
    """Whether a split is served from the training device (`data.on_device`).

    `auto`: yes when its uint8 tensors fit in `memory_fraction` of this job's `share` of the device's free memory
    (jobs that share a GPU each see all of its free memory at once); on the CPU the split is already in memory, so
    always. `true`: always; `false`: never (a DataLoader with `num_workers`).
    """
    if check_on_device(setting) != "auto":
        return bool(setting)
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return split_bytes <= memory_fraction * share * free


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


FREQUENCY_CHUNK = 256  # masks counted at a time: bincount wants int64, 8 bytes a pixel, so never the whole split


def class_frequencies(masks: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Fraction of labelled pixels (not `ignore_index`) in each class, float64 [num_classes]."""
    counts = torch.zeros(256, dtype=torch.long)  # uint8 masks: every value below 256
    for start in range(0, len(masks), FREQUENCY_CHUNK):
        counts += torch.bincount(masks[start:start + FREQUENCY_CHUNK].flatten().long().cpu(), minlength=256)
    counts = counts[:num_classes].double()
    total = counts.sum()
    if total == 0:
        raise SegxError(f"The training masks hold no labelled pixel (all {ignore_index}); class weights cannot be "
                        "computed.")
    return counts / total


def _whole(name: str, value: object) -> int:
    """A config value as an int (Hydra may hand over 64.0 or "64"), or a ConfigError naming the option."""
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be a whole number.") from None


def _channel_values(name: str, values: object, positive: bool = False) -> list[float]:
    """`data.mean` / `data.std`: one number per channel, in `data.channel_order`."""
    try:
        numbers = [float(v) for v in values]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 3 or (positive and min(numbers) <= 0):
        kind = "positive numbers" if positive else "numbers"
        raise ConfigError(f"{name}={values!r} must be 3 {kind}, one per channel (ImageNet's are the default).")
    return numbers


class CachedSegmentationDataModule(pl.LightningDataModule):
    """A segmentation source at a fixed square size, served from the cached tensor store.

    The source lists each split's files and names the classes; this module checks and caches them
    (`load_or_build`), batches them and shards them under DDP. Batches leave the loader as uint8;
    `on_after_batch_transfer` converts, augments (training only) and normalises them on the training
    device, so the same code path feeds CPU and GPU runs. With `on_device` (default `auto`) the loaders
    are `DeviceBatches` over splits moved to that device once.
    """

    def __init__(
        self,
        source: SegmentationSource,
        image_size: int = 128,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        train_split: str = "train",
        val_split: str = "val",
        cache_dir: str | None = None,
        augment: Mapping[str, Any] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        on_device: str | bool = "auto",
        on_device_memory_fraction: float = 0.5,
        resize: str = "square",
        void_label: str = "ignore",
        interpolation: str = "antialias",
        channel_order: str = "rgb",
        absent_classes: Sequence[str] | None = None,
        max_ignored_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        self.source = source
        self.image_size = _whole("data.image_size", image_size)
        self.resize = check_resize(resize)
        self.interpolation = check_interpolation(interpolation)
        self._relabel_void(void_label)
        if self.image_size < 16:
            raise ConfigError(f"data.image_size={image_size} is too small; use 16 or more (the study used 128).")
        self.batch_size = _whole("data.batch_size", batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be at least 1.")
        self.val_batch_size = _whole("data.val_batch_size", val_batch_size) if val_batch_size is not None else None
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ConfigError(f"data.val_batch_size={val_batch_size} must be at least 1 (or null: data.batch_size).")
        self.val_batch_size = self.val_batch_size or self.batch_size
        self.num_workers = _whole("data.num_workers", num_workers)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be 0 (load in the main process) or more.")
        class_names = list(source.classes if class_names is None else class_names)
        self.num_classes = len(class_names) if num_classes is None else _whole("data.num_classes", num_classes)
        if len(class_names) != self.num_classes:
            raise ConfigError(
                f"data.class_names has {len(class_names)} names but data.num_classes={num_classes}; make them agree."
            )
        if not 0 < self.num_classes <= source.ignore_index:
            raise ConfigError(f"data.num_classes={num_classes} must be in 1..{source.ignore_index} (mask values "
                              f"0..num_classes-1 are classes, {source.ignore_index} is ignored).")
        self.class_names = class_names
        self.absent_classes, self.max_ignored_fraction = check_label_options(absent_classes, max_ignored_fraction,
                                                                             class_names)
        for name, split in (("data.train_split", train_split), ("data.val_split", val_split)):
            if source.splits is not None and split not in source.splits:
                raise ConfigError(f"{name}={split!r} is not a split of this dataset; choose one of "
                                  f"{', '.join(source.splits)}.")
        self.train_split, self.val_split = train_split, val_split
        self.root = source.root
        self.cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir else self.root / "segx-cache"
        self.seed = _whole("seed", seed)
        self.augment = augment_from_config(augment, seed=self.seed + 1, ignore_index=source.ignore_index)
        self._augment_epoch: int | None = None  # the epoch the augmentation stream was last seeded for
        self.on_device = check_on_device(on_device)  # refused before any data is read
        self.on_device_memory_fraction = check_memory_fraction(on_device_memory_fraction)
        self.normalizer = Normalize(_channel_values("data.mean", mean), _channel_values("data.std", std, positive=True),
                                    channel_order)
        self._splits: dict[str, CachedSplit] = {}
        self._off_device: set[str] = set()  # splits whose copy to the device ran out of memory
        self._resident: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.target_device: torch.device | None = None  # where batches go without a Trainer (the benchmark)

    @property
    def palette(self) -> np.ndarray:
        """uint8 [256, 3]: the colour of each label in the source's masks (and in pictures of predictions)."""
        return self.source.palette

    def _relabel_void(self, void_label: str) -> None:
        """`data.void_label=background`: the ignore index read as the background class (the study's preprocessing
        did so to VOC's void borders); `ignore` leaves it unscored."""
        if void_label not in VOID_LABELS:
            raise ConfigError(f"data.void_label={void_label!r} is not a choice; use ignore (void pixels are not "
                              "scored, the standard protocol) or background (read as the background class).")
        if void_label == "ignore":
            return
        if self.source.background_index is None:
            raise ConfigError("data.void_label=background needs a background class, but data.background_index is "
                              "null; keep data.void_label=ignore.")
        decoder = self.mask_decoder
        mapping = (*decoder.label_map, (self.source.ignore_index, self.source.background_index))
        self.source.mask_decoder = dataclasses.replace(decoder, label_map=mapping)

    @property
    def mask_decoder(self) -> MaskDecoder:
        """How the source's mask files read as class ids (plain index images unless the source says otherwise)."""
        return self.source.mask_decoder or MaskDecoder(ignore_index=self.source.ignore_index)

    @property
    def background_index(self) -> int | None:
        """The class `miou_no_bg` leaves out (None: no background class, and no `miou_no_bg`)."""
        return self.source.background_index

    @property
    def ignore_index(self) -> int:
        """The mask value that marks unlabelled pixels (skipped by loss and metrics)."""
        return self.source.ignore_index

    # -- data on disk -------------------------------------------------------------------------------
    def read_image(self, path: str | Path) -> torch.Tensor:
        """One image file at its own size as uint8 RGB [3,H,W], decoded as the cache decodes it (sliding windows)."""
        return read_image(path)

    def read_mask(self, path: str | Path) -> np.ndarray:
        """One mask file at its own size as class indices, decoded as the cache decodes it (full-res scoring)."""
        from PIL import Image

        with Image.open(path) as mask:
            return self.mask_decoder.decode(mask)

    def prepare_data(self) -> None:
        self.source.prepare()

    def split_files(self, split: str) -> SplitFiles:
        """The source's (ids, image files, mask files) of `split`, after making sure the files exist.

        Also called outside Lightning's `prepare_data`, because the class weights of the loss need the
        training split before the Trainer exists.
        """
        self.source.prepare()
        return self.source.split_files(split)

    def load_split(self, split: str) -> CachedSplit:
        """The split as cached uint8 tensors at `image_size` (built on first use)."""
        if split not in self._splits:
            files = self.split_files(split)
            if not files.ids:
                raise DatasetUnavailableError(
                    f"The {split} split under data.root={self.root} lists no image; check its split list.")
            self._splits[split] = load_or_build(
                self.cache_dir, split, files, self.image_size, num_classes=self.num_classes,
                ignore_index=self.source.ignore_index, bad_files_fix=self.source.bad_files_fix(split),
                decoder=self.mask_decoder, resize=self.resize, interpolation=self.interpolation,
            )
        return self._splits[split]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the loaded splits: a rank started by `ddp_spawn` maps them from the cache file again,
        where pickling them would copy every split through /dev/shm (64 MB in Docker's default)."""
        state = self.__dict__.copy()
        state["_splits"], state["_resident"] = {}, {}
        return state

    def setup(self, stage: str | None = None) -> None:
        self._augment_epoch = None  # reseeded at the first training batch
        if stage in (None, "fit"):
            self.load_split(self.train_split)
        if stage in (None, "fit", "validate"):
            self.load_split(self.val_split)

    def label_census(self, split: str) -> LabelCensus:
        """What `split`'s mask files hold: pixels per class and ignored, raw values, how they were read."""
        cached = self.load_split(split)
        return LabelCensus.from_counts(split, cached.census, self.class_names, self.source.ignore_index)

    def label_censuses(self) -> list[LabelCensus]:
        """The censuses of the train split and (when it is another) the val split."""
        splits = dict.fromkeys([self.train_split, self.val_split])
        return [self.label_census(split) for split in splits]

    def check_labels(self, censuses: list[LabelCensus] | None = None) -> list[LabelCensus]:
        """The censuses, after refusing a training split that cannot be what was meant (see
        `segx.data.census.check_census`; data.absent_classes and data.max_ignored_fraction accept one knowingly)."""
        censuses = censuses or self.label_censuses()
        check_census(censuses[0], self.class_names, self.source.ignore_index, self.absent_classes,
                     self.max_ignored_fraction)
        return censuses

    def class_frequencies(self) -> torch.Tensor:
        """Pixel frequencies of the training split, for class-weighted losses."""
        return class_frequencies(self.load_split(self.train_split).masks, self.num_classes, self.source.ignore_index)

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
        if split in self._off_device:  # it did not fit after all (out of memory): the loader path for good
            return False
        return keep_on_device(self.on_device, split_bytes(self.load_split(split)), self._device(),
                              self.on_device_memory_fraction, gpu_share())

    def _device_batches(self, split: str, batch_size: int, shuffle: bool) -> DeviceBatches | None:
        """Batches drawn from the split on the device; None when copying it there ran out of memory (`auto`:
        another job took the memory it saw free), and the loader path takes over."""
        device = self._device()
        key = (split, str(device))
        if key not in self._resident:
            cached = self.load_split(split)
            try:
                self._resident[key] = (cached.images.to(device), cached.masks.to(device))
            except torch.OutOfMemoryError:
                if self.on_device is True:  # asked for explicitly: the user's choice fails as it is
                    raise
                self._off_device.add(split)
                torch.cuda.empty_cache()
                log.warning("data.on_device: the %s split (%.0f MB) did not fit on %s after all (out of memory); "
                            "it is read through a DataLoader instead", split, split_bytes(cached) / 1e6, device)
                return None
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
        # trainer.overfit_batches (debug=overfit) takes the first batches: the same ones only in a fixed order
        shuffle = self.trainer is None or not self.trainer.overfit_batches
        if self.serves_from_device(self.train_split):
            batches = self._device_batches(self.train_split, self.batch_size, shuffle=shuffle)
            if batches is not None:
                return batches
        return self._loader(self.train_split, self.batch_size, shuffle=shuffle)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        """Under DDP each rank scores a disjoint shard without padding: Lightning's DistributedSampler would
        repeat images to even the shards out, and the summed confusion matrix would count them twice."""
        if self.serves_from_device(self.val_split):
            batches = self._device_batches(self.val_split, self.val_batch_size, shuffle=False)
            if batches is not None:
                return batches
        return self._loader(self.val_split, self.val_batch_size, shuffle=False)

    # -- tensors on the device ----------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] → float, scaled to [0,1] and standardised with `mean`/`std`."""
        return self.normalizer(images)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, torch.Tensor):  # the module's example input (Lightning's model summary), not data
            return batch
        return self.prepare_batch(batch, training=self.trainer is not None and self.trainer.training)

    def prepare_batch(self, batch: tuple[torch.Tensor, torch.Tensor],
                      training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A uint8 batch on its device → normalised float images and long masks, augmented when `training`."""
        images, masks = batch
        if training and self._augment_epoch != self._current_epoch():
            # Each epoch's augmentation stream starts from (seed, rank, epoch), as its batch order does, so a run
            # resumed at an epoch boundary augments as if it had never stopped; each DDP rank has its own (the same
            # flips on every rank would halve their variety).
            self._augment_epoch = self._current_epoch()
            rank_seed = self.seed + 1 + AUGMENT_SEED_STRIDE * self._rank_and_world()[0]
            self.augment.reseed(rank_seed * EPOCH_SEED_STRIDE + self._augment_epoch)
        if training:  # flips move bytes: cheaper on uint8 than on floats, and they commute with normalising
            images, masks = self.augment.flip(images, masks)
        images, masks = self.normalize(images), masks.long()
        if training:
            images, masks = self.augment.rescale(images, masks)
        return images, masks


__all__ = ["CachedSegmentationDataModule", "CachedSplitDataset", "class_frequencies", "keep_on_device"]
