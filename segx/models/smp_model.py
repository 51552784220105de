"""segmentation-models-pytorch networks behind the same contract as the hand-written models.

The wrapper exists for three reasons:

* Every smp architecture except U-Net refuses inputs whose sides are not multiples of its encoder's
  output stride (32 for most, 8 for PSPNet and DeepLabV3, 16 for DeepLabV3+), and PAN needs 8× its
  stride (its feature pyramid attention pools three more times). The study's sizes (64, 96, 128) are
  not all multiples of those for every arch, so inputs are padded on the bottom/right and the logits
  cropped back: the top-left pixel grid, and so every prediction, stays where it was.
* Downloading pretrained encoder weights is the one step that needs the internet, and it happens in one
  small place, `fetch_pretrained`, on global rank 0 only; `train()` calls it before it builds the model.
  Weights missing from the local cache first cost one metadata request to the Hub without retries,
  because the Hub client retries a failed connection five times with back-off (~23 s measured offline)
  and then raises an error that names neither the encoder nor a fix; whatever cannot be had raises
  `ModelWeightsUnavailableError` naming `model.encoder_weights` and the way out. The constructor never
  touches the network: it loads the weights from the local cache or says how to put them there. Nothing
  ever changes huggingface_hub's settings (module globals shared by every thread of the process).
* Hydra passes every key of the config to the constructor, and smp silently drops keyword arguments
  it does not know for its own (non-timm) encoders, so a typo in a decoder option would go unnoticed.
  Unknown options are rejected instead.
"""

from __future__ import annotations

import inspect
import logging
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from segx.core.errors import ConfigError, SegxError

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

# How long the one metadata request before a download may wait for the Hub (a firewall that drops packets).
_PROBE_TIMEOUT_S = 10.0

# Environment variables that carry a process's rank before torch.distributed starts, in the order
# Lightning reads them (torchrun / Lightning's own launcher / SLURM / LSF).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")

_ENCODER_LIST_HINT = (
    "list the valid names with `python -c \"import segmentation_models_pytorch as smp; "
    "print(smp.encoders.get_encoder_names())\"`, or use any timm model as 'tu-<name>' "
    "(`python -c \"import timm; print(timm.list_models())\"`)"
)


class ModelWeightsUnavailableError(SegxError):
    """Pretrained encoder weights were requested but are neither cached locally nor downloadable."""


def _plain(value: Any) -> Any:
    """Hydra hands lists and dicts over as ListConfig/DictConfig; smp expects plain containers."""
    if isinstance(value, ListConfig | DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


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
    than the pad itself.
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
        pretrained = _timm_pretrained_cfg(encoder)
        if encoder_weights is not None and not (getattr(pretrained, "hf_hub_id", None) or
                                                getattr(pretrained, "url", None)):
            raise ConfigError(
                f"timm has no pretrained weights for {encoder[3:]!r} (encoder {encoder!r}); pick a pretrained "
                f"variant (`python -c \"import timm; print(timm.list_pretrained('{encoder[3:].split('.')[0]}*'))\"`) "
                "or set model.encoder_weights=null to train from scratch."
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


def fetch_pretrained(model_cfg: Mapping[str, Any] | DictConfig) -> None:
    """Make sure the pretrained encoder weights an SMPModel config asks for are in the local cache.

    The wrapper's only network access, kept out of the constructor: `train()` calls it before it builds
    the model. A no-op for other models, for `encoder_weights: null`, for weights already cached, and on
    every rank but global rank 0 (see `_global_rank`). Raises `ModelWeightsUnavailableError` when the
    download fails, after one request without retries when the Hub cannot be reached (see `_probe`).
    """
    weights = model_cfg.get("encoder_weights")
    if model_cfg.get("_target_") != _TARGET or weights is None or _global_rank() != 0:
        return
    encoder = str(model_cfg.get("encoder", _DEFAULT_ENCODER))
    _check_encoder(encoder, weights)  # a misspelt name is a ConfigError, not a failed download
    if _local_weights(encoder, weights) is not None:
        return
    log.info("Downloading the pretrained weights of encoder %s (model.encoder_weights=%s)", encoder, weights)
    try:
        _download(encoder, weights)
    except _download_errors() as err:
        raise _unavailable(encoder, weights, _first_line(err)) from err


def _create(arch: str, encoder: str, encoder_weights: Any, kwargs: dict[str, Any]) -> nn.Module:
    """Build the smp model; pretrained weights come from the local cache only, on global rank 0 only."""

    def build(weights: Any, options: dict[str, Any]) -> nn.Module:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=weights, **options)

    if encoder_weights is None:
        return build(None, kwargs)
    rank = _global_rank()
    if rank != 0:
        log.debug("Rank %d builds %s without its pretrained weights: DDP copies rank 0's", rank, encoder)
        return build(None, kwargs)
    path = _local_weights(encoder, encoder_weights)
    if path is None:
        raise _not_cached(encoder, encoder_weights)
    return build(encoder_weights, _from_file(encoder, path, kwargs))


def _global_rank() -> int:
    """This process's rank in a distributed run, read before the process group exists; 0 outside one.

    Other ranks build the same network without pretrained weights: DistributedDataParallel (the
    strategy segx uses for several devices) broadcasts rank 0's parameters and buffers to every rank
    when it wraps the model, so all ranks start from rank 0's pretrained weights, and a cluster of N
    processes makes one download instead of N racing ones into the same cache.
    """
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return int(value)
    return 0


def _from_file(encoder: str, path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor options that keep loading cached weights off the network.

    smp's own encoders pin a commit, so its `hf_hub_download` answers from the cache without a request,
    and torch hub finds timm's URL weights in its checkpoint folder by itself. timm's Hub weights pin
    no commit, so timm would ask the Hub whether its copy is current: it is handed the cached file.
    """
    if not encoder.startswith("tu-") or _hub_files(encoder, True) is None:
        return kwargs
    overlay = {**(kwargs.get("pretrained_cfg_overlay") or {}), "file": path}
    return {**kwargs, "pretrained_cfg_overlay": overlay}


def _local_weights(encoder: str, weights: Any) -> str | None:
    """The cached weights file, or None when it is not cached: file lookups only, never a request."""
    hub_files = _hub_files(encoder, weights)
    if hub_files is not None:
        return _cached(*hub_files)
    path = _torch_hub_file(encoder)[1]
    return path if os.path.isfile(path) else None


def _hub_files(encoder: str, weights: Any) -> tuple[str, str | None, list[tuple[str, ...]]] | None:
    """(repo, revision, file sets) on the Hub: the weights are available when every file of one set is.
    None when they come from elsewhere (a timm model whose weights are a torch-hub URL)."""
    if encoder.startswith("tu-"):
        hub_id = getattr(_timm_pretrained_cfg(encoder), "hf_hub_id", None)
        if not hub_id:
            return None
        repo, _, revision = hub_id.partition("@")
        return repo, revision or None, [("model.safetensors",), ("pytorch_model.bin",)]  # timm tries both
    settings = smp.encoders.encoders[encoder]["pretrained_settings"][weights]
    return settings["repo_id"], settings.get("revision"), [("config.json", "model.safetensors")]


def _timm_pretrained_cfg(encoder: str) -> Any:
    import timm

    return timm.models.get_pretrained_cfg(encoder[3:])


def _torch_hub_file(encoder: str) -> tuple[str, str]:
    """(URL, local path) of a timm model's torch-hub weights: the file torch hub caches the URL as."""
    url = str(getattr(_timm_pretrained_cfg(encoder), "url", "") or "")
    name = os.path.basename(urllib.parse.urlparse(url).path)
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", name)


def _cached(repo: str, revision: str | None, file_sets: list[tuple[str, ...]]) -> str | None:
    """The last file of the first set the Hugging Face cache holds completely, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for names in file_sets:
        paths = [try_to_load_from_cache(repo, name, revision=revision) for name in names]
        if all(isinstance(path, str) for path in paths):
            return paths[-1]
    return None


def _download(encoder: str, weights: Any) -> None:
    """Fetch the weights files into the cache the constructor reads (the Hub's or torch hub's)."""
    hub_files = _hub_files(encoder, weights)
    if hub_files is None:
        url, path = _torch_hub_file(encoder)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, progress=False)  # urllib: no retries, fails fast offline
        return
    _probe(*hub_files)
    _hub_download(*hub_files)


def _probe(repo: str, revision: str | None, file_sets: list[tuple[str, ...]]) -> None:
    """One metadata request for the weights, no retries: raises at once when the Hub cannot be reached."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(repo, file_sets[0][-1], revision=revision), timeout=_PROBE_TIMEOUT_S)
    except EntryNotFoundError:
        pass  # the Hub answered; `_hub_download` tries the other file sets


def _hub_download(repo: str, revision: str | None, file_sets: list[tuple[str, ...]]) -> None:
    """Every file of the first set the repository holds (timm's repositories hold one of two formats)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for index, names in enumerate(file_sets):
        try:
            for name in names:
                hf_hub_download(repo, name, revision=revision)
            return
        except EntryNotFoundError:
            if index == len(file_sets) - 1:
                raise


def _download_errors() -> tuple[type[BaseException], ...]:
    """What a failed download raises: OSError for the Hub's cache misses, HTTP statuses and offline mode and
    for torch hub; the Hub client's own transport errors (no DNS, refused, timed out) derive from the same
    HTTPError base as its status error instead (httpx's or requests', depending on the release)."""
    from huggingface_hub.errors import HfHubHTTPError

    return (OSError, *HfHubHTTPError.__bases__)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _cache_places() -> str:
    from huggingface_hub import constants

    return f"{constants.HF_HUB_CACHE} for the Hugging Face Hub, {torch.hub.get_dir()} for torch hub"


_WAY_OUT = (
    "copy ~/.cache/huggingface and ~/.cache/torch from a machine where they were fetched to the same places "
    "here (or point HF_HOME / TORCH_HOME at such a copy); or set model.encoder_weights=null to train the "
    "encoder from scratch."
)


def _unavailable(encoder: str, encoder_weights: Any, reason: str) -> ModelWeightsUnavailableError:
    """One paragraph: the option, where the weights would be cached, how to put them there, or go without."""
    return ModelWeightsUnavailableError(
        f"model.encoder_weights={encoder_weights!r} needs the pretrained weights of the {encoder!r} encoder, "
        f"but they are not in the local cache ({_cache_places()}) and downloading them failed ({reason}). "
        f"To work offline, run the same command once on a machine with internet access, then {_WAY_OUT}"
    )


def _not_cached(encoder: str, encoder_weights: Any) -> ModelWeightsUnavailableError:
    """The constructor's paragraph: it never downloads, so say who does."""
    return ModelWeightsUnavailableError(
        f"model.encoder_weights={encoder_weights!r} needs the pretrained weights of the {encoder!r} encoder, "
        f"but they are not in the local cache ({_cache_places()}), and building the model never downloads "
        "them: `python train.py` fetches them before it builds the model (when building one by hand, call "
        "`segx.models.smp_model.fetch_pretrained(cfg.model)` first). Without internet access here, "
        f"{_WAY_OUT}"
    )


_TARGET = f"{__name__}.{SMPModel.__qualname__}"
_DEFAULT_ENCODER = inspect.signature(SMPModel.__init__).parameters["encoder"].default

__all__ = ["ARCHITECTURES", "ModelWeightsUnavailableError", "SMPModel", "fetch_pretrained"]
