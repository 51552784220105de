"""Keras time decay, optimizer construction from configs, and the (weighted) cross-entropy losses."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segx.errors import SegxError
from segx.losses import CrossEntropyLoss, WeightedCrossEntropyLoss, build_loss, class_weights
from segx.optim import build_optimizer, keras_decay
from tests.conftest import ROOT


def test_keras_decay_values() -> None:
    factor = keras_decay(1e-3)
    assert factor(0) == 1.0
    assert math.isclose(factor(1000), 0.5)
    assert math.isclose(factor(3000), 0.25)
    assert keras_decay(0.0)(10**6) == 1.0
    with pytest.raises(SegxError, match="decay"):
        keras_decay(-1.0)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD),
                                       ("adamax", torch.optim.Adamax)])
def test_optimizer_configs_build_and_decay_per_step(name: str, cls: type) -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"optimizer={name}", "optimizer.lr=0.01", "optimizer.decay=0.5"])
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer, scheduler = build_optimizer([param], OmegaConf.to_container(cfg.optimizer))
    assert isinstance(optimizer, cls)
    for _ in range(4):
        param.sum().backward()
        optimizer.step()
        scheduler.step()
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.01 / (1 + 0.5 * 4))


def test_class_weight_rules() -> None:
    freq = torch.tensor([0.7, 0.2, 0.1, 0.0])
    neg_log = class_weights(freq, "neg_log")
    assert torch.allclose(neg_log[:3], -torch.log(freq[:3]).float())
    assert neg_log[3] == 0  # absent class: no weight instead of infinity
    inverse = class_weights(freq, "inverse").double()
    assert math.isclose(float((inverse * freq).sum()), 1.0, rel_tol=1e-6)  # average pixel weight 1
    median = class_weights(freq, "median")
    assert math.isclose(float(median[1]), 1.0)  # the median class gets weight 1
    assert median[2] > median[1] > median[0]
    with pytest.raises(SegxError, match="weighting"):
        class_weights(freq, "nope")


def test_losses_ignore_void_and_weight_classes() -> None:
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = 255
    plain = CrossEntropyLoss()(logits, target)
    valid = target != 255
    manual = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    assert torch.allclose(plain, manual)
    freq = torch.tensor([0.6, 0.3, 0.1])
    weighted = WeightedCrossEntropyLoss(freq, "neg_log")(logits, target)
    w = -torch.log(freq)
    per_pixel = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid], reduction="none")
    assert torch.allclose(weighted, (w[target[valid]] * per_pixel).sum() / w[target[valid]].sum())


def test_build_loss_gives_frequencies_only_to_losses_that_take_them() -> None:
    calls = []

    def frequencies() -> torch.Tensor:
        calls.append(1)
        return torch.tensor([0.5, 0.5])

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        ce = compose("train", overrides=["loss=ce"]).loss
        wce = compose("train", overrides=["loss=weighted_ce", "loss.weighting=inverse"]).loss
    assert isinstance(build_loss(ce, frequencies), CrossEntropyLoss) and not calls
    loss = build_loss(wce, frequencies)
    assert isinstance(loss, WeightedCrossEntropyLoss) and calls == [1]
    assert torch.allclose(loss.weight, torch.tensor([1.0, 1.0]))

