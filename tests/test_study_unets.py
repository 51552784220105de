"""The study's U-Nets: layer order and shapes (exact parameter counts: test_model_contract.py)."""

from __future__ import annotations

import pytest
import torch

from segx.models import UNet, parameter_counts


def test_encoder_uses_conv_relu_batchnorm_and_decoder_has_no_batchnorm() -> None:
    model = UNet(encoder_widths=[4, 8], bottleneck_width=16)
    kinds = [type(m).__name__ for m in model.encoder[0]]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm2d"] * 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoder.modules())


@pytest.mark.parametrize("size", [32, 64])
def test_narrow_unet_returns_logits_of_input_size(size: int) -> None:
    model = UNet(num_classes=21, encoder_widths=[4, 8, 16], bottleneck_width=32)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 21, size, size)
    assert out.min() < 0  # logits, not probabilities
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_input_not_divisible_by_the_pooling_factor_is_a_clear_error() -> None:
    model = UNet(encoder_widths=[4, 8], bottleneck_width=8)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 30, 30))


def test_keras_counts_include_batchnorm_running_statistics() -> None:
    model = UNet(encoder_widths=[4], bottleneck_width=8)
    counts = parameter_counts(model)
    running = 2 * (4 + 4 + 8 + 8)  # two BN layers per block, mean and variance each
    assert counts["total"] - counts["trainable"] == running
