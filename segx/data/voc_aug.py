"""`data=voc_aug`: Pascal VOC 2012 with SBD's extra masks, the 10,582-image "trainaug" set published VOC numbers
train on, validated on VOC val.

trainaug = (VOC train ∪ SBD train ∪ SBD val) − VOC val. An id VOC labels keeps VOC's mask (with its 255 borders);
an SBD-only id gets SBD's `cls/<id>.mat` converted once to a VOC-style palette PNG in `<root>/SegmentationClassAug`.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from filelock import FileLock
from PIL import Image

from segx.core.errors import ConfigError, DatasetUnavailableError, SegxError
from segx.core.files import atomic_path
from segx.data.cache import name_list
from segx.data.datamodule import CachedSegmentationDataModule
from segx.data.source import SplitFiles
from segx.data.voc import VOCSource, voc_split_files
from segx.data.voc_classes import VOC_PALETTE

log = logging.getLogger(__name__)

SPLITS = ("train_aug", "val")
AUG_DIR = "SegmentationClassAug"  # beside VOCdevkit under data.root: the converted SBD masks, <id>.png
CONVERT_LOCK = ".segx-convert.lock"  # inside AUG_DIR: parallel sweep jobs convert once
SBD_DOWNLOAD_LOCK = ".segx-sbd-download.lock"
SBD_PAGE = "http://home.bharathh.info/pubs/codes/SBD/download.html"
TRAINAUG_SIZE = 10_582  # the published count on the real data
VOC_TRAIN_SIZE = 1_464  # VOC 2012 train: the mark of the real data (a fabricated tree has other counts)
PROGRESS_SECONDS = 5.0


def default_sbd_root(root: Path) -> Path:
    """Where benchmark.tgz extracts under data.root: `<root>/benchmark_RELEASE/dataset`."""
    return root / "benchmark_RELEASE" / "dataset"


def read_ids(path: Path) -> list[str]:
    """The ids of a split file, one a line (blank lines skipped)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def trainaug_ids(voc_train: list[str], voc_val: list[str], sbd_train: list[str], sbd_val: list[str]) -> list[str]:
    """(VOC train ∪ SBD train ∪ SBD val) − VOC val, sorted (VOC ids sort by year, then number)."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def read_sbd_mask(path: str | Path) -> np.ndarray:
    """SBD's class mask `GTcls.Segmentation` of one .mat file: uint8 [H, W] class ids 0..20."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise SegxError("data=voc_aug reads SBD's .mat masks with scipy, which is not installed here: "
                        "pip install scipy, and run again.") from None
    labels = np.asarray(loadmat(str(path), struct_as_record=False, squeeze_me=True)["GTcls"].Segmentation)
    if labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"GTcls.Segmentation is {labels.shape}, not an image")
    if labels.dtype != np.uint8:
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 255:
            raise ValueError(f"GTcls.Segmentation holds {labels.dtype} values, not class ids")
        labels = labels.astype(np.uint8)
    return labels


def save_mask_png(labels: np.ndarray, path: Path) -> None:
    """A label map as a palette PNG with VOC's palette (as VOC's own masks are), written atomically."""
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    image.putpalette(VOC_PALETTE.tobytes())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


class _Plan(NamedTuple):
    """The trainaug split as found on disk: its files, the masks still to convert and the files found nowhere."""

    ids: list[str]
    images: list[str]
    masks: list[str]
    to_convert: list[tuple[str, str]]  # (SBD .mat, PNG to write)
    missing_images: list[str]
    missing_masks: list[str]
    voc_train_size: int


class VOCAugSource(VOCSource):
    """VOC 2012 under `root/VOCdevkit/VOC2012` plus SBD (benchmark_RELEASE) under `sbd_root`: splits `train_aug`
    (trainaug) and `val` (VOC val). `val` needs no SBD, so a trainaug checkpoint is scored where only VOC is."""

    splits = SPLITS

    def __init__(self, root: str | Path, sbd_root: str | Path | None = None, download: bool = False) -> None:
        super().__init__(root, download)
        self.sbd_root = Path(sbd_root).expanduser().resolve() if sbd_root else default_sbd_root(self.root)
        self.aug_dir = self.root / AUG_DIR

    # -- the SBD tree -------------------------------------------------------------------------------
    def sbd_problem(self) -> str | None:
        """One paragraph naming each missing part of the SBD tree and where to get it, or None."""
        expected = {
            self.sbd_root / "cls": "folder of the <id>.mat class masks",
            self.sbd_root / "train.txt": "SBD's train ids, one a line",
            self.sbd_root / "val.txt": "SBD's val ids, one a line",
        }
        missing = [f"{path} ({what})" for path, what in expected.items() if not path.exists()]
        if not missing:
            return None
        default = default_sbd_root(self.root)
        return (
            f"data=voc_aug needs the Semantic Boundaries Dataset (SBD) beside VOC, and {'; '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Download benchmark.tgz from {SBD_PAGE} (about 1.4 GB) "
            f"and extract it in data.root={self.root}, so that {default / 'cls'} exists; if SBD is elsewhere, point "
            "data.sbd_root at its benchmark_RELEASE/dataset folder (the one holding cls/, img/, train.txt and "
            "val.txt); data.download=true fetches it (needs internet)."
        )

    def _download_sbd(self) -> None:
        """Fetch SBD into sbd_root with torchvision (once, under a lock shared by parallel sweep jobs)."""
        from torchvision.datasets import SBDataset

        self.sbd_root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / SBD_DOWNLOAD_LOCK)):
            if self.sbd_problem() is None:
                return  # another job downloaded it while this one waited
            log.info("Downloading SBD (benchmark.tgz, about 1.4 GB) into %s", self.sbd_root)
            try:
                SBDataset(str(self.sbd_root), image_set="train", mode="segmentation", download=True)
            except (OSError, RuntimeError) as error:
                raise DatasetUnavailableError(
                    f"Downloading SBD into data.sbd_root={self.sbd_root} failed ({error}). This machine may have no "
                    f"internet access: fetch benchmark.tgz from {SBD_PAGE} elsewhere, extract it in "
                    f"data.root={self.root} so that {default_sbd_root(self.root) / 'cls'} exists (or point "
                    "data.sbd_root at its benchmark_RELEASE/dataset folder), and run again with data.download=false."
                ) from error

    # -- trainaug ---------------------------------------------------------------------------------
    def _plan(self) -> _Plan:
        voc_train = voc_split_files(self.root, "train").ids
        voc_val = voc_split_files(self.root, "val").ids
        sbd_train, sbd_val = read_ids(self.sbd_root / "train.txt"), read_ids(self.sbd_root / "val.txt")
        ids = trainaug_ids(voc_train, voc_val, sbd_train, sbd_val)
        images, masks, to_convert, missing_images, missing_masks = [], [], [], [], []
        jpegs, voc_masks = self.voc_dir / "JPEGImages", self.voc_dir / "SegmentationClass"
        for sample_id in ids:
            image = jpegs / f"{sample_id}.jpg"
            if not image.is_file():
                image = self.sbd_root / "img" / f"{sample_id}.jpg"
                if not image.is_file():
                    missing_images.append(sample_id)
            mask = voc_masks / f"{sample_id}.png"
            if not mask.is_file():
                mask = self.aug_dir / f"{sample_id}.png"
                mat = self.sbd_root / "cls" / f"{sample_id}.mat"
                if not mask.is_file():
                    if mat.is_file():
                        to_convert.append((str(mat), str(mask)))
                    else:
                        missing_masks.append(sample_id)
            images.append(str(image))
            masks.append(str(mask))
        return _Plan(ids, images, masks, to_convert, missing_images, missing_masks, len(voc_train))

    def _missing_files_problem(self, plan: _Plan) -> str | None:
        groups = []
        if plan.missing_images:
            groups.append(f"{len(plan.missing_images)} image(s) in neither {self.voc_dir / 'JPEGImages'} nor "
                          f"{self.sbd_root / 'img'}: {name_list([f'{i}.jpg' for i in plan.missing_images])}")
        if plan.missing_masks:
            groups.append(f"{len(plan.missing_masks)} mask(s) in neither {self.voc_dir / 'SegmentationClass'} "
                          f"(<id>.png) nor {self.sbd_root / 'cls'} (<id>.mat): "
                          f"{name_list(plan.missing_masks)}")
        if not groups:
            return None
        count = len(set(plan.missing_images) | set(plan.missing_masks))
        return (f"The train_aug split (VOC train, SBD train and SBD val, less VOC val) lists {count} id(s) whose "
                f"files do not exist: {'; '.join(groups)}. The copies are incomplete: re-extract VOC and SBD's "
                f"benchmark.tgz, or remove those ids from {self.sbd_root / 'train.txt'} and "
                f"{self.sbd_root / 'val.txt'}.")

    def _convert(self, pending: list[tuple[str, str]]) -> None:
        """SBD's .mat masks as palette PNGs in aug_dir, under a lock (parallel jobs convert once); one error names
        every .mat that cannot be read, after the readable ones are converted."""
        try:
            self.aug_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.aug_dir, os.W_OK):
                raise PermissionError("permission denied or a read-only filesystem")
        except OSError as error:
            raise DatasetUnavailableError(
                f"data=voc_aug converts SBD's masks to PNGs in {self.aug_dir}, which cannot be written "
                f"({error.strerror or error}). Run once where data.root={self.root} is writable, or copy the data "
                "to a folder you can write to and point data.root there."
            ) from error
        with FileLock(str(self.aug_dir / CONVERT_LOCK)):
            pending = [(mat, png) for mat, png in pending if not os.path.isfile(png)]  # another job's work
            if not pending:
                return
            log.info("Converting %d SBD masks (%s/<id>.mat) to PNGs in %s", len(pending), self.sbd_root / "cls",
                     self.aug_dir)
            start = last = time.perf_counter()
            unreadable: list[tuple[str, str]] = []

            def convert(item: tuple[str, str]) -> str | None:
                mat, png = item
                try:
                    labels = read_sbd_mask(mat)
                except SegxError:
                    raise
                except Exception as error:  # whatever scipy raises, this .mat cannot be used
                    return f"{type(error).__name__}: {error}".replace("\n", " ")
                save_mask_png(labels, Path(png))
                return None

            with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
                for done, (item, problem) in enumerate(zip(pending, pool.map(convert, pending), strict=True), 1):
                    if problem is not None:
                        unreadable.append((item[0], problem))
                    now = time.perf_counter()
                    if now - last > PROGRESS_SECONDS or done == len(pending):
                        last = now
                        log.info("Converting SBD masks: %d/%d (%.0fs)", done, len(pending), now - start)
        if unreadable:
            unreadable.sort()
            raise DatasetUnavailableError(
                f"{len(unreadable)} SBD mask(s) in {self.sbd_root / 'cls'} cannot be read as SBD .mat files (with "
                f"GTcls.Segmentation): {name_list([f'{os.path.basename(m)} ({why})' for m, why in unreadable])} "
                f"(the first is {unreadable[0][0]}). Replace them with good copies from SBD's benchmark.tgz, or "
                f"remove their ids from {self.sbd_root / 'train.txt'} and {self.sbd_root / 'val.txt'}, and run again."
            )

    def _train_aug(self) -> _Plan:
        problem = self.sbd_problem()
        if problem is not None:
            raise DatasetUnavailableError(problem)
        plan = self._plan()
        problem = self._missing_files_problem(plan)
        if problem is not None:
            raise DatasetUnavailableError(problem)
        if plan.to_convert:
            self._convert(plan.to_convert)
        return plan

    # -- the source -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Download VOC and SBD when asked and missing, then convert SBD's masks (a few stat calls when done).
        Without SBD nothing is converted: `val` is VOC's, and `split_files("train_aug")` says what is missing."""
        super().prepare()
        if self.download and self.sbd_problem() is not None:
            self._download_sbd()
        if self.sbd_problem() is None:
            self._train_aug()

    def split_files(self, split: str) -> SplitFiles:
        if split not in SPLITS:
            raise ConfigError(f"Unknown data=voc_aug split {split!r}; choose one of {', '.join(SPLITS)} "
                              "(train_aug: VOC train with SBD, less VOC val; val: VOC val).")
        if split == "val":
            return voc_split_files(self.root, "val")
        plan = self._train_aug()
        log.info("VOC trainaug: %d ids (VOC train, SBD train and SBD val, less VOC val)", len(plan.ids))
        if plan.voc_train_size == VOC_TRAIN_SIZE and len(plan.ids) != TRAINAUG_SIZE:
            log.warning("VOC trainaug has %d ids, not the published %d: check SBD's train.txt and val.txt in %s "
                        "(numbers trained on this set do not compare with published ones).", len(plan.ids),
                        TRAINAUG_SIZE, self.sbd_root)
        return SplitFiles(plan.ids, plan.images, plan.masks)

    def bad_files_fix(self, split: str) -> str:
        if split == "val":
            return super().bad_files_fix(split)
        return (f"Replace these files with good copies (re-extract VOC or SBD's benchmark.tgz; a converted mask in "
                f"{self.aug_dir} can be deleted to have it converted again from {self.sbd_root / 'cls'}), or remove "
                f"their ids from {self.voc_dir / 'ImageSets' / 'Segmentation' / 'train.txt'}, "
                f"{self.sbd_root / 'train.txt'} and {self.sbd_root / 'val.txt'}, and run again.")


class VOCAugDataModule(CachedSegmentationDataModule):
    """VOC 2012 + SBD's trainaug (10,582 images) to train on, VOC val to validate on (`data=voc_aug`)."""

    def __init__(self, root: str = "data/voc", sbd_root: str | None = None, download: bool = False,
                 train_split: str = "train_aug", **options: Any) -> None:
        """`sbd_root` None: `<root>/benchmark_RELEASE/dataset`; `options` are CachedSegmentationDataModule's."""
        super().__init__(source=VOCAugSource(root, sbd_root, download), train_split=train_split, **options)


__all__ = ["SPLITS", "TRAINAUG_SIZE", "VOCAugSource", "VOCAugDataModule", "trainaug_ids",
           "read_sbd_mask"]
