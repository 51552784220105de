"""Keras' defaults for the hand-written networks: its initialisers, BatchNormalization and 'same' padding."""

from __future__ import annotations

import math
from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def glorot(module: M) -> M:
    """Keras' default initialiser (Glorot uniform, zero bias where the layer has one), so the study's training
    dynamics carry over."""
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def keras_batch_norm(channels: int) -> nn.BatchNorm2d:
    """Keras' BatchNormalization defaults in torch terms (Keras momentum 0.99 is torch's 0.01, epsilon 1e-3)."""
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF's (and Keras') 'same' padding of one side: the total that gives ceil(size / stride) outputs, with the
    odd pixel after (before, after)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


# Keras' TruncatedNormal divides the stddev by this (the stddev of a unit normal cut at ±2) so the cut values
# keep the asked-for spread.
TRUNCATED_STDDEV = 0.87962566103423978


def he_normal(module: M) -> M:
    """Keras' `he_normal`, for the convs the study marked with it: a normal of stddev sqrt(2 / fan_in) / 0.8796
    truncated at two of those stddevs (zero bias as in Keras)."""
    fan_in = module.weight[0].numel()  # in_channels × kernel height × kernel width
    std = math.sqrt(2.0 / fan_in) / TRUNCATED_STDDEV
    nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(module.bias)
    return module

