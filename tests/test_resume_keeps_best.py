"""A run resumed into a new run directory keeps the best of the whole run: `best` in metrics.json and best.ckpt
name the same epoch (issue 11), whether the previous best checkpoint is still there or gone.

Which epoch is best is fixed, not left to training: after epoch 0, last.ckpt's record of that epoch's score is
raised to a val mIoU no later epoch can beat (the weights are untouched, so best.ckpt holds epoch 0's).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from segx.inference.checkpoint import load_checkpoint
from segx.training.callbacks import RunCheckpoint
from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, read_json, run_in_process

BEST = 1.0  # the highest val mIoU there is: ModelCheckpoint replaces its best only on a strictly higher score


def train(shapes_root: Path, run_dir: Path, epochs: int, *extra: str) -> str:
    result = run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "logger=none",
                             f"trainer.max_epochs={epochs}", f"hydra.run.dir={run_dir}", *extra)
    return result.stdout + result.stderr


def checkpoint_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint{"))


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["state_dict"].keys() == b["state_dict"].keys() and all(
        torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def crown_epoch_zero(last: Path) -> None:
    """Records epoch 0 (the only one so far) as scoring BEST, in RunSummary's history and ModelCheckpoint's state."""
    checkpoint = load_checkpoint(last)
    state, score = checkpoint_state(checkpoint), torch.tensor(BEST)
    state.update(best_model_score=score, current_score=score, kth_value=score,
                 best_k_models={state["best_model_path"]: score})
    checkpoint["callbacks"]["RunSummary"]["history"][0]["val/miou"] = BEST
    torch.save(checkpoint, last)


@pytest.fixture(scope="module")
def run_a(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Epoch 0 (crowned), then resumed in place for epoch 1: best.ckpt is epoch 0, last.ckpt epoch 1."""
    run_dir = tmp_path_factory.mktemp("run_a")
    train(shapes_root, run_dir, 1)
    crown_epoch_zero(run_dir / "checkpoints" / "last.ckpt")
    train(shapes_root, run_dir, 2, "ckpt_path=last")
    return run_dir


@pytest.mark.slow
def test_a_run_resumed_in_place_keeps_its_best(run_a: Path) -> None:
    record = read_json(run_a / "metrics.json")
    assert [int(h["epoch"]) for h in record["history"]] == [0, 1]
    assert record["best"]["epoch"] == 0 and record["best"]["val/miou"] == BEST and "best_since_epoch" not in record
    assert load_checkpoint(run_a / "checkpoints" / "best.ckpt")["epoch"] == 0  # epoch 1 (worse) did not replace it
    assert load_checkpoint(run_a / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert not list((run_a / "checkpoints").glob("*-v*.ckpt"))  # no best-v1.ckpt / last-v1.ckpt beside them


@pytest.mark.slow
def test_a_run_resumed_into_a_new_directory_keeps_the_best_of_the_whole_run(run_a: Path, shapes_root: Path,
                                                                            tmp_path: Path) -> None:
    previous_best = load_checkpoint(run_a / "checkpoints" / "best.ckpt")
    train(shapes_root, tmp_path, 3, f"ckpt_path={run_a / 'checkpoints' / 'last.ckpt'}")
    record = read_json(tmp_path / "metrics.json")
    history = record["history"]
    assert [int(h["epoch"]) for h in history] == [0, 1, 2]  # the epochs before the resume came back
    assert record["best"] == history[0] == max(history, key=lambda h: h["val/miou"])  # the best of the whole run
    assert history[2]["val/miou"] < BEST  # the epoch after the resume was worse ...
    best_path = tmp_path / "checkpoints" / "best.ckpt"
    assert Path(record["best_checkpoint"]) == best_path  # ... and best_checkpoint is in the new run directory,
    best = load_checkpoint(best_path)
    assert best["epoch"] == 0 and same_weights(best, previous_best)  # holding the weights of the best epoch
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 2 and not same_weights(best, last)
    assert checkpoint_state(last)["best_model_path"] == str(best_path)  # a later resume in place keeps it too
    assert (run_a / "checkpoints" / "best.ckpt").is_file()  # the previous run keeps its own


@pytest.mark.slow
def test_without_the_previous_best_file_the_best_restarts_and_still_names_best_checkpoint(
        run_a: Path, shapes_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "copied" / "last.ckpt"  # only last.ckpt was kept, and its best.ckpt was deleted since
    source.parent.mkdir()
    checkpoint = load_checkpoint(run_a / "checkpoints" / "last.ckpt")
    state, gone = checkpoint_state(checkpoint), str(tmp_path / "deleted" / "best.ckpt")
    state.update(best_model_path=gone, kth_best_model_path=gone, best_k_models={gone: torch.tensor(BEST)})
    torch.save(checkpoint, source)
    run_dir = tmp_path / "run"
    output = train(shapes_root, run_dir, 3, f"ckpt_path={source}")
    assert f"{gone}, is gone: best.ckpt and `best` in metrics.json start afresh from epoch 2 (counted from 0" in output
    record = read_json(run_dir / "metrics.json")
    assert [int(h["epoch"]) for h in record["history"]] == [0, 1, 2] and record["history"][0]["val/miou"] == BEST
    assert record["best"]["epoch"] == 2 and record["best_since_epoch"] == 2  # best and best_checkpoint agree
    best = load_checkpoint(Path(record["best_checkpoint"]))
    assert best["epoch"] == 2 and same_weights(best, load_checkpoint(run_dir / "checkpoints" / "last.ckpt"))


def test_carried_best_is_replaced_in_place_only_by_a_higher_score(run_a: Path, tmp_path: Path) -> None:
    callback = RunCheckpoint(dirpath=str(tmp_path), filename="best", monitor="val/miou", mode="max", save_top_k=1,
                             save_last=True, auto_insert_metric_name=False)
    assert callback.state_key.startswith("ModelCheckpoint{")  # checkpoints of plain ModelCheckpoint still resume
    callback.load_state_dict(checkpoint_state(load_checkpoint(run_a / "checkpoints" / "last.ckpt")))
    strategy = SimpleNamespace(broadcast=lambda obj: obj, reduce_boolean_decision=lambda decision, all=True: decision)
    trainer = SimpleNamespace(is_global_zero=True, strategy=strategy, current_epoch=2,
                              ckpt_path=str(run_a / "checkpoints" / "last.ckpt"))
    callback.on_train_start(trainer, None)
    best = os.path.join(str(tmp_path), "best.ckpt")
    assert best == callback.format_checkpoint_name({})  # the name the next best epoch is written to: overwritten
    assert callback.best_k_models == {best: BEST} and callback.kth_best_model_path == best
    assert callback.best_model_path == best and os.path.isfile(best)
    assert callback.last_model_path == os.path.join(str(tmp_path), "last.ckpt")
    assert not callback.check_monitor_top_k(trainer, torch.tensor(BEST))  # a tie keeps the earlier epoch
    assert callback.check_monitor_top_k(trainer, torch.tensor(BEST + 0.5))
