"""Runs that can be trusted: a diverged loss stops the run cleanly, and the same seed gives the same metrics."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from segx.runs.status import FAILED
from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, read_json, run_in_process

CPU = ["trainer.accelerator=cpu", "logger=none"]
STEPS_PER_EPOCH = 96 // 8  # TINY_SHAPES: 96 train images, batches of 8


class PoisonWeightsAt(pl.Callback):
    """Fills the network's first weight with NaN at the first batch of `epoch`: a divergence at a known step
    (used through `+callbacks.poison._target_=tests.test_divergence_and_determinism.PoisonWeightsAt`)."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = int(epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def _assert_stopped_cleanly(result, run_dir: Path) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    record = read_json(run_dir / "metrics.json")
    assert record["status"] == FAILED
    error = record["error"]
    assert error.startswith("The training loss became nan at epoch "), error
    assert error in output  # the same paragraph on the console
    return error


def _finite_weights(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    for name, tensor in checkpoint["state_dict"].items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), f"{path.name}: {name} is not finite"
    return checkpoint


@pytest.mark.slow
def test_a_diverging_learning_rate_stops_the_run_with_where_and_why(tmp_path: Path, shapes_root: Path) -> None:
    # Plain SGD at 1e12 turns the tiny U-Net's loss into NaN at the second batch, every time.
    result = run_in_process(
        "train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, *CPU, f"data.root={shapes_root}", "optimizer=sgd",
        "optimizer.lr=1e12", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path}", check=False,
    )
    error = _assert_stopped_cleanly(result, tmp_path)
    assert re.search(r"at epoch 0, step \d+ \(learning rate 1e\+12;", error), error
    assert "No checkpoint was written before it diverged" in error
    assert "Lower optimizer.lr" in error
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))  # no checkpoint of the NaN state


@pytest.mark.slow
@pytest.mark.parametrize("check_every", ["null", "5"])  # 5: the windowed check a GPU run uses (every 32)
def test_last_ckpt_keeps_the_last_good_epoch(check_every: str, tmp_path: Path, shapes_root: Path) -> None:
    result = run_in_process(
        "train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, *CPU, f"data.root={shapes_root}", "trainer.max_epochs=3",
        "+callbacks.poison._target_=tests.test_divergence_and_determinism.PoisonWeightsAt", "+callbacks.poison.epoch=1",
        f"callbacks.stop_on_nonfinite_loss.check_every_n_steps={check_every}", f"hydra.run.dir={tmp_path}",
        check=False,
    )
    error = _assert_stopped_cleanly(result, tmp_path)
    step = STEPS_PER_EPOCH
    assert f"at epoch 1, step {step} (learning rate 0.0001; batch 0 of the epoch" in error, error
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"{last} keeps the last good state (epoch 0, step {step})" in error, error
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    checkpoint = _finite_weights(last)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, step)
    _finite_weights(last.parent / "best.ckpt")
    history = read_json(tmp_path / "metrics.json")["history"]
    assert [h["epoch"] for h in history] == [0.0]
    assert all(math.isfinite(v) for v in history[0].values())


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path: Path, shapes_root: Path) -> None:
    def train(name: str) -> dict:
        run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, *CPU, f"data.root={shapes_root}", "seed=3",
                        "trainer.max_epochs=2", "run.channels_last=true", f"hydra.run.dir={tmp_path / name}")
        return read_json(tmp_path / name / "metrics.json")

    first, second = train("a"), train("b")  # two processes: the two runs share no state

    def scores(record: dict) -> list[dict]:
        return [{k: v for k, v in h.items() if "second" not in k and "time" not in k} for h in record["history"]]

    assert len(scores(first)) == 2
    assert scores(first) == scores(second)  # every metric of every epoch, bit for bit
    assert first["best_confusion_matrix"] == second["best_confusion_matrix"]


@pytest.mark.slow
def test_a_loss_that_explodes_without_becoming_nan_stops_the_run_too(tmp_path: Path, shapes_root: Path) -> None:
    # Adam at lr=1e3 drives the loss to ~1e31 while it stays finite: the NaN check alone would let it "complete".
    result = run_in_process(
        "train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, *CPU, f"data.root={shapes_root}", "optimizer.lr=1e3",
        "trainer.max_epochs=3", f"hydra.run.dir={tmp_path}", check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    error = read_json(tmp_path / "metrics.json")["error"]
    assert re.match(r"The training loss became [\d.e+]+, over 10000 times its first value [\d.]+ "
                    r"\(callbacks\.stop_on_nonfinite_loss\.max_loss_ratio\) at epoch 0, step \d+", error), error
    assert error in output
