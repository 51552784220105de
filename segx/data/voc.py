"""Pascal VOC 2012: its classes and palette, the source that lists its splits, and `VOCDataModule`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from filelock import FileLock
from torchvision.datasets import VOCSegmentation

from segx.core.errors import ConfigError, DatasetUnavailableError
from segx.data.cache import name_list
from segx.data.datamodule import CachedSegmentationDataModule
from segx.data.source import IGNORE_INDEX, SegmentationSource, SplitFiles
from segx.data.voc_classes import NUM_CLASSES, VOC_CLASSES, VOC_PALETTE

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "trainval")


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


def _without_advice(error: BaseException) -> str:
    """torchvision's message without its "use download=True" (segx's key is data.download=true)."""
    return str(error).replace(" You can use download=True to download it", "").strip()


def voc_split_files(root: Path, split: str, download: bool = False) -> SplitFiles:
    """(ids, image files, mask files) of a split, read through torchvision's VOCSegmentation."""
    if split not in SPLITS:
        raise ConfigError(f"Unknown VOC split {split!r}; choose one of {', '.join(SPLITS)}.")
    voc_dir = root / "VOCdevkit" / "VOC2012"
    if not download:
        problem = _layout_problem(root, split)
        if problem is not None:
            raise DatasetUnavailableError(problem)
    try:
        dataset = VOCSegmentation(str(root), year="2012", image_set=split, download=download)
    except (OSError, RuntimeError) as error:
        if download:
            raise DatasetUnavailableError(
                f"Downloading Pascal VOC 2012 into data.root={root} failed ({error}). This machine may have no "
                "internet access: fetch VOCtrainval_11-May-2012.tar elsewhere, extract it so that "
                f"{voc_dir}/JPEGImages exists, and run again with data.download=false."
            ) from error
        raise DatasetUnavailableError(
            f"Pascal VOC 2012 was not found under data.root={root} (expected {voc_dir} with JPEGImages, "
            f"SegmentationClass and ImageSets/Segmentation/{split}.txt; the reader said: {_without_advice(error)}). "
            "Point data.root at the folder that holds VOCdevkit, set data.download=true to fetch it (about 2 GB, needs "
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
        raise DatasetUnavailableError(
            f"The VOC {split} split under data.root={root} lists {count} id(s) whose files do not exist: "
            f"{'; '.join(groups)}. The copy is incomplete: re-extract the VOC archive, or remove those ids from "
            f"{voc_dir}/ImageSets/Segmentation/{split}.txt."
        )
    if not dataset.images:
        raise DatasetUnavailableError(
            f"The VOC {split} split under data.root={root} is empty; check its split file "
            f"{voc_dir}/ImageSets/Segmentation/{split}.txt (one image id per line)."
        )
    ids = [Path(f).stem for f in dataset.images]
    return SplitFiles(ids, list(dataset.images), list(dataset.masks))


class VOCSource(SegmentationSource):
    """A Pascal VOC 2012 tree: `root/VOCdevkit/VOC2012` as extracted from VOCtrainval_11-May-2012.tar."""

    classes = VOC_CLASSES
    palette = VOC_PALETTE
    splits = SPLITS

    def __init__(self, root: str | Path, download: bool = False) -> None:
        self.root = Path(root).expanduser().resolve()
        self.download = bool(download)

    @property
    def voc_dir(self) -> Path:
        return self.root / "VOCdevkit" / "VOC2012"

    def prepare(self) -> None:
        """Download VOC when asked and it is missing (once, under a lock shared by parallel sweep jobs)."""
        if not self.download or self.voc_dir.is_dir():
            return
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / ".segx-download.lock"
        try:
            with FileLock(str(lock)):
                if not self.voc_dir.is_dir():
                    log.info("Downloading Pascal VOC 2012 (about 2 GB) into %s", self.root)
                    voc_split_files(self.root, SPLITS[0], download=True)
        finally:  # the lock file is not left in the dataset's folder, nor a folder made for a failed download
            lock.unlink(missing_ok=True)
            if created and not any(self.root.iterdir()):
                self.root.rmdir()

    def split_files(self, split: str) -> SplitFiles:
        return voc_split_files(self.root, split, download=False)

    def bad_files_fix(self, split: str) -> str:
        split_file = self.voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
        return ("Replace these files with good copies (re-extract the VOC archive), or remove their ids from "
                f"{split_file}, and run again.")


class VOCDataModule(CachedSegmentationDataModule):
    """Pascal VOC 2012 segmentation at a fixed square size, served from the cached tensor store (`data=voc`)."""

    def __init__(self, root: str = "data/voc", download: bool = False, **options: Any) -> None:
        """`options` are CachedSegmentationDataModule's (image_size, batch_size, augment, ...); the classes are VOC's
        unless `num_classes`/`class_names` say otherwise."""
        super().__init__(source=VOCSource(root, download), **options)


__all__ = ["VOC_CLASSES", "VOC_PALETTE", "NUM_CLASSES", "IGNORE_INDEX", "SPLITS", "VOCSource", "VOCDataModule",
           "voc_split_files"]
