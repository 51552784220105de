"""Optimizers with the Keras time-based learning-rate decay the study used."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate

from segx.errors import SegxError


def keras_decay(decay: float) -> Callable[[int], float]:
    """LambdaLR factor for Keras' legacy `decay`: lr_t = lr / (1 + decay · t), t counted in batches."""
    if decay < 0:
        raise SegxError(f"optimizer.decay={decay} must be >= 0 (0 disables the decay).")
    return lambda step: 1.0 / (1.0 + decay * step)


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """`cfg` is an optimizer config (`_target_`, `lr`, its own options) plus `decay`."""
    options = dict(cfg)
    decay = float(options.pop("decay", 0.0))
    if float(options.get("lr", 1.0)) <= 0:
        raise SegxError(f"optimizer.lr={options.get('lr')} must be positive.")
    optimizer = instantiate(options, params=params, _convert_="all")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, keras_decay(decay))
    return optimizer, scheduler
