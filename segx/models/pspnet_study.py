"""The study's PSPNet exactly as its Keras code builds it (`pspnet(21)` in seed/study-code/master_514_course_project.py,
3,365,781 parameters with 21 classes); segx's own PSPNet is segx.models.pspnet."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segx.core.errors import ConfigError
from segx.models.contract import check_divisible
from segx.models.keras_init import glorot, keras_batch_norm, tf_same_padding


def keras_pool_size(side: int, factor: int) -> int:
    """The study's pool size of one side, `int(np.round(side / factor))` (half to even), at least 1."""
    return max(1, int(np.round(float(side) / factor)))


def keras_same_average_pool(x: torch.Tensor, pool: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """AveragePooling2D(pool, strides=pool, padding='same'): TF pads to a whole number of windows (the odd pixel
    after) and averages the real pixels only. Returns the pooled map and the (top, left) padding."""
    (top, bottom), (left, right) = (tf_same_padding(x.shape[-2], pool[0], pool[0]),
                                    tf_same_padding(x.shape[-1], pool[1], pool[1]))
    if top == bottom == left == right == 0:
        return F.avg_pool2d(x, pool, pool), (0, 0)
    pad = (left, right, top, bottom)
    ones = F.pad(torch.ones(1, 1, *x.shape[-2:], dtype=x.dtype, device=x.device), pad)
    return F.avg_pool2d(F.pad(x, pad), pool, pool) / F.avg_pool2d(ones, pool, pool), (top, left)


class PoolBlock(nn.Module):
    """The study's `pool_block` for one pool factor: 'same' average pooling, conv 1×1 (no bias) → BN → ReLU,
    nearest upsampling by the pool size, cropped back to the input's size where the pooling padded it."""

    def __init__(self, in_channels: int, out_channels: int, pool_factor: int) -> None:
        super().__init__()
        self.pool_factor = int(pool_factor)
        self.conv = glorot(nn.Conv2d(in_channels, out_channels, 1, bias=False))
        self.bn = keras_batch_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pool = (keras_pool_size(height, self.pool_factor), keras_pool_size(width, self.pool_factor))
        pooled, (top, left) = keras_same_average_pool(x, pool)
        y = F.relu(self.bn(self.conv(pooled)))
        y = y.repeat_interleave(pool[0], dim=-2).repeat_interleave(pool[1], dim=-1)  # UpSampling2D(pool)
        return y[..., top:top + height, left:left + width]


class StudyPSPNet(nn.Module):
    """The study's `pspnet(n_classes)` layer for layer:

    * `vanilla_encoder`: per entry of `widths` (five: 1/32), ZeroPadding 1 + conv 3×3 'valid' with bias → BN →
      ReLU → 2×2 max-pool;
    * `pool_block` per pool factor p on that map of side h: 'same' average pooling of size and stride round(h / p)
      (numpy's rounding, each side on its own), conv 1×1 of `pyramid_channels` without bias → BN → ReLU, nearest
      upsampling by the pool size;
    * the map and the pyramid concatenated, conv 1×1 of `pyramid_channels` without bias → BN → ReLU, conv 3×3
      'same' to the classes with bias, nearest upsampling by 2**len(widths): logits constant on 32×32 tiles.

    Keras can build it only where every pool size is at least 1 and divides h: with the study's factors, a 1/32
    map of side 4 or a multiple of 6 (128 px, the study's size, and multiples of 192). Elsewhere segx stays
    sensible instead of refusing: a pool size of 0 becomes 1, and an upsampled branch larger than h is cropped back
    where the 'same' padding had put it. Where Keras can build it, segx computes what Keras does. Returns logits
    (the study's softmax belongs to the loss). Inputs divisible by 2**len(widths).
    """

    pads_input = False  # segx.models.contract: sides must be multiples of size_divisor

    def __init__(
        self,
        num_classes: int = 21,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 256, 256),
        pool_factors: Sequence[int] = (1, 2, 3, 6),
        pyramid_channels: int = 512,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        factors = [int(p) for p in pool_factors]
        if not widths or min(widths) < 1 or pyramid_channels < 1:
            raise ConfigError(f"StudyPSPNet needs at least one positive width and a positive pyramid_channels, got "
                              f"widths={widths}, pyramid_channels={pyramid_channels}")
        if not factors or min(factors) < 1:
            raise ConfigError(f"StudyPSPNet pool_factors must be positive integers, got {factors}")
        self.size_divisor = 2 ** len(widths)
        self.encoder = nn.ModuleList()
        c_in = int(in_channels)
        for width in widths:  # ZeroPadding2D(1) + 'valid' 3×3 conv is padding=1
            self.encoder.append(nn.Sequential(glorot(nn.Conv2d(c_in, width, 3, padding=1)), keras_batch_norm(width),
                                              nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            c_in = width
        self.pyramid = nn.ModuleList(PoolBlock(c_in, int(pyramid_channels), p) for p in factors)
        self.fuse = glorot(nn.Conv2d(c_in + len(factors) * int(pyramid_channels), int(pyramid_channels), 1,
                                     bias=False))
        self.fuse_bn = keras_batch_norm(int(pyramid_channels))
        self.classifier = glorot(nn.Conv2d(int(pyramid_channels), int(num_classes), 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        check_divisible(self, x.shape, f"StudyPSPNet with {len(self.encoder)} pooling stages")
        for stage in self.encoder:
            x = stage(x)
        x = torch.cat([x, *(branch(x) for branch in self.pyramid)], dim=1)
        logits = self.classifier(F.relu(self.fuse_bn(self.fuse(x))))
        return F.interpolate(logits, size=(height, width), mode="nearest")
