"""The study's FCN: VGG16 blocks 1–4, two "fully connected" convs, one 1×1 classifier, ×16 upsampling.

It is written to reproduce the study's Keras layer table parameter for parameter (34,397,525 with 21
classes at the default widths), so the numbers in the study's comparison tables stay comparable:

* block1 2×64, block2 2×128, block3 3×256, block4 3×512 convs 3×3 'same' + ReLU, each block closed by a
  2×2 max-pool, so the classifier sees a 1/16 map (VGG's block5 is dropped, as in the study);
* `fc1` a 7×7 conv 512→1024 (padding 3 is Keras' 'same' for an odd kernel), `fc2` a 1×1 conv
  1024→1024, both ReLU + dropout; these are VGG's dense layers re-cast as convolutions, which is what
  makes the network fully convolutional;
* a 1×1 conv to the classes and a single ×16 upsampling: FCN-32s style, without skip connections,
  because that is the study's network; a skip-connected FCN-8s would be a different experiment.

There is no BatchNorm anywhere (the study has none), and initialisation is Keras' default (Glorot
uniform, zero bias) for the same reason. The network returns logits: the study's softmax belongs in
the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segx.core.errors import ConfigError
from segx.models.contract import check_divisible
from segx.models.keras_init import glorot, he_normal

UPSAMPLE_MODES = ("bilinear", "nearest")
CLASSIFIER_ACTIVATIONS = (None, "relu")
CLASSIFIER_INITS = {"glorot": glorot, "he_normal": he_normal}


class FCN(nn.Module):
    """VGG-layout FCN; one entry of `widths`/`convs_per_block` per pooled block (so 2**len(widths) stride).

    `upsample_mode="nearest"` reproduces Keras' `UpSampling2D` default; bilinear is the default here
    because blocky ×16 logits cost boundary accuracy for no benefit, and the choice does not change the
    parameter count (the upsampling has no weights in either mode, unlike FCN's learned deconvolution).

    `classifier_activation="relu"` and `classifier_init="he_normal"` are the study's classifier as its code ran it
    (`Conv2D(classes, 1×1, kernel_initializer='he_normal', activation='relu')` before the upsampling and the
    softmax): conf/model/fcn_study.yaml. The defaults (no activation, Glorot) give plain logits.
    """

    pads_input = False  # segx.models.contract: sides must be multiples of size_divisor

    def __init__(
        self,
        num_classes: int = 21,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        convs_per_block: Sequence[int] = (2, 2, 3, 3),
        fc_width: int = 1024,
        fc_kernel: int = 7,
        dropout: float = 0.5,
        upsample_mode: str = "bilinear",
        classifier_activation: str | None = None,
        classifier_init: str = "glorot",
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        convs_per_block = [int(n) for n in convs_per_block]
        if upsample_mode not in UPSAMPLE_MODES:
            raise ConfigError(
                f"FCN upsample_mode must be one of {list(UPSAMPLE_MODES)}, got {upsample_mode!r} "
                "('nearest' is Keras' UpSampling2D default, 'bilinear' gives smoother boundaries)."
            )
        if classifier_activation not in CLASSIFIER_ACTIVATIONS:
            raise ConfigError(
                f"FCN classifier_activation must be null or 'relu', got {classifier_activation!r} ('relu' is the "
                "study's classifier as its code ran it, null gives plain logits)."
            )
        if classifier_init not in CLASSIFIER_INITS:
            raise ConfigError(
                f"FCN classifier_init must be one of {list(CLASSIFIER_INITS)}, got {classifier_init!r} "
                "('he_normal' is the study's classifier, 'glorot' Keras' default)."
            )
        if not widths or len(widths) != len(convs_per_block):
            raise ConfigError(
                f"FCN needs one entry of convs_per_block per entry of widths, got widths={widths} and "
                f"convs_per_block={convs_per_block}"
            )
        if min(widths) < 1 or min(convs_per_block) < 1 or fc_width < 1:
            raise ConfigError(
                f"FCN widths, convs_per_block and fc_width must be positive, got widths={widths}, "
                f"convs_per_block={convs_per_block}, fc_width={fc_width}"
            )
        if fc_kernel < 1 or fc_kernel % 2 == 0:
            # An even kernel has no symmetric 'same' padding in PyTorch; Keras pads it asymmetrically.
            raise ConfigError(f"FCN fc_kernel must be a positive odd number, got {fc_kernel}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"FCN dropout must be in [0, 1), got {dropout}")

        self.upsample_mode = upsample_mode
        self.classifier_activation = classifier_activation
        self.size_divisor = 2 ** len(widths)

        blocks: list[nn.Module] = []
        c_in = int(in_channels)
        for width, n_convs in zip(widths, convs_per_block, strict=True):
            layers: list[nn.Module] = []
            for _ in range(n_convs):
                layers += [glorot(nn.Conv2d(c_in, width, 3, padding=1)), nn.ReLU(inplace=True)]
                c_in = width
            layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        self.fc1 = nn.Sequential(
            glorot(nn.Conv2d(c_in, int(fc_width), int(fc_kernel), padding=int(fc_kernel) // 2)),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),  # element-wise, as Keras' Dropout (not channel-wise Dropout2d)
        )
        self.fc2 = nn.Sequential(
            glorot(nn.Conv2d(int(fc_width), int(fc_width), 1)),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classifier = CLASSIFIER_INITS[classifier_init](nn.Conv2d(int(fc_width), int(num_classes), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's exact size (the interpolation targets H, W, not a fixed ×16)."""
        height, width = x.shape[-2:]
        check_divisible(self, x.shape, f"FCN with {len(self.features)} pooling blocks")
        logits = self.classifier(self.fc2(self.fc1(self.features(x))))
        if self.classifier_activation == "relu":  # the study's: its softmax then sees non-negative scores
            logits = F.relu(logits)
        if self.upsample_mode == "bilinear":
            return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return F.interpolate(logits, size=(height, width), mode="nearest")
