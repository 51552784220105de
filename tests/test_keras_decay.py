"""Keras time decay and optimizer construction from configs (the losses are tested in test_losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segx.core.errors import ConfigError
from segx.training.optim import build_optimizer, keras_decay
from tests.conftest import ROOT


def test_keras_decay_values() -> None:
    factor = keras_decay(1e-3)
    assert factor(0) == 1.0
    assert math.isclose(factor(1000), 0.5)
    assert math.isclose(factor(3000), 0.25)
    assert keras_decay(0.0)(10**6) == 1.0
    with pytest.raises(ConfigError, match="decay"):
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

