"""Data: VOC reading, the cached tensor store, batch augmentation and the embedded `shapes` dataset."""

from segx.data.datamodule import VOCDataModule, class_frequencies
from segx.data.shapes_datamodule import ShapesDataModule
from segx.data.voc import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES, VOC_PALETTE

__all__ = [
    "VOCDataModule", "ShapesDataModule", "class_frequencies", "IGNORE_INDEX", "NUM_CLASSES", "VOC_CLASSES",
    "VOC_PALETTE",
]
