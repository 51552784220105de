"""The study's U-Net family, written to match its Keras layer tables parameter for parameter.

The seed puts BatchNorm *after* the ReLU in every encoder and bottleneck conv and none in the
decoder; that ordering changes both the parameter count and the training dynamics, so it is kept.
Initialisation follows Keras too: `he_normal` for the encoder convs the seed marks so, Glorot
uniform (Keras' default) for the rest, zero biases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segx.core.errors import ConfigError
from segx.models.contract import check_divisible
from segx.models.keras_init import glorot, he_normal, keras_batch_norm


class EncoderBlock(nn.Sequential):
    """Two 3×3 convs, each Conv → ReLU → BatchNorm (the seed's order, not the usual Conv → BN → ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, he_init: bool = True) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            conv = nn.Conv2d(c_in, out_channels, 3, padding=1)
            (he_normal if he_init else glorot)(conv)
            layers += [conv, nn.ReLU(inplace=True), keras_batch_norm(out_channels)]
        super().__init__(*layers)


class DecoderBlock(nn.Module):
    """2×2 stride-2 transposed conv, concatenation with the skip, two plain 3×3 Conv → ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, skip_channels, 2, stride=2)
        self.conv1 = nn.Conv2d(2 * skip_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        for module in (self.up, self.conv1, self.conv2):
            glorot(module)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.up(x), skip], dim=1)
        return self.act(self.conv2(self.act(self.conv1(x))))


class UNet(nn.Module):
    """U-Net with one encoder level per entry of `encoder_widths` and a bottleneck below them.

    `unet` is widths (64, 128, 256, 512) + 1024, `unet_medium` (64, 128, 256) + 512 and `unet_small`
    (64, 128) + 512: exactly the seed's three networks. Inputs must be divisible by 2**len(encoder_widths).
    Returns logits; the seed's softmax belongs in the loss, not the network.
    """

    pads_input = False  # segx.models.contract: sides must be multiples of size_divisor

    def __init__(
        self,
        num_classes: int = 21,
        in_channels: int = 3,
        encoder_widths: Sequence[int] = (64, 128, 256, 512),
        bottleneck_width: int = 1024,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in encoder_widths]
        if not widths or min(widths + [bottleneck_width]) < 1:
            raise ConfigError(f"UNet needs at least one positive encoder width, got encoder_widths={widths}")
        self.size_divisor = 2 ** len(widths)
        self.encoder = nn.ModuleList()
        c_in = in_channels
        for width in widths:
            self.encoder.append(EncoderBlock(c_in, width))
            c_in = width
        self.pool = nn.MaxPool2d(2)
        # The seed gives the bottleneck convs no he_normal initializer, so they get Keras' Glorot default.
        self.bottleneck = EncoderBlock(c_in, int(bottleneck_width), he_init=False)
        self.decoder = nn.ModuleList()
        c_in = int(bottleneck_width)
        for width in reversed(widths):
            self.decoder.append(DecoderBlock(c_in, width, width))
            c_in = width
        self.head = nn.Conv2d(c_in, num_classes, 1)
        glorot(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(self, x.shape, f"UNet with {len(self.encoder)} pooling levels")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            x = block(x, skip)
        return self.head(x)
