"""Data: a cached segmentation data module and its sources (Pascal VOC, the embedded `shapes` dataset, a folder of
one's own).

A source lists each split's files and names the classes (`segx.data.source`); `CachedSegmentationDataModule`
checks and caches them as uint8 tensors (`segx.data.cache`), batches them (`segx.data.device_batches`) and
augments and normalises them on the training device (`segx.data.augment`, `segx.data.normalize`).
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use: the data module needs Lightning (seconds to import), the class names and palette do not.
_EXPORTS = {
    "CachedSegmentationDataModule": "segx.data.datamodule", "class_frequencies": "segx.data.datamodule",
    "ShapesDataModule": "segx.data.shapes_datamodule", "ShapesSource": "segx.data.shapes_datamodule",
    "IGNORE_INDEX": "segx.data.source", "SegmentationSource": "segx.data.source", "SplitFiles": "segx.data.source",
    "VOCDataModule": "segx.data.voc", "VOCSource": "segx.data.voc",
    "FolderDataModule": "segx.data.folder", "FolderSource": "segx.data.folder",
    "VOCAugDataModule": "segx.data.voc_aug", "VOCAugSource": "segx.data.voc_aug",
    "NUM_CLASSES": "segx.data.voc_classes", "VOC_CLASSES": "segx.data.voc_classes",
    "VOC_PALETTE": "segx.data.voc_classes",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
