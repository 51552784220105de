"""Pretrained encoder weights for the smp wrapper: which exist, where they are cached, and the one download.

Downloading is the one step that needs the internet, and it happens in `fetch_pretrained`, on global rank 0
only; `train()` calls it before it builds the model, and the constructor only reads the local cache
(`local_weights`). Weights missing from the cache first cost one metadata request to the Hub without retries,
because the Hub client retries a failed connection five times with back-off and then raises an error that
names neither the encoder nor a fix; whatever cannot be had raises `ModelWeightsUnavailableError` naming
`model.encoder_weights` and the way out. Nothing here changes huggingface_hub's settings (module globals shared
by every thread of the process).
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from segx.core.errors import ConfigError, SegxError, first_line
from segx.core.ranks import global_rank

log = logging.getLogger(__name__)

#: The `_target_` names of the wrapper (the package's and its module's): `fetch_pretrained` leaves other models alone.
SMP_TARGETS = ("segx.models.smp.SMPModel", "segx.models.smp.wrapper.SMPModel")
#: The wrapper's default encoder, for configs that leave `encoder` out.
DEFAULT_ENCODER = "resnet34"

# How long the one metadata request before a download may wait for the Hub (a firewall that drops packets).
_PROBE_TIMEOUT_S = 10.0

_ENCODER_LIST_HINT = (
    "list the valid names with `python -c \"import segmentation_models_pytorch as smp; "
    "print(smp.encoders.get_encoder_names())\"`, or use any timm model as 'tu-<name>' "
    "(`python -c \"import timm; print(timm.list_models())\"`)"
)


class ModelWeightsUnavailableError(SegxError):
    """Pretrained encoder weights were requested but are neither cached locally nor downloadable."""


def check_encoder(encoder: str, encoder_weights: Any) -> None:
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
    import segmentation_models_pytorch as smp  # here, not at import: a run of segx's own networks never needs it

    settings = smp.encoders.encoders.get(encoder)
    if settings is None:
        raise ConfigError(f"Unknown smp encoder {encoder!r}; {_ENCODER_LIST_HINT}.")
    if encoder_weights is not None and encoder_weights not in settings["pretrained_settings"]:
        raise ConfigError(
            f"Encoder {encoder!r} has no {encoder_weights!r} weights; available: "
            f"{list(settings['pretrained_settings'])}, or null to train from scratch."
        )


def fetch_pretrained(model_cfg: Mapping[str, Any] | DictConfig) -> None:
    """Make sure the pretrained encoder weights an SMPModel config asks for are in the local cache.

    The wrapper's only network access, kept out of the constructor: `train()` calls it before it builds the
    model. A no-op for other models, for `encoder_weights: null`, for weights already cached, and on every rank
    but global rank 0 (DDP copies rank 0's weights to the others). Raises `ModelWeightsUnavailableError` when
    the download fails, after one request without retries when the Hub cannot be reached (see `_probe`).
    """
    weights = model_cfg.get("encoder_weights")
    if model_cfg.get("_target_") not in SMP_TARGETS or weights is None or global_rank() != 0:
        return
    encoder = str(model_cfg.get("encoder", DEFAULT_ENCODER))
    check_encoder(encoder, weights)  # a misspelt name is a ConfigError, not a failed download
    if local_weights(encoder, weights) is not None:
        return
    log.info("Downloading the pretrained weights of encoder %s (model.encoder_weights=%s)", encoder, weights)
    try:
        _download(encoder, weights)
    except _download_errors() as err:
        raise _unavailable(encoder, weights, f"{type(err).__name__}: {first_line(err)[:200]}") from err


def from_file(encoder: str, path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor options that keep loading cached weights off the network.

    smp's own encoders pin a commit, so its `hf_hub_download` answers from the cache without a request,
    and torch hub finds timm's URL weights in its checkpoint folder by itself. timm's Hub weights pin
    no commit, so timm would ask the Hub whether its copy is current: it is handed the cached file.
    """
    if not encoder.startswith("tu-") or _hub_files(encoder, True) is None:
        return kwargs
    overlay = {**(kwargs.get("pretrained_cfg_overlay") or {}), "file": path}
    return {**kwargs, "pretrained_cfg_overlay": overlay}


def local_weights(encoder: str, weights: Any) -> str | None:
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
    import segmentation_models_pytorch as smp

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


def not_cached(encoder: str, encoder_weights: Any) -> ModelWeightsUnavailableError:
    """The constructor's paragraph: it never downloads, so say who does."""
    return ModelWeightsUnavailableError(
        f"model.encoder_weights={encoder_weights!r} needs the pretrained weights of the {encoder!r} encoder, "
        f"but they are not in the local cache ({_cache_places()}), and building the model never downloads "
        "them: `python train.py` fetches them before it builds the model (when building one by hand, call "
        "`segx.models.smp.fetch_pretrained(cfg.model)` first). Without internet access here, "
        f"{_WAY_OUT}"
    )
