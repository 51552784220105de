"""uint8 images → standardised floats in one fused pass, the same for training, evaluation and prediction."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segx.core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics pretrained encoders expect, and segx's default
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNEL_ORDERS = ("rgb", "bgr")  # bgr: the channels as cv2.imread hands them over (the study's network saw BGR)


class Normalize:
    """`(x / 255 - mean) / std` per channel, computed as one multiply and one add on a float copy.

    Images arrive RGB; `channel_order="bgr"` reverses the channels first, so `mean` and `std` are in the order the
    network sees.

    The per-channel factors are cached per device, so a batch already on the GPU never waits for a copy.
    Feed NCHW batches on the CPU: broadcasting over channels is much slower there in channels_last.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channel_order: str = "rgb") -> None:
        if channel_order not in CHANNEL_ORDERS:
            raise ConfigError(f"data.channel_order={channel_order!r} is not a choice; use rgb (segx's default) or bgr "
                              "(the channels as cv2.imread reads them, the study's).")
        self.channel_order = channel_order
        mean_t = torch.tensor(list(mean), dtype=torch.float64).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float64).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std_t)).float()
        self.shift = (-mean_t / std_t).float()
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self.scale.to(device), self.shift.to(device))
        return self._on[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) [N,C,H,W] → float32 standardised with `mean`/`std`."""
        scale, shift = self._factors(images.device)
        if self.channel_order == "bgr":
            images = images.flip(-3)  # a copy: the cached RGB tensors stay as they are
        return images.to(torch.float32, copy=True).mul_(scale).add_(shift)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_on": {}}  # device copies stay behind when pickled (spawned DDP ranks)
