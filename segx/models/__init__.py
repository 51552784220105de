"""Networks: the study's hand-written models and a wrapper over segmentation-models-pytorch."""

from __future__ import annotations

from torch import nn

from segx.models.unet import UNet

__all__ = ["UNet", "parameter_counts"]


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
