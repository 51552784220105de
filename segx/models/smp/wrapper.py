"""`SMPModel`: segmentation-models-pytorch networks behind the same contract as the hand-written models.

The wrapper exists for three reasons:

* Every smp architecture except U-Net refuses inputs whose sides are not multiples of its encoder's output
  stride (32 for most, 8 for PSPNet and DeepLabV3, 16 for DeepLabV3+), and PAN needs 8× its stride (its
  feature pyramid attention pools three more times). The study's sizes (64, 96, 128) are not all multiples
  of those for every arch, so inputs are padded on the bottom/right and the logits cropped back: the top-left
  pixel grid, and so every prediction, stays where it was (`pads_input` in segx.models.contract).
* Pretrained encoder weights come from the local cache only (`segx.models.smp.weights`): the constructor never
  touches the network.
* Hydra passes every key of the config to the constructor, and smp silently drops keyword arguments it does
  not know for its own (non-timm) encoders, so a typo in a decoder option would go unnoticed. Unknown options
  are rejected instead.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from segx.core.errors import ConfigError
from segx.core.ranks import global_rank
from segx.models.smp.weights import DEFAULT_ENCODER, check_encoder, from_file, local_weights, not_cached

log = logging.getLogger(__name__)

#: Lower-case architecture names `smp.create_model` accepts (read from the installed smp, so a newer
#: release's additions work without a change here). smp 0.6.0: unet, unetplusplus, manet, linknet, fpn,
#: pspnet, deeplabv3, deeplabv3plus, pan, upernet, segformer, dpt.
ARCHITECTURES: tuple[str, ...] = tuple(smp.MODEL_ARCHITECTURES_MAPPING)

# Architectures whose decoder needs more than the encoder's stride: the input must be a multiple of
# encoder.output_stride × this (found by running every arch on odd sizes). PAN's feature pyramid
# attention max-pools the stride-16 map three more times; DPT's fusion stages double the stride-16 ViT
# map and must meet the next one exactly. (DPT also needs a ViT that accepts other sizes than it was
# built for: pass `dynamic_img_size=True`, a timm option.)
_EXTRA_DIVISOR = {"pan": 8, "dpt": 2}

PAD_MODES = ("reflect", "replicate", "constant")


def _plain(value: Any) -> Any:
    """Hydra hands lists and dicts over as ListConfig/DictConfig; smp expects plain containers."""
    if isinstance(value, ListConfig | DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def padding_mode(pad_mode: str, height: int, width: int, pad_h: int, pad_w: int) -> str:
    """The mode `SMPModel` pads with: reflect padding cannot be as wide as the input, so it falls back to
    replicate (for both sides) where a pad reaches the input's size. segx.inference.export traces the same rule."""
    if pad_mode == "reflect" and (pad_h >= height or pad_w >= width):
        return "replicate"
    return pad_mode


class SMPModel(nn.Module):
    """Any smp architecture/encoder pair, mapping [N, in_channels, H, W] to logits [N, num_classes, H, W].

    Any H, W: the input is padded on the bottom/right to a multiple of `size_divisor` and the logits are
    cropped back.

    `encoder_weights=None` (the default) trains from scratch; "imagenet" (or any name smp lists for the
    encoder; for 'tu-' timm encoders any non-null value) loads pretrained weights from the local cache
    on global rank 0 (other ranks receive them from rank 0 when DDP wraps the model). The constructor
    makes no network request: `fetch_pretrained` (which `train()` calls first) puts the weights in the
    cache, and without them the constructor raises `ModelWeightsUnavailableError`. `arch_kwargs` go to
    the smp architecture (e.g. `decoder_channels`, `encoder_depth`, `encoder_output_stride`). `pad_mode`
    fills the padding that makes the input a multiple of `size_divisor`: "reflect" keeps image
    statistics (BatchNorm sees no artificial border) and falls back to "replicate" for inputs smaller
    than the pad itself (`padding_mode`).
    """

    pads_input = True  # segx.models.contract: any size; padded to size_divisor inside

    def __init__(
        self,
        arch: str = "unet",
        encoder: str = DEFAULT_ENCODER,
        encoder_weights: str | None = None,
        num_classes: int = 21,
        in_channels: int = 3,
        pad_mode: str = "reflect",
        **arch_kwargs: Any,
    ) -> None:
        super().__init__()
        arch_key = str(arch).lower()
        if arch_key not in smp.MODEL_ARCHITECTURES_MAPPING:
            raise ConfigError(
                f"Unknown smp architecture {arch!r}; valid names (segmentation-models-pytorch "
                f"{smp.__version__}): {', '.join(ARCHITECTURES)}."
            )
        if pad_mode not in PAD_MODES:
            raise ConfigError(f"SMPModel pad_mode must be one of {list(PAD_MODES)}, got {pad_mode!r}")
        check_encoder(encoder, encoder_weights)
        arch_kwargs = {key: _plain(value) for key, value in arch_kwargs.items()}
        _check_arch_kwargs(arch_key, encoder, arch_kwargs)

        self.arch = arch_key
        self.encoder_name = encoder
        self.pad_mode = pad_mode
        self.model = _create(
            arch_key,
            encoder,
            encoder_weights,
            dict(in_channels=int(in_channels), classes=int(num_classes), **arch_kwargs),
        )
        #: Input sides are padded up to a multiple of this before the smp model sees them.
        self.size_divisor = int(self.model.encoder.output_stride) * _EXTRA_DIVISOR.get(arch_key, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.size_divisor, -width % self.size_divisor
        if not (pad_h or pad_w):
            return self.model(x)
        mode = padding_mode(self.pad_mode, height, width, pad_h, pad_w)
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        return self.model(x)[..., :height, :width]


def _check_arch_kwargs(arch: str, encoder: str, arch_kwargs: dict[str, Any]) -> None:
    """Reject options that would change the output contract or that smp would silently ignore."""
    if arch_kwargs.get("activation") is not None:
        raise ConfigError("SMPModel returns logits; leave `activation` unset (the loss applies the softmax).")
    if arch_kwargs.get("aux_params") is not None:
        raise ConfigError(
            "SMPModel returns one logits tensor; `aux_params` (a classification head) is unsupported."
        )
    if encoder.startswith("tu-"):
        return  # extra keywords are legitimately forwarded to timm.create_model
    accepted = set(inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[arch].__init__).parameters)
    # The wrapper sets these itself (under its own names), so they cannot come in through arch_kwargs.
    accepted -= {"self", "args", "kwargs", "encoder_name", "encoder_weights", "in_channels", "classes",
                 "activation", "aux_params"}
    unknown = sorted(set(arch_kwargs) - accepted)
    if unknown:
        raise ConfigError(f"smp {arch} does not take {unknown}; its options are {sorted(accepted)}.")


def _create(arch: str, encoder: str, encoder_weights: Any, kwargs: dict[str, Any]) -> nn.Module:
    """Build the smp model; pretrained weights come from the local cache only, on global rank 0 only.

    Other ranks build the same network without pretrained weights: DistributedDataParallel (the strategy segx
    uses for several devices) broadcasts rank 0's parameters and buffers to every rank when it wraps the model,
    so all ranks start from rank 0's weights and a cluster of N processes makes one download, not N racing ones.
    """

    def build(weights: Any, options: dict[str, Any]) -> nn.Module:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=weights, **options)

    if encoder_weights is None:
        return build(None, kwargs)
    rank = global_rank()
    if rank != 0:
        log.debug("Rank %d builds %s without its pretrained weights: DDP copies rank 0's", rank, encoder)
        return build(None, kwargs)
    path = local_weights(encoder, encoder_weights)
    if path is None:
        raise not_cached(encoder, encoder_weights)
    return build(encoder_weights, from_file(encoder, path, kwargs))
