"""The study's ResU-Net exactly as its Keras code builds it (`ResUNet()` in
seed/study-code/master_514_course_project.py, 401,564,629 parameters); segx's own is segx.models.resunet."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segx.core.errors import ConfigError
from segx.models.contract import check_divisible
from segx.models.keras_init import glorot, keras_batch_norm, tf_same_padding

#: The study's `f` list: stem, five stride-2 levels; the bridge runs at the last width.
STUDY_WIDTHS = (64, 128, 256, 512, 1024, 2048)


class SameConv2d(nn.Conv2d):
    """A Conv2d with Keras' padding='same'. At stride 1 that is the symmetric kernel // 2; at stride 2 a 3×3 kernel
    on an even side is padded 0 before and 1 after, where torch's padding=1 would pad 1 on both sides and sample
    other positions. Glorot-uniform weights and zero bias, Keras' defaults."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2 if stride == 1 else 0)
        glorot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            top, bottom = tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
            left, right = tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class ConvBlock(nn.Module):
    """The study's `conv_block`: BN → ReLU → conv 3×3 'same' → Dropout (element-wise, as Keras')."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.bn = keras_batch_norm(in_channels)
        self.conv = SameConv2d(in_channels, out_channels, 3, stride)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.conv(F.relu(self.bn(x))))


class Stem(nn.Module):
    """The study's `stem`: conv 3×3, a conv block, plus a 1×1 conv + BN shortcut of the input."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, 3)
        self.block = ConvBlock(out_channels, out_channels, 1, dropout)
        self.shortcut = SameConv2d(in_channels, out_channels, 1)
        self.shortcut_bn = keras_batch_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.conv(x)) + self.shortcut_bn(self.shortcut(x))


class ResidualBlock(nn.Module):
    """The study's `residual_block`: two conv blocks (the first with the stride), plus a 3×3 conv + BN shortcut
    with the same stride (no ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.block1 = ConvBlock(in_channels, out_channels, stride, dropout)
        self.block2 = ConvBlock(out_channels, out_channels, 1, dropout)
        self.shortcut = SameConv2d(in_channels, out_channels, 3, stride)
        self.shortcut_bn = keras_batch_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_bn(self.shortcut(x)) + self.block2(self.block1(x))


def upsample(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Keras' UpSampling2D (nearest: each value repeated factor × factor times)."""
    return F.interpolate(x, scale_factor=factor, mode="nearest")


class StudyResUNet(nn.Module):
    """The study's `ResUNet()` layer for layer: a stem (conv 3×3, a pre-activation conv block, a 1×1 conv + BN
    shortcut), five stride-2 residual blocks, a bridge of two conv blocks at the last width, four decoder levels
    (×2 nearest upsampling, concatenation with the skip, a residual block) back to the second width, the 1×1 head
    there (at 1/2) and ×2 nearest upsampling, so the logits are constant on 2×2 tiles.

    The Keras code builds a fifth decoder block (`d5`) whose output feeds nothing: it is not part of the Keras model
    and segx does not create it. Keras' defaults throughout: Glorot uniform, zero biases, BatchNorm momentum 0.99
    and epsilon 1e-3, TF's 'same' padding of the strided convs (`SameConv2d`). Returns logits (the study's softmax
    belongs to the loss). Inputs divisible by 32.
    """

    pads_input = False  # segx.models.contract: sides must be multiples of size_divisor

    def __init__(
        self,
        num_classes: int = 21,
        in_channels: int = 3,
        widths: Sequence[int] = STUDY_WIDTHS,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        f = [int(w) for w in widths]
        if len(f) != len(STUDY_WIDTHS) or min(f) < 1:
            raise ConfigError(f"StudyResUNet needs {len(STUDY_WIDTHS)} positive widths (the study's are "
                              f"{list(STUDY_WIDTHS)}), got widths={f}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"StudyResUNet dropout must be in [0, 1), got {dropout}")
        self.size_divisor = 2 ** (len(f) - 1)
        self.stem = Stem(int(in_channels), f[0], dropout)  # e1
        self.encoder = nn.ModuleList(  # e2..e6
            ResidualBlock(f[i - 1], f[i], 2, dropout) for i in range(1, len(f)))
        self.bridge = nn.Sequential(ConvBlock(f[-1], f[-1], 1, dropout), ConvBlock(f[-1], f[-1], 1, dropout))
        # d1..d4: upsampled input concatenated with e5..e2, out to f[5]..f[2]; the study's d5 feeds nothing.
        self.decoder = nn.ModuleList()
        c_in = f[-1]
        for level in range(len(f) - 1, 1, -1):
            self.decoder.append(ResidualBlock(c_in + f[level - 1], f[level], 1, dropout))
            c_in = f[level]
        self.head = SameConv2d(c_in, int(num_classes), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(self, x.shape, "StudyResUNet (five stride-2 levels)")
        skips = [self.stem(x)]
        for block in self.encoder:
            skips.append(block(skips[-1]))
        x = self.bridge(skips.pop())
        for block, skip in zip(self.decoder, reversed(skips[1:]), strict=True):  # e5..e2; e1 would be d5's
            x = block(torch.cat([upsample(x), skip], dim=1))
        return upsample(self.head(x))
