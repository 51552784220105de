"""Pieces the hand-written networks share: Keras' initialisers and the input-size check."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from segx.core.errors import ConfigError

M = TypeVar("M", bound=nn.Module)


def glorot(module: M) -> M:
    """Keras' default initialiser (Glorot uniform, zero bias), so the study's training dynamics carry over."""
    nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def he_normal(module: M) -> M:
    """Keras' `he_normal`, for the convs the study marked with it (zero bias as in Keras)."""
    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(module.bias)
    return module


def check_input_size(x: torch.Tensor, multiple: int, what: str) -> None:
    """Pooling networks without padding need sides divisible by their total stride; say so plainly."""
    if x.shape[-2] % multiple or x.shape[-1] % multiple:
        raise ConfigError(
            f"{what} needs height and width divisible by {multiple}, got {tuple(x.shape[-2:])}; "
            "choose data.image_size accordingly."
        )
