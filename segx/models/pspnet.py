"""PSPNet (Zhao et al. 2017) from scratch: a small dilated ResNet encoder and a pyramid pooling module.

Why this shape:

* The encoder follows the paper's recipe of a ResNet that stops downsampling at 1/8 and dilates the
  remaining stages instead: the pyramid pooling module needs a map large enough for its 6×6 bin to
  mean something (16×16 at the study's 128 px), and dilation keeps the later stages' receptive
  field growing without shrinking the map. `output_stride=16` trades that resolution for ~4× less
  compute in the last stage.
* Post-activation basic blocks (conv → BN → ReLU → conv → BN, + shortcut, ReLU) as in ResNet-18/34,
  the encoders PSPNet is usually built on, with He initialisation since there are no pretrained
  weights to start from.
* The 1-bin (global) pooling branch has no BatchNorm: its map is 1×1, so BatchNorm's batch statistics
  come from N values per channel, very noisy for small batches and an outright error in PyTorch for
  a batch of one in train mode ("Expected more than 1 value per channel"). That branch gets a biased
  1×1 conv + ReLU instead; the other bins keep conv → BN → ReLU as in the paper.
* No auxiliary loss head: the training module computes one loss on one output, and the paper's aux
  loss matters mostly for 100+-layer encoders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segx.core.errors import ConfigError

OUTPUT_STRIDES = (8, 16)


class BasicBlock(nn.Module):
    """ResNet basic block; `stride` 2 downsamples, `dilation` > 1 widens the receptive field instead."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PyramidPooling(nn.Module):
    """Pools the map into b×b bins for each b in `bins`, projects, upsamples and concatenates with it."""

    def __init__(self, in_channels: int, bins: Sequence[int], branch_channels: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList()
        for b in bins:
            if b == 1:
                # No BatchNorm on a 1×1 map (see the module docstring); the conv keeps its bias instead.
                layers: list[nn.Module] = [nn.Conv2d(in_channels, branch_channels, 1), nn.ReLU(inplace=True)]
            else:
                layers = [
                    nn.Conv2d(in_channels, branch_channels, 1, bias=False),
                    nn.BatchNorm2d(branch_channels),
                    nn.ReLU(inplace=True),
                ]
            self.branches.append(nn.Sequential(nn.AdaptiveAvgPool2d(b), *layers))
        self.out_channels = in_channels + len(bins) * branch_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False)
            for branch in self.branches
        ]
        return torch.cat([x, *pooled], dim=1)


class PSPNet(nn.Module):
    """From-scratch PSPNet; `widths[0]` is the stem (at 1/2), each further width one two-block stage.

    With the default four widths and `output_stride=8` the stages run at 1/2, 1/4, 1/8 and 1/8 (the last
    dilated ×2); with 16 at 1/2, 1/4, 1/8, 1/16. Any input size works (the logits are interpolated to
    the exact input size); sizes divisible by `output_stride` avoid rounding in the strided convs.
    Returns logits.
    """

    # segx.models.contract: any size works (the logits are interpolated back to the input size).
    size_divisor = 1
    pads_input = False

    def __init__(
        self,
        num_classes: int = 21,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks_per_stage: int = 2,
        output_stride: int = 8,
        bins: Sequence[int] = (1, 2, 3, 6),
        ppm_channels: int | None = None,
        head_channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        bins = [int(b) for b in bins]
        if output_stride not in OUTPUT_STRIDES:
            raise ConfigError(
                f"PSPNet output_stride must be one of {list(OUTPUT_STRIDES)}, got {output_stride} "
                "(8 is the paper's choice; 16 is cheaper but gives the pyramid a coarser map)."
            )
        if len(widths) < 2 or min(widths) < 1:
            raise ConfigError(f"PSPNet needs a stem width and at least one stage width, got widths={widths}")
        if blocks_per_stage < 1:
            raise ConfigError(f"PSPNet blocks_per_stage must be at least 1, got {blocks_per_stage}")
        if not bins or min(bins) < 1:
            raise ConfigError(f"PSPNet bins must be positive pooled-grid sizes, got bins={bins}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"PSPNet dropout must be in [0, 1), got {dropout}")

        # Stem at 1/2: a strided 3×3 conv then a plain one, cheaper than ResNet's 7×7 + max-pool at
        # 128 px and without discarding the first 1/4 of the resolution before any feature is learned.
        self.stem = nn.Sequential(
            nn.Conv2d(int(in_channels), widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(widths[0], widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        stride, dilation, c_in = 2, 1, widths[0]
        for width in widths[1:]:
            if stride < output_stride:
                stride, block_stride = stride * 2, 2
            else:
                dilation, block_stride = dilation * 2, 1
            blocks = [BasicBlock(c_in, width, block_stride, dilation)]
            blocks += [BasicBlock(width, width, 1, dilation) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.output_stride = stride

        branch_channels = int(ppm_channels) if ppm_channels is not None else max(1, c_in // len(bins))
        self.ppm = PyramidPooling(c_in, bins, branch_channels)
        self.head = nn.Sequential(
            nn.Conv2d(self.ppm.out_channels, int(head_channels), 3, padding=1, bias=False),
            nn.BatchNorm2d(int(head_channels)),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),  # channel-wise, as the paper's dropout before the classifier
            nn.Conv2d(int(head_channels), int(num_classes), 1),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        logits = self.head(self.ppm(self.stages(self.stem(x))))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
