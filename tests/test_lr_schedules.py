"""Learning-rate schedules (conf/scheduler/), the new optimizers, and the metric that picks the best epoch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segx.core.errors import ConfigError
from segx.inference.predictor import Predictor
from segx.inference.timing import time_prediction
from segx.training.optim import build_optimizer
from tests.conftest import QUIET, ROOT, TINY_MODEL, TINY_SHAPES, read_json, run_in_process


def config(*overrides: str) -> OmegaConf:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def learning_rates(*overrides: str, steps: int = 100) -> list[float]:
    """The learning rate before each of `steps` optimizer steps."""
    cfg = config(*overrides)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = build_optimizer([param], OmegaConf.to_container(cfg.optimizer),
                                           OmegaConf.to_container(cfg.scheduler), total_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        param.sum().backward()
        optimizer.step()
        scheduler.step()
    return rates


def test_keras_decay_is_the_default_schedule_and_reads_optimizer_decay() -> None:
    rates = learning_rates("optimizer.lr=0.1", "optimizer.decay=0.01")
    assert rates[0] == pytest.approx(0.1) and rates[50] == pytest.approx(0.1 / (1 + 0.01 * 50))


def test_poly_decays_to_zero_with_power_0_9() -> None:
    rates = learning_rates("scheduler=poly", "optimizer.lr=0.1")
    assert rates[0] == pytest.approx(0.1)
    assert rates[50] == pytest.approx(0.1 * (1 - 50 / 100) ** 0.9)
    assert rates[-1] == pytest.approx(0.1 * (1 / 100) ** 0.9)


def test_cosine_warms_up_linearly_then_decays() -> None:
    rates = learning_rates("scheduler=cosine", "scheduler.warmup_fraction=0.1", "optimizer.lr=0.1")
    warmup = rates[:11]
    assert all(b > a for a, b in zip(warmup, warmup[1:], strict=False)) and rates[10] == pytest.approx(0.1)
    decay = rates[10:]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:], strict=False))
    assert rates[-1] < 0.001
    assert rates[55] == pytest.approx(0.1 * (1 + math.cos(math.pi * 45 / 90)) / 2, rel=1e-6)


def test_no_schedule_keeps_the_rate() -> None:
    assert set(learning_rates("scheduler=none", "optimizer.lr=0.05")) == {0.05}


def test_keras_decay_with_another_schedule_is_refused() -> None:
    with pytest.raises(ConfigError, match="optimizer.decay=0.001"):
        learning_rates("scheduler=poly", "optimizer.decay=1e-3")


def test_a_run_of_unknown_length_cannot_use_poly() -> None:
    cfg = config("scheduler=poly")
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        build_optimizer([param], OmegaConf.to_container(cfg.optimizer), OmegaConf.to_container(cfg.scheduler), 0)


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop),
                                       ("nadam", torch.optim.NAdam)])
def test_the_studys_future_optimizers_build(name: str, cls: type) -> None:
    cfg = config(f"optimizer={name}")
    param = torch.nn.Parameter(torch.ones(2))
    optimizer, _ = build_optimizer([param], OmegaConf.to_container(cfg.optimizer))
    assert isinstance(optimizer, cls) and optimizer.param_groups[0]["lr"] == 1e-4
    param.sum().backward()
    optimizer.step()
    assert (param < 1).all()


@pytest.mark.slow
def test_monitor_picks_the_best_checkpoint_and_an_unknown_one_is_refused(shapes_root: Path, tmp_path: Path) -> None:
    assert config("monitor=val/miou_no_bg").callbacks.model_checkpoint.monitor == "val/miou_no_bg"
    run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "optimizer.lr=3e-3",
                    "scheduler=cosine", "trainer.max_epochs=3", "monitor=val/miou_no_bg", "logger=none",
                    f"hydra.run.dir={tmp_path / 'run'}")
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["monitor"] == "val/miou_no_bg"
    assert metrics["best"]["val/miou_no_bg"] == max(h["val/miou_no_bg"] for h in metrics["history"])
    bad = run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}",
                          "monitor=val/loss", f"hydra.run.dir={tmp_path / 'bad'}", check=False)
    assert bad.returncode == 2 and "monitor=val/loss cannot pick the best epoch" in bad.stdout + bad.stderr


def test_prediction_timing_follows_the_protocol() -> None:
    calls = []
    net = torch.nn.Conv2d(3, 21, 1)
    net.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    images = torch.randint(0, 255, (10, 3, 16, 16), dtype=torch.uint8)
    result = time_prediction(Predictor(net, "cpu", batch_size=4), images, passes=3, warmup=2)
    assert calls == [4, 4, 2] * 5  # 2 warm-up + 3 timed passes over the whole split in batches of 4
    assert len(result["predict_pass_seconds"]) == 3 and result["predict_images"] == 10
    assert result["predict_val_seconds"] == pytest.approx(sum(result["predict_pass_seconds"]) / 3)
