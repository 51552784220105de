"""Residual U-Net with pre-activation blocks (Zhang, Liu & Wang 2018, "Road extraction by deep residual
U-Net").

Why pre-activation (BN → ReLU → conv, twice, plus an identity shortcut): the sum leaves each block
un-normalised and un-rectified, so the shortcut is a clean identity path from the head back to the
first layer, which is what lets a from-scratch network of this depth train without a pretrained
encoder (He et al. 2016, "Identity mappings in deep residual networks").

Choices that differ from the paper, and why:

* Downsampling is a 2×2 max-pool, as in the study's plain U-Net, not the paper's stride-2 conv, so a
  comparison with `unet_medium` (same widths 64→512) isolates the residual blocks and not a change of
  the pooling as well.
* The first block skips the leading BN → ReLU: rectifying the normalised RGB input would throw away
  half of it. The paper's "input unit" does the same.
* A final BN → ReLU precedes the 1×1 head, because the last residual sum is neither normalised nor
  rectified (standard for pre-activation networks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segx.core.errors import ConfigError
from segx.models.contract import check_divisible


def _init(module: nn.Module) -> None:
    """He-normal convs (every conv here feeds a ReLU via BN), zero biases, unit BN scale."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PreActResBlock(nn.Module):
    """[BN → ReLU →] conv3×3 → BN → ReLU → conv3×3, added to the (projected) input.

    Convs have no bias because a BN follows each one (inside the block or at the next block's entry),
    which would cancel it. The shortcut is a 1×1 conv only when the channel count changes: an
    identity shortcut is free and keeps the gradient path clean.
    """

    def __init__(self, in_channels: int, out_channels: int, preactivate: bool = True) -> None:
        super().__init__()
        self.pre: nn.Module = nn.Identity()
        if preactivate:
            self.pre = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.mid = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The shortcut takes the raw input, not the pre-activated one: that is the identity mapping.
        return self.shortcut(x) + self.conv2(self.mid(self.conv1(self.pre(x))))


class ResUNet(nn.Module):
    """Pre-activation residual U-Net; `widths[:-1]` are the encoder levels, `widths[-1]` the bottleneck.

    The default (64, 128, 256, 512) has the layout and cost order of the study's medium U-Net (encoder
    64→256, bottleneck 512) and 8,045,717 parameters for 21 classes. Inputs must be divisible by
    2**(len(widths) - 1), i.e. 8 by default. Returns logits.
    """

    pads_input = False  # segx.models.contract: sides must be multiples of size_divisor

    def __init__(
        self,
        num_classes: int = 21,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ConfigError(
                "ResUNet needs at least two positive widths (encoder levels + bottleneck), "
                f"got widths={widths}"
            )
        encoder_widths, bottleneck_width = widths[:-1], widths[-1]
        self.size_divisor = 2 ** len(encoder_widths)

        self.encoder = nn.ModuleList()
        c_in = int(in_channels)
        for level, width in enumerate(encoder_widths):
            self.encoder.append(PreActResBlock(c_in, width, preactivate=level > 0))
            c_in = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = PreActResBlock(c_in, bottleneck_width)

        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        c_in = bottleneck_width
        for width in reversed(encoder_widths):
            # The transposed conv halves the channels to the skip's width, as in the plain U-Net, so
            # the concatenation is 2×width and the decoder block's projection shortcut maps it back.
            self.up.append(nn.ConvTranspose2d(c_in, width, 2, stride=2))
            self.decoder.append(PreActResBlock(2 * width, width))
            c_in = width
        self.head = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.Conv2d(c_in, int(num_classes), 1)
        )
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(self, x.shape, f"ResUNet with {len(self.encoder)} pooling levels")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)
