"""Data: a cached segmentation data module and its sources (Pascal VOC, the embedded `shapes` dataset).

A source lists each split's files and names the classes (`segx.data.source`); `CachedSegmentationDataModule`
checks and caches them as uint8 tensors (`segx.data.cache`), batches them (`segx.data.device_batches`) and
augments and normalises them on the training device (`segx.data.augment`, `segx.data.normalize`).
"""

from segx.data.datamodule import CachedSegmentationDataModule, class_frequencies
from segx.data.shapes_datamodule import ShapesDataModule, ShapesSource
from segx.data.source import IGNORE_INDEX, SegmentationSource, SplitFiles
from segx.data.voc import NUM_CLASSES, VOC_CLASSES, VOC_PALETTE, VOCDataModule, VOCSource

__all__ = [
    "CachedSegmentationDataModule", "SegmentationSource", "SplitFiles", "VOCDataModule", "VOCSource",
    "ShapesDataModule", "ShapesSource", "class_frequencies", "IGNORE_INDEX", "NUM_CLASSES", "VOC_CLASSES",
    "VOC_PALETTE",
]
