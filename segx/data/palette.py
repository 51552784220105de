"""The colour map VOC's masks use (bit-interleaved class index), which also colours any dataset given no palette:
light to import (no torch), for predictions and reports as well as the data modules."""

from __future__ import annotations

import numpy as np

IGNORE_COLOUR = (224, 224, 192)  # VOC's cream "void"


def color_map(count: int = 256) -> np.ndarray:
    """uint8 [count, 3]: class i's colour in the VOC colour map (distinct for every index below 256)."""
    palette = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette
