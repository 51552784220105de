"""Augmentation on whole batches of tensors, on whatever device the batch lives on.

Working per batch after the transfer keeps the data loader a plain index into the cached tensors
(no per-image Python work, no worker processes) and lets a GPU do the resampling.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from segx.core.errors import ConfigError
from segx.data.source import IGNORE_INDEX

OPTIONS = ("hflip", "scale_min", "scale_max")  # the keys of data.augment


class BatchAugment:
    """Random horizontal flip per image and an optional random scale-then-crop per batch.

    Random numbers come from a CPU generator seeded by the run's seed, so the same `seed` gives the
    same augmented batches on any device. Pixels a downscale leaves uncovered get `ignore_index`.
    """

    def __init__(self, hflip: bool = True, scale_min: float = 1.0, scale_max: float = 1.0, seed: int = 0,
                 ignore_index: int = IGNORE_INDEX) -> None:
        if not 0 < scale_min <= scale_max:
            raise ConfigError(
                f"data.augment needs 0 < scale_min <= scale_max, got scale_min={scale_min}, scale_max={scale_max}."
            )
        self.hflip = hflip
        self.scale_min, self.scale_max = float(scale_min), float(scale_max)
        self.ignore_index = int(ignore_index)
        self.generator = torch.Generator().manual_seed(seed)

    def __getstate__(self) -> dict:
        # The generator travels as plain bytes: torch's shared-memory pickling cannot send a Generator to the
        # processes a spawned DDP strategy starts.
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict) -> None:
        generator_state = torch.frombuffer(bytearray(state.pop("generator")), dtype=torch.uint8)
        self.__dict__.update(state)
        self.generator = torch.Generator()
        self.generator.set_state(generator_state)

    def reseed(self, seed: int) -> None:
        """Restart the random stream (each DDP rank takes its own seed)."""
        self.generator.manual_seed(seed)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`images` float [N,C,H,W], `masks` integer [N,H,W]; returns tensors of the same shapes."""
        return self.rescale(*self.flip(images, masks))

    def flip(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The random horizontal flips alone (any dtype, any memory format)."""
        if self.hflip:
            flip = (torch.rand(len(images), generator=self.generator) < 0.5).to(images.device, non_blocking=True)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
        return images, masks

    def rescale(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The random scale-then-crop alone (float images); nothing when scale_min = scale_max = 1."""
        if self.scale_max > self.scale_min or self.scale_min != 1.0:
            images, masks = self._scale_crop(images, masks, *images.shape[-2:])
        return images, masks

    def _scale_crop(
        self, images: torch.Tensor, masks: torch.Tensor, h: int, w: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(1, generator=self.generator).item()
        scale = self.scale_min + u * (self.scale_max - self.scale_min)
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        images = F.interpolate(images, size=(sh, sw), mode="bilinear", align_corners=False, antialias=scale < 1)
        masks = F.interpolate(masks[:, None].float(), size=(sh, sw), mode="nearest-exact")[:, 0].to(masks.dtype)
        if sh < h or sw < w:  # pad bottom/right: padded pixels are ignored by loss and metrics
            pad = (0, max(0, w - sw), 0, max(0, h - sh))
            images = F.pad(images, pad, value=0.0)
            masks = F.pad(masks, pad, value=self.ignore_index)
            sh, sw = images.shape[-2:]
        top = int(torch.randint(0, sh - h + 1, (1,), generator=self.generator))
        left = int(torch.randint(0, sw - w + 1, (1,), generator=self.generator))
        return images[..., top:top + h, left:left + w], masks[..., top:top + h, left:left + w]


def augment_from_config(options: Mapping[str, Any] | None, seed: int, ignore_index: int = IGNORE_INDEX) -> BatchAugment:
    """`BatchAugment` from the `data.augment` node, refusing an unknown key or a value of the wrong kind."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"data.augment has no option {', '.join(unknown)}; its options are {', '.join(OPTIONS)} "
            "(remove the others from the data config or the command line)."
        )
    if "hflip" in options and not isinstance(options["hflip"], bool):
        raise ConfigError(f"data.augment.hflip={options['hflip']!r} must be true or false.")
    for key in ("scale_min", "scale_max"):
        value = options.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"data.augment.{key}={value!r} must be a number (1.0 with the other disables rescaling).")
    return BatchAugment(**options, seed=seed, ignore_index=ignore_index)
