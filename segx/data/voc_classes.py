"""Pascal VOC 2012's class names and colour map: light to import (no torch, no Lightning), for predictions and
reports as well as the data module."""

from __future__ import annotations

import numpy as np

from segx.data.palette import color_map

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)


def voc_palette() -> np.ndarray:
    """The 256×3 colour map VOC masks are stored with, so our PNGs open with the same colours as the official ones
    in any viewer; index 255 is the cream 'void'."""
    return color_map(256)


VOC_PALETTE = voc_palette()
