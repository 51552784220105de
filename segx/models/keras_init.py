"""Keras' initialisers for the hand-written networks."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

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

