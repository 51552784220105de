"""Test-time augmentation in the one inference path: flips and scales averaged, as evaluate and predict use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from segx.core.errors import ConfigError
from segx.inference.predictor import Predictor, TestTimeAugmentation, cpu_has_bf16_units
from tests.conftest import run_in_process


class PerPixel(nn.Module):
    """A 1×1 convolution: each pixel's logits depend on that pixel alone, so mirroring commutes with it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LeftRight(nn.Module):
    """Logits that depend on where a pixel is across the image: mirroring does not commute with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, x.shape[-1], device=x.device).expand(x.shape[0], 1, x.shape[-2], -1)
        return torch.cat([ramp, -ramp], dim=1)


IMAGES = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_flip_on_a_network_that_commutes_with_mirroring_equals_one_pass() -> None:
    net = PerPixel()
    single = Predictor(net, channels_last=False).logits(IMAGES)
    flipped = Predictor(net, channels_last=False, tta=TestTimeAugmentation("flip")).logits(IMAGES)
    assert torch.allclose(flipped, single.softmax(1), atol=1e-6)  # the mean of two equal probability maps
    raw = Predictor(net, channels_last=False, tta=TestTimeAugmentation("flip", probabilities=False)).logits(IMAGES)
    assert torch.allclose(raw, single, atol=1e-6)
    one_scale = Predictor(net, channels_last=False, tta=TestTimeAugmentation("ms_flip", scales=(1.0,))).logits(IMAGES)
    assert torch.allclose(one_scale, flipped, atol=1e-6)


def test_flip_averages_the_mirrored_pass_and_scales_come_back_to_the_input_size() -> None:
    flipped = Predictor(LeftRight(), channels_last=False, tta=TestTimeAugmentation("flip", probabilities=False))
    assert torch.allclose(flipped.logits(IMAGES), torch.zeros(2, 2, 16, 24), atol=1e-6)  # ramp + mirrored ramp
    scales = TestTimeAugmentation("ms_flip", scales=(0.5, 1.0, 1.5))
    assert Predictor(PerPixel(), channels_last=False, tta=scales).logits(IMAGES).shape == (2, 4, 16, 24)
    with pytest.raises(ConfigError, match="tta='mirror' is not a choice"):
        TestTimeAugmentation("mirror")
    with pytest.raises(ConfigError, match="at least one positive scale"):
        TestTimeAugmentation("ms_flip", scales=())


def test_evaluate_labels_its_scores_with_the_augmentation(trained_run: Path, tmp_path: Path) -> None:
    import json

    printed = run_in_process("evaluate.py", f"ckpt={trained_run / 'checkpoints' / 'best.ckpt'}", "tta=ms_flip",
                             "tta_scales=[0.75,1.0]", f"hydra.run.dir={tmp_path}").stdout
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["tta"] == "ms+flip" and result["tta_scales"] == [0.75, 1.0] and 0 <= result["miou"] <= 1
    # inference.precision=auto: bf16 on a CPU with bf16 units, and the printed title says so
    bf16 = cpu_has_bf16_units()
    assert result["precision"] == ("bf16-mixed" if bf16 else "32-true")
    assert ("test-time augmentation ms+flip, bf16-mixed" in printed) is bf16
