"""Runs that are interrupted or resumed: SIGTERM/Ctrl-C save a checkpoint, `ckpt_path=last|auto` resume in place,
and an image size the model cannot take is refused before any data is read."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segx.inference.checkpoint import load_checkpoint
from tests.conftest import QUIET, ROOT, TINY_MODEL, TINY_SHAPES, read_json, run_in_process

EPOCHS = 6
STEPS_PER_EPOCH = 96 // 8


def start_training(run_dir: Path, shapes_root: Path, *extra: str, logger: str = "logger=none") -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train.py"), *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}",
               f"trainer.max_epochs={EPOCHS}", logger, f"hydra.run.dir={run_dir}", *extra]
    # A shell's background jobs (CI) ignore SIGINT, and Python keeps that: give the run the default handling back.
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "training ended before it could be interrupted"


@pytest.mark.slow
@pytest.mark.parametrize("signum, name, tracked", [(signal.SIGTERM, "SIGTERM", True), (signal.SIGINT, "Ctrl-C", False)])
def test_an_interrupted_run_saves_a_checkpoint_and_resumes_in_place(signum: int, name: str, tracked: bool,
                                                                    shapes_root: Path, tmp_path: Path) -> None:
    """With logger=mlflow (the SIGTERM case) the MLflow run ends KILLED, and the resume finishes that same run."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    logger = ["logger=mlflow", f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if tracked else \
        ["logger=none"]
    process = start_training(tmp_path, shapes_root, *logger[1:], logger=logger[0])
    wait_for(last, process)  # written at the end of epoch 0: the signal lands in a later epoch
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    # mid-epoch the state is saved; right as an epoch starts (as it often is here) the epoch before's is kept
    assert f"{name}: saved epoch" in output or f"{name} before the first batch of epoch" in output
    record = read_json(tmp_path / "metrics.json")
    assert record["status"] == "failed" and record["error"].startswith(f"interrupted by {name}")
    saved = load_checkpoint(last)  # complete and loadable, with the state at the signal
    assert saved["global_step"] >= record.get("epochs", 0) * STEPS_PER_EPOCH
    if tracked:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(record["mlflow"]["tracking_uri"])
        killed = client.get_run(record["mlflow"]["run_id"])
        assert killed.info.status == "KILLED" and killed.data.tags["segx.interrupted_by"] == name

    run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}",
                    f"trainer.max_epochs={EPOCHS}", *logger, f"hydra.run.dir={tmp_path}", "ckpt_path=last")
    resumed = read_json(tmp_path / "metrics.json")
    assert resumed["status"] == "completed" and "error" not in resumed and "interrupted_by" not in resumed
    assert [int(h["epoch"]) for h in resumed["history"]] == list(range(EPOCHS))  # every epoch once
    assert resumed["best"]["val/miou"] == max(h["val/miou"] for h in resumed["history"])
    best = load_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert best["epoch"] == int(resumed["best"]["epoch"])  # best.ckpt is the best epoch of the whole run
    if tracked:
        finished = client.get_run(record["mlflow"]["run_id"])
        assert resumed["mlflow"]["run_id"] == killed.info.run_id and finished.info.status == "FINISHED"
        assert finished.data.tags["segx.status"] == "completed" and "segx.interrupted_by" not in finished.data.tags
        assert len(client.get_metric_history(killed.info.run_id, "val/miou")) >= EPOCHS


def test_ctrl_c_before_an_epochs_first_batch_resumes_that_epoch_in_full(shapes_root: Path, tmp_path: Path) -> None:
    """Saved there, the state would resume as an epoch already run: trained on nothing, never validated."""
    common = [*TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "trainer.max_epochs=3", "logger=none",
              "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", f"hydra.run.dir={tmp_path}"]
    interrupted = run_in_process("train.py", *common, "+callbacks.interrupt._target_=tests.crash.CtrlCAtEpochStart",
                                 check=False)
    assert interrupted.returncode == 130
    assert "Ctrl-C before the first batch of epoch 2: keeps the last.ckpt of the epoch before" in \
        interrupted.stdout + interrupted.stderr
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2  # epoch 1's end
    run_in_process("train.py", *common, "+callbacks.interrupt._target_=tests.crash.CtrlCAtEpochStart",
                   "ckpt_path=last")
    history = read_json(tmp_path / "metrics.json")["history"]
    assert [int(h["epoch"]) for h in history] == [0, 1, 2] and all("val/miou" in h for h in history)


@pytest.mark.slow
def test_ckpt_path_auto_starts_fresh_and_last_needs_a_checkpoint(shapes_root: Path, tmp_path: Path) -> None:
    common = [*TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "logger=none", "trainer.max_epochs=1"]
    missing = run_in_process("train.py", *common, f"hydra.run.dir={tmp_path / 'a'}", "ckpt_path=last", check=False)
    assert missing.returncode == 2 and "ckpt_path=last resumes" in missing.stdout + missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
    run_in_process("train.py", *common, f"hydra.run.dir={tmp_path / 'b'}", "ckpt_path=auto")
    assert read_json(tmp_path / "b" / "metrics.json")["epochs"] == 1
    run_in_process("train.py", *common[:-1], "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'b'}",
                    "ckpt_path=auto")
    assert [int(h["epoch"]) for h in read_json(tmp_path / "b" / "metrics.json")["history"]] == [0, 1]


@pytest.mark.slow
def test_an_image_size_the_model_cannot_take_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    root = tmp_path / "fresh"
    result = run_in_process("train.py", "data=shapes", f"data.root={root}", "model=fcn", "data.image_size=40",
                             f"hydra.run.dir={tmp_path / 'run'}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output
    assert "data.image_size=40 cannot be used with model segx.models.fcn.FCN" in output and "divisible by 16" in output
    assert not root.exists()  # the shapes tree was not even generated


@pytest.mark.parametrize("override, code, message", [
    ("model=unett", 1, "Could not find 'model/unett'"),          # Hydra lists the available choices
    ("optimizer.lrr=0.1", 1, "Key 'lrr' is not in struct"),       # a typo'd key
    ("loss=dicee", 1, "Could not find 'loss/dicee'"),
    ("data.batch_size=0", 2, "data.batch_size=0 must be at least 1"),
    ("data.val_batch_size=0", 2, "data.val_batch_size=0 must be at least 1"),
    ("seed=abc", 2, "seed=abc must be a whole number from 0 to 4294967295"),
    ("data.image_size=0", 2, "data.image_size=0 cannot be used with model segx.models.UNet: it must be a positive "
                             "multiple of 4"),
    ("data.image_size=-16", 2, "data.image_size=-16 cannot be used with model segx.models.UNet: it must be a "
                               "positive multiple of 4"),
    ("trainer.max_epochs=0", 2, "trainer.max_epochs=0 trains nothing"),
    pytest.param("trainer=gpu", 2, "trainer.accelerator=gpu (trainer=gpu) asks for a CUDA GPU, but PyTorch sees none",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")),
])
@pytest.mark.slow
def test_a_wrong_name_or_value_is_one_clear_message(override: str, code: int, message: str, shapes_root: Path,
                                                    tmp_path: Path) -> None:
    result = run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", override,
                             f"hydra.run.dir={tmp_path}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == code and message in output and "Traceback" not in output


@pytest.mark.slow
def test_a_run_resumed_at_an_epoch_boundary_has_the_history_of_one_never_interrupted(shapes_root: Path,
                                                                                      tmp_path: Path) -> None:
    """On the CPU, bit for bit: the batch order, the augmentation's random stream and the global generators (dropout)
    carry on from the checkpoint as if the run had never stopped. A network with dropout, flips and rescaling on."""
    common = ["model=pspnet", "model.widths=[8,16,16,16]", "model.head_channels=16", "model.blocks_per_stage=1",
              "model.dropout=0.5", *TINY_SHAPES[:-1],
              "data.batch_size=16", f"data.root={shapes_root}", "trainer.max_epochs=4", "logger=none",
              "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "data.augment.hflip=true",
              "data.augment.scale_min=0.75", "data.augment.scale_max=1.25", "seed=7"]
    run_in_process("train.py", *common, f"hydra.run.dir={tmp_path / 'straight'}")
    resumed = [*common, "+callbacks.interrupt._target_=tests.crash.CtrlCAtEpochStart",
               "+callbacks.interrupt.epoch=2", f"hydra.run.dir={tmp_path / 'resumed'}"]
    assert run_in_process("train.py", *resumed, check=False).returncode == 130
    run_in_process("train.py", *resumed, "ckpt_path=last")

    def history(name: str) -> list[dict]:
        return [{k: v for k, v in h.items() if "second" not in k and "time" not in k}
                for h in read_json(tmp_path / name / "metrics.json")["history"]]

    straight = history("straight")
    assert [h["epoch"] for h in straight] == [0, 1, 2, 3]
    assert history("resumed") == straight  # every metric of every epoch, the two after the resume included
