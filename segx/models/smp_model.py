"""segmentation-models-pytorch networks behind the same contract as the hand-written models.

The wrapper exists for three reasons:

* Every smp architecture except U-Net refuses inputs whose sides are not multiples of its encoder's
  output stride (32 for most, 8 for PSPNet and DeepLabV3, 16 for DeepLabV3+), and PAN needs 8× its
  stride (its feature pyramid attention pools three more times). The study's sizes (64, 96, 128) are
  not all multiples of those for every arch, so inputs are padded on the bottom/right and the logits
  cropped back: the top-left pixel grid, and so every prediction, stays where it was.
* Downloading pretrained encoder weights is the one step that needs the internet. smp fetches them
  from the Hugging Face Hub, whose client retries a failed connection five times with back-off
  (~23 s measured offline) before raising an error that names neither the encoder nor a fix. Here
  the local caches are tried first without touching the network, reachability is checked with one
  short request, and what cannot be had raises `ModelWeightsUnavailableError` with the way out.
* Hydra passes every key of the config to the constructor, and smp silently drops keyword arguments
  it does not know for its own (non-timm) encoders, so a typo in a decoder option would go unnoticed.
  Unknown options are rejected instead.
"""

from __future__ import annotations

import contextlib
import inspect
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from segx.errors import ConfigError, SegxError

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

# One short request decides whether a download can succeed; a firewall that drops packets costs this long.
_REACHABILITY_TIMEOUT_S = 5.0

_ENCODER_LIST_HINT = (
    "list the valid names with `python -c \"import segmentation_models_pytorch as smp; "
    "print(smp.encoders.get_encoder_names())\"`, or use any timm model as 'tu-<name>' "
    "(`python -c \"import timm; print(timm.list_models())\"`)"
)


class ModelWeightsUnavailableError(SegxError):
    """Pretrained encoder weights were requested but are neither cached locally nor downloadable."""


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode for the duration of the block only.

    In offline mode `hf_hub_download` answers from the cache or raises at once, without the retries.
    The flag is a module global of huggingface_hub read at call time, so it is restored in `finally`;
    a download running concurrently in another thread would see it for that moment, which is why it
    is set only around a model build, never for the process.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # smp requires huggingface_hub, but stay harmless without it
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _hub_offline_by_user() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _reachable(url: str, timeout: float = _REACHABILITY_TIMEOUT_S) -> bool:
    """One HEAD request, no retries; any HTTP answer counts (the server is there). Honours *_PROXY."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _cache_locations() -> str:
    from huggingface_hub import constants

    return f"{constants.HF_HUB_CACHE} (Hugging Face) and {torch.hub.get_dir()} (torch hub)"


def _plain(value: Any) -> Any:
    """Hydra hands lists and dicts over as ListConfig/DictConfig; smp expects plain containers."""
    if isinstance(value, ListConfig | DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class SMPModel(nn.Module):
    """Any smp architecture/encoder pair, mapping [N, in_channels, H, W] to logits [N, num_classes, H, W].

    Any H, W: the input is padded on the bottom/right to a multiple of `size_divisor` and the logits are
    cropped back.

    `encoder_weights=None` (the default) trains from scratch and needs no network; "imagenet" (or any
    name smp lists for the encoder; for 'tu-' timm encoders any non-null value) loads pretrained
    weights from the local caches or downloads them. `arch_kwargs` go to the smp architecture (e.g.
    `decoder_channels`, `encoder_depth`, `encoder_output_stride`). `pad_mode` fills the padding that
    makes the input a multiple of `size_divisor`: "reflect" keeps image statistics (BatchNorm sees no
    artificial border) and falls back to "replicate" for inputs smaller than the pad itself.
    """

    def __init__(
        self,
        arch: str = "unet",
        encoder: str = "resnet34",
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
        _check_encoder(encoder, encoder_weights)
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
        mode = self.pad_mode
        if mode == "reflect" and (pad_h >= height or pad_w >= width):
            mode = "replicate"  # reflect padding cannot be wider than the input
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        return self.model(x)[..., :height, :width]


def _check_encoder(encoder: str, encoder_weights: Any) -> None:
    """Fail on a misspelt encoder or weights name before anything is built or downloaded."""
    if encoder.startswith("tu-"):
        import timm

        if not timm.is_model(encoder[3:]):
            raise ConfigError(
                f"Unknown timm model {encoder[3:]!r} in encoder {encoder!r}; {_ENCODER_LIST_HINT}."
            )
        return
    settings = smp.encoders.encoders.get(encoder)
    if settings is None:
        raise ConfigError(f"Unknown smp encoder {encoder!r}; {_ENCODER_LIST_HINT}.")
    if encoder_weights is not None and encoder_weights not in settings["pretrained_settings"]:
        raise ConfigError(
            f"Encoder {encoder!r} has no {encoder_weights!r} weights; available: "
            f"{list(settings['pretrained_settings'])}, or null to train from scratch."
        )


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
    """Build the smp model; with weights, cache first, then one reachability check, then the download."""

    def build() -> nn.Module:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=encoder_weights, **kwargs)

    if encoder_weights is None:
        return build()
    try:
        with _hub_offline():
            return build()
    # huggingface_hub's LocalEntryNotFoundError (a FileNotFoundError), torch hub's URLError: both OSError.
    except OSError as err:
        cache_miss = err  # not cached: try the network below

    endpoint = _hub_endpoint()
    if _hub_offline_by_user():
        reason = "HF_HUB_OFFLINE is set, so nothing is downloaded"
    elif not _reachable(endpoint):
        reason = f"{endpoint} cannot be reached from this machine"
    else:
        try:
            return build()
        except OSError as err:
            raise _unavailable(encoder, encoder_weights, f"the download failed ({_first_line(err)})") from err
    raise _unavailable(encoder, encoder_weights, reason) from cache_miss


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _unavailable(encoder: str, encoder_weights: Any, reason: str) -> ModelWeightsUnavailableError:
    # 'tu-' encoders take any non-null value and name their weights in the encoder name itself.
    weights = repr(encoder_weights) if isinstance(encoder_weights, str) else "pretrained"
    return ModelWeightsUnavailableError(
        f"Cannot load the {weights} weights of the {encoder!r} encoder: they are not in the local "
        f"caches ({_cache_locations()}) and {reason}. To work offline, run the same command once on a "
        "machine with internet access and copy its ~/.cache/huggingface and ~/.cache/torch to this machine "
        "(or point HF_HOME / TORCH_HOME at such a copy), or set model.encoder_weights=null to train the "
        "encoder from scratch."
    )


__all__ = ["ARCHITECTURES", "ModelWeightsUnavailableError", "SMPModel"]
