"""The debug presets (`debug=fdr|overfit|limit|profiler`) and the optional callbacks (`early_stopping`, `lr_monitor`),
each on data=shapes in seconds."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from segx.runs.record import read_record
from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, run_in_process


def train(shapes_root: Path, *overrides: str, check: bool = True):
    return run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "logger=none",
                          *overrides, check=check)


def test_fdr_runs_one_batch_of_each_and_keeps_its_runs_apart(shapes_root: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train(shapes_root, "debug=fdr")
    [record_file] = (tmp_path / "outputs" / "debug").glob("*/*/metrics.json")  # not among outputs/<date> runs
    record = read_record(record_file.parent)
    assert record["status"] == "completed" and record["epochs"] == 1
    assert not (record_file.parent / "checkpoints" / "best.ckpt").exists()  # fast_dev_run keeps no best


def test_overfit_trains_the_same_batches_and_the_loss_falls_every_epoch(shapes_root: Path, tmp_path: Path) -> None:
    train(shapes_root, "debug=overfit", "trainer.max_epochs=6", f"hydra.run.dir={tmp_path}")
    losses = [h["train/loss"] for h in read_record(tmp_path)["history"]]
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


def test_limit_trains_three_short_epochs(shapes_root: Path, tmp_path: Path) -> None:
    train(shapes_root, "debug=limit", f"hydra.run.dir={tmp_path}")
    assert read_record(tmp_path)["epochs"] == 3
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3 * 4  # limit_train_batches=4


def test_profiler_writes_where_the_time_went(shapes_root: Path, tmp_path: Path) -> None:
    train(shapes_root, "debug=profiler", "trainer.limit_train_batches=3", f"hydra.run.dir={tmp_path}")
    profile = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_epoch" in profile and "Total" in profile and read_record(tmp_path)["epochs"] == 1


def test_early_stopping_ends_a_run_that_stopped_improving_as_completed(shapes_root: Path, tmp_path: Path) -> None:
    # No epoch can improve val/miou by half: the first sets the best, the next one without improvement ends it.
    result = train(shapes_root, "callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=1",
                   "callbacks.early_stopping.min_delta=0.5", "trainer.max_epochs=5", "trainer.limit_train_batches=2",
                   f"hydra.run.dir={tmp_path}")
    record = read_record(tmp_path)
    assert record["status"] == "completed" and record["epochs"] == 2 and record["early_stopped_at_epoch"] == 2
    assert "Early stopping: val/miou did not improve for 1 validations; stopped after epoch 2" in result.stdout


def test_lr_monitor_logs_the_learning_rate_and_needs_a_logger(shapes_root: Path, tmp_path: Path) -> None:
    train(shapes_root, "callbacks=[default,lr_monitor]", "logger=csv", "trainer.max_epochs=1",
          "trainer.limit_train_batches=3", "trainer.log_every_n_steps=1", "optimizer=sgd",
          f"hydra.run.dir={tmp_path / 'csv'}")
    with open(tmp_path / "csv" / "csv" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("lr-SGD")]
    assert len(rows) == 3 and float(rows[0]["lr-SGD"]) == pytest.approx(1e-4)  # one per step
    refused = train(shapes_root, "callbacks=[default,lr_monitor]", "trainer.max_epochs=1",
                    f"hydra.run.dir={tmp_path / 'none'}", check=False)
    assert refused.returncode == 2
    assert "callbacks.lr_monitor logs the learning rate to the logger, but logger=none" in \
        refused.stdout + refused.stderr
