"""Sliding-window inference: an image at its own size, predicted in overlapping crops whose logits are averaged.

mmsegmentation's `slide` mode: windows of `crop` × `crop` every `stride` pixels, the last row and column moved
back to end at the image's border. Rows of windows are predicted top to bottom and each band of rows is handed
on once no later window reaches it, so what is held grows with the image's width, not its height: one band of
`crop` rows and one batch of windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from segx.core.errors import ConfigError
from segx.models.contract import pads_input, size_divisor, unwrap

if TYPE_CHECKING:
    from segx.inference.predictor import Predictor

INFERENCE_MODES = ("whole", "slide")


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Where the windows along one side of `length` pixels begin: every `stride`, the last one moved back to end
    at the border (a side shorter than `crop` gets one window at 0)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]


@dataclass(frozen=True)
class InferenceMode:
    """How a network sees an image: `whole` (resized to the training size, the default) or `slide` (at its own
    size, in windows of `crop` every `stride` pixels; None: the training size, and two thirds of the crop)."""

    mode: str = "whole"
    crop: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in INFERENCE_MODES:
            raise ConfigError(f"inference.mode={self.mode!r} is not a choice; use whole (each image resized to the "
                              "training size) or slide (windows of inference.crop at the image's own size).")
        for key in ("crop", "stride"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"inference.{key}={value} must be a positive number of pixels, or null for the "
                                  "default (crop: the training data.image_size; stride: two thirds of crop).")

    @property
    def sliding(self) -> bool:
        return self.mode == "slide"

    def window(self, training_size: int) -> tuple[int, int]:
        """(crop, stride) for a network trained at `training_size`."""
        crop = self.crop or int(training_size)
        stride = self.stride or max(1, crop * 2 // 3)
        if stride > crop:
            raise ConfigError(f"inference.stride={stride} is larger than inference.crop={crop}: pixels between the "
                              "windows would get no prediction. Use a stride of at most the crop.")
        return crop, stride


def inference_mode_from_config(cfg: Any) -> InferenceMode:
    """An entry point's `inference.mode`, `inference.crop` and `inference.stride`."""
    node = cfg.get("inference") or {}
    return InferenceMode(str(node.get("mode", "whole")), node.get("crop"), node.get("stride"))


class SlidingWindow:
    """`predictor`'s network over windows of `crop` every `stride` pixels of one uint8 image [3,H,W]."""

    def __init__(self, predictor: Predictor, crop: int, stride: int) -> None:
        divisor = 1 if pads_input(predictor.net) else size_divisor(predictor.net)
        if crop % divisor:
            nearest = max(divisor, round(crop / divisor) * divisor)
            raise ConfigError(f"inference.crop={crop} cannot be used with {type(unwrap(predictor.net)).__name__}: "
                              f"its windows must be a multiple of {divisor} pixels (e.g. inference.crop={nearest}).")
        if not 1 <= stride <= crop:
            raise ConfigError(f"inference.stride={stride} must be from 1 to inference.crop={crop}.")
        self.predictor, self.crop, self.stride = predictor, int(crop), int(stride)

    def _window_logits(self, windows: torch.Tensor) -> torch.Tensor:
        """Logits [N,C,h,w] float32 of uint8 windows [N,3,h,w] (h, w <= crop): normalised, padded to crop × crop
        with zeros (the mean colour after normalisation) as the network may need, and cropped back."""
        height, width = windows.shape[-2:]
        batch = self.predictor.normalize(windows)
        if (height, width) != (self.crop, self.crop):
            batch = F.pad(batch, (0, self.crop - width, 0, self.crop - height))
        return self.predictor.normalized_logits(batch).float()[..., :height, :width]

    @torch.inference_mode()
    def bands(self, image: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, averaged logits [C, rows, W] float32) for consecutive bands of rows, top to bottom."""
        image = image.to(self.predictor.device)
        height, width = image.shape[-2:]
        rows, columns = window_starts(height, self.crop, self.stride), window_starts(width, self.crop, self.stride)
        carried = carried_count = None  # the sums of rows the previous row of windows shares with this one
        for index, top in enumerate(rows):  # `top` is where the previous band ended: rows above it are done
            bottom = min(top + self.crop, height)
            total = count = None
            for first in range(0, len(columns), self.predictor.batch_size):
                lefts = columns[first:first + self.predictor.batch_size]
                logits = self._window_logits(torch.stack([image[:, top:bottom, x:x + self.crop] for x in lefts]))
                if total is None:
                    total = logits.new_zeros((logits.shape[1], bottom - top, width))
                    count = logits.new_zeros((bottom - top, width))
                    if carried is not None:
                        total[:, :carried.shape[1]] = carried
                        count[:carried.shape[1]] = carried_count
                for left, out in zip(lefts, logits, strict=True):
                    total[:, :, left:left + out.shape[-1]] += out
                    count[:, left:left + out.shape[-1]] += 1
                del logits
            assert total is not None and count is not None
            done = (rows[index + 1] if index + 1 < len(rows) else height) - top  # rows no later window reaches
            yield top, total[:, :done].div_(count[:done])
            # a copy of the shared rows, so this band's memory is freed before the next one is allocated
            carried, carried_count = total[:, done:].clone(), count[done:].clone()
            del total, count

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Averaged logits [C,H,W] of the whole image (its size in floats per class; `labels` holds a band)."""
        return torch.cat([band for _, band in self.bands(image)], 1)

    def labels(self, image: torch.Tensor) -> torch.Tensor:
        """Argmax labels [H,W] (uint8 for up to 256 classes), holding only one band of logits at a time."""
        labels: torch.Tensor | None = None
        for first, band in self.bands(image):
            if labels is None:
                dtype = torch.uint8 if band.shape[0] <= 256 else torch.long
                labels = torch.empty(image.shape[-2:], dtype=dtype, device=band.device)
            labels[first:first + band.shape[1]] = band.argmax(0).to(labels.dtype)
        assert labels is not None
        return labels
