"""Networks: the study's hand-written models and a wrapper over segmentation-models-pytorch."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segx.core.errors import ConfigError
from segx.models.contract import check_input_size, meta_forward
from segx.models.memory_format import parse_channels_last
from segx.models.unet import UNet

__all__ = [
    "LEGACY_MODEL_KEYS", "RUN_OPTIONS", "UNet", "apply_network_options", "build_network", "check_input_size",
    "forward_flops", "parameter_counts", "run_options",
]

log = logging.getLogger(__name__)

#: The `run` node of conf/train.yaml: how segx runs the network, not how it is built, with its defaults.
RUN_OPTIONS = {"channels_last": "auto", "compile": False, "flush_denormal": True}
#: Run options that checkpoints written before the `run` node kept in their `model` config.
LEGACY_MODEL_KEYS = ("channels_last", "compile")


def run_options(config: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """`channels_last` (auto/true/false), `compile` and `flush_denormal` of a run config's `run` node, with their
    defaults; a run config written before that node existed has them as `model.channels_last`,
    `model.compile` and the top-level `flush_denormal`, which are read instead."""
    run = config.get("run") or {}
    model = config.get("model") or {}
    legacy = {**{key: model[key] for key in LEGACY_MODEL_KEYS if key in model},
              **({"flush_denormal": config["flush_denormal"]} if "flush_denormal" in config else {})}
    options = {key: run.get(key, legacy.get(key, default)) for key, default in RUN_OPTIONS.items()}
    options["channels_last"] = parse_channels_last(options["channels_last"])
    if not isinstance(options["flush_denormal"], bool):
        raise ConfigError(f"run.flush_denormal={options['flush_denormal']!r} must be true or false.")
    if not isinstance(options["compile"], bool):
        options["compile"] = compile_backend(options["compile"])
    return options


def compile_backend(name: Any) -> str:
    """A torch.compile backend named in `run.compile` (true is inductor, the default), checked against the list."""
    from torch._dynamo import list_backends

    known = list_backends(exclude_tags=())
    if not isinstance(name, str) or name not in known:
        raise ConfigError(f"run.compile={name!r} must be true, false or the name of a torch.compile backend: "
                          f"{', '.join(sorted(known))}.")
    return name


def build_network(model_cfg: Mapping[str, Any] | DictConfig, options: Mapping[str, Any] | None = None) -> nn.Module:
    """Instantiate the network a `model` config describes (constructor arguments; the `LEGACY_MODEL_KEYS` of
    older checkpoints' configs are dropped), then apply `options` with `apply_network_options` when given."""
    node = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True)) if isinstance(model_cfg, DictConfig) \
        else OmegaConf.create(dict(model_cfg))
    for key in LEGACY_MODEL_KEYS:
        node.pop(key, None)
    net = instantiate(node)
    return apply_network_options(net, options) if options else net


def apply_network_options(net: nn.Module, options: Mapping[str, Any]) -> nn.Module:
    """`channels_last` (true, not `auto`: see `segx.models.memory_format`) converts the weights' memory format;
    `compile` (true, or a backend's name) compiles the module in place (`nn.Module.compile`), so parameter
    names, and so checkpoints, stay those of the plain network."""
    if options.get("channels_last") is True:
        net = net.to(memory_format=torch.channels_last)
    backend = options.get("compile")
    if backend:
        net.compile(**({"backend": backend} if isinstance(backend, str) else {}))
    return net


def forward_flops(net: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """Forward FLOPs of one image, counted by `torch.utils.flop_counter` on a meta-device copy; 0 when an
    operation has no meta kernel."""
    try:
        return meta_forward(net, image_size, in_channels)[1]
    except NotImplementedError:
        return 0


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Counts as Keras reports them, so they compare with the study's tables: `trainable` is every
    parameter, `total` adds the BatchNorm running mean/variance buffers Keras counts as weights."""
    trainable = sum(p.numel() for p in model.parameters())
    running = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    )
    return {"total": trainable + running, "trainable": trainable}
