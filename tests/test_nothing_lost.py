"""Nothing lost: a full disk keeps the last good checkpoint, a run directory has one live owner, a resume of another
network is refused before anything in the folder changes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from segx.core.files import DiskFullError, atomic_path, write_json_atomic
from segx.data.cache import load_or_build
from segx.runs.ownership import OWNER_FILE, RunDirTakenError, claim_run_dir, release_run_dir
from segx.runs.record import read_record
from segx.runs.status import COMPLETED, FAILED
from tests.conftest import QUIET, ROOT, TINY_MODEL, TINY_SHAPES, mounted_tmpfs, run_in_process, shapes_split_files

pytestmark = pytest.mark.slow
TINY_RUN = [*TINY_MODEL, *TINY_SHAPES, *QUIET, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "logger=none"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "small", "size=3M") as mount:
        yield mount


def test_a_cache_that_does_not_fit_is_named_and_leaves_nothing(tmp_path: Path, shapes_root: Path) -> None:
    files = shapes_split_files(shapes_root, "train")
    with mounted_tmpfs(tmp_path / "tiny", "size=64k") as mount:
        with pytest.raises(DiskFullError, match=r"Could not write .*/segx-cache/train-32px-.*\.pt: No space left"):
            load_or_build(mount / "segx-cache", "train", files, 32, num_classes=21)
        assert [p.name for p in (mount / "segx-cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_full_disk_keeps_the_previous_file_and_leaves_no_temp_file(small_disk: Path) -> None:
    target = small_disk / "metrics.json"
    write_json_atomic(target, {"epoch": 1})
    with pytest.raises(DiskFullError) as caught, atomic_path(target) as tmp:
        tmp.write_bytes(os.urandom(4 << 20))  # more than the disk holds
    message = str(caught.value)
    assert f"Could not write {target}: No space left on device" in message
    assert f"mounted at {small_disk}" in message and "free of 3.0 MiB" in message
    assert "the previous version is kept" in message and "hydra.run.dir" in message
    assert read_record(small_disk) == {"epoch": 1}
    assert sorted(p.name for p in small_disk.iterdir()) == ["metrics.json"]


def test_a_full_disk_mid_training_fails_the_run_in_one_paragraph_and_keeps_good_checkpoints(
        small_disk: Path, shapes_root: Path) -> None:
    """The first epoch's best.ckpt and last.ckpt fit (~1.2 MB each), the next checkpoint does not."""
    run_dir = small_disk / "run"
    result = run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, "logger=none", "trainer.max_epochs=5",
                            f"data.root={shapes_root}", "hydra.output_subdir=null", f"hydra.run.dir={run_dir}",
                            check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert "No space left on device on the filesystem mounted at" in output and "free of 3.0 MiB" in output
    record = read_record(run_dir)
    assert record["status"] == FAILED and "Could not write" in record["error"]
    assert "No space left on device" in record["error"]
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert checkpoints and all(p.suffix == ".ckpt" for p in checkpoints), checkpoints  # no temp file left
    for path in checkpoints:
        assert "state_dict" in torch.load(path, map_location="cpu", weights_only=False)  # complete, not truncated


def test_a_run_directory_has_one_live_owner_and_a_killed_one_leaves_it_free(tmp_path: Path) -> None:
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from segx.runs.ownership import claim_run_dir; "
            f"claim_run_dir({str(tmp_path)!r}); print('claimed', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "claimed"
        with pytest.raises(RunDirTakenError) as caught:
            claim_run_dir(tmp_path)
        message = str(caught.value)
        assert f"hydra.run.dir={tmp_path} is in use by another run: pid {owner.pid} on host" in message
        assert "since 20" in message and "another hydra.run.dir" in message
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel dropped the dead process's lock: no stale lock to clean up
        try:
            claim_run_dir(tmp_path)
            break
        except RunDirTakenError:
            assert time.monotonic() < deadline, "the killed owner's lock was not released"
            time.sleep(0.05)
    release_run_dir(tmp_path)
    assert (tmp_path / OWNER_FILE).is_file()


def test_a_second_run_in_a_directory_in_use_is_refused_before_it_writes(shapes_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from segx.runs.ownership import claim_run_dir; "
            f"claim_run_dir({str(run_dir)!r}); print('claimed', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "claimed"
        result = run_in_process("train.py", *TINY_RUN, f"data.root={shapes_root}", "optimizer=sgd",
                                f"hydra.run.dir={run_dir}", check=False)
    finally:
        owner.kill()
        owner.wait()
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output
    assert f"is in use by another run: pid {owner.pid}" in output
    assert sorted(p.name for p in run_dir.iterdir()) == [OWNER_FILE]  # no .hydra/, log, metrics.json


def test_a_resume_of_another_network_is_refused_and_changes_nothing(shapes_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_in_process("train.py", *TINY_RUN, f"data.root={shapes_root}", f"hydra.run.dir={run_dir}")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    record = read_record(run_dir)
    result = run_in_process("train.py", *TINY_RUN, f"data.root={shapes_root}", "model.encoder_widths=[8,16]",
                            "data.image_size=48", "ckpt_path=last", f"hydra.run.dir={run_dir}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output
    assert "was written by a run of another network, classes or image size" in output
    assert "model.encoder_widths: [16, 32] → [8, 16]" in output and "data.image_size: 32 → 48" in output
    assert "nothing in the run directory was changed" in output
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    assert read_record(run_dir) == record


def test_a_resume_with_more_epochs_is_allowed_and_recorded(shapes_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_in_process("train.py", *TINY_RUN, f"data.root={shapes_root}", f"hydra.run.dir={run_dir}")
    run_in_process("train.py", *TINY_RUN, "trainer.max_epochs=2", f"data.root={shapes_root}", "ckpt_path=last",
                   f"hydra.run.dir={run_dir}")  # the later max_epochs wins, as on a command line
    record = read_record(run_dir)
    assert record["status"] == COMPLETED and record["epochs"] == 2
    assert record["resume_changes"] == {"trainer.max_epochs": [1, 2]}
    assert record["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")


def test_a_missing_checkpoint_file_is_one_paragraph(shapes_root: Path, tmp_path: Path) -> None:
    result = run_in_process("train.py", *TINY_RUN, f"data.root={shapes_root}", f"ckpt_path={tmp_path / 'gone.ckpt'}",
                            f"hydra.run.dir={tmp_path / 'run'}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output
    assert f"ckpt_path={tmp_path / 'gone.ckpt'} does not exist" in output
    assert not (tmp_path / "run").exists()
