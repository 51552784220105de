"""Networks: the study's hand-written models and a wrapper over segmentation-models-pytorch."""

from __future__ import annotations

import copy

import torch
from torch import nn

from segx.errors import ConfigError, find_user_error
from segx.models.unet import UNet

__all__ = ["UNet", "check_input_size", "parameter_counts"]


def check_input_size(net: nn.Module, image_size: int, model_name: str = "the model") -> None:
    """Refuse a `data.image_size` the network cannot take before any data is read: a forward pass of a copy on
    PyTorch's meta device computes shapes only (no arithmetic, no memory for activations)."""
    probe = copy.deepcopy(net).to("meta").eval()
    try:
        with torch.no_grad():
            logits = probe(torch.empty(1, 3, image_size, image_size, device="meta"))
    except NotImplementedError:
        return  # an operation without a meta kernel: the first real forward pass will tell
    except Exception as error:
        reason = str(find_user_error(error) or error).strip()
        if "image_size" not in reason:
            reason += " Choose another data.image_size (the study used 128) or another model."
        raise ConfigError(f"data.image_size={image_size} cannot be used with {model_name}: {reason}") from error
    if tuple(logits.shape[-2:]) != (image_size, image_size):
        raise ConfigError(
            f"{model_name} turns {image_size}×{image_size} images into {tuple(logits.shape[-2:])} logits, not "
            f"{image_size}×{image_size}; choose a data.image_size it maps to itself (the study used 128)."
        )


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
