"""A sweep stops after its first job on a failure every job would share, and its folder takes the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from segx.runs.overrides import job_count, sweep_axes
from segx.runs.record import read_record
from segx.runs.status import COMPLETED, FAILED
from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, run_in_process

SHORT = [*QUIET, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "logger=none"]


def test_sweep_axes_separate_the_jobs_from_the_settings_they_share() -> None:
    axes, shared = sweep_axes(["model=unet,pspnet", "optimizer.lr=1e-3", "seed=range(1,3)", "hydra.sweep.dir=x",
                               "optimizer.lr=1e-4"])
    assert axes == {"model": ["unet", "pspnet"], "seed": ["1", "2"]}
    assert shared == {"optimizer.lr": "0.0001"}  # the later value wins, written as Hydra normalises it


@pytest.mark.slow
def test_a_missing_dataset_stops_the_sweep_after_one_job_and_the_fix_is_taken_in_the_same_folder(
        shapes_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    common = ["-m", *TINY_MODEL, *SHORT, "optimizer=sgd,adam,adamax", f"hydra.sweep.dir={sweep}"]
    first = run_in_process("train.py", *common, f"data.root={tmp_path / 'no-voc'}", check=False)
    output = first.stdout + first.stderr
    assert first.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert output.count("Pascal VOC 2012 was not found") + output.count("holds no VOCdevkit") == 1, output[-3000:]
    assert "The sweep stops after job 0: it varies no data setting (optimizer)" in output
    assert "2 of its 3 jobs were not started" in output
    assert job_count(sweep) == 3
    assert read_record(sweep / "0")["status"] == FAILED and not (sweep / "1").exists()

    # the fix as an override every job shares: accepted in the same folder, the failed job is run again
    fixed = run_in_process("train.py", *common, *TINY_SHAPES, f"data.root={shapes_root}")
    assert "Continuing the sweep in" in fixed.stdout + fixed.stderr and "data.root" in fixed.stdout + fixed.stderr
    records = [read_record(sweep / str(n)) for n in range(3)]
    assert [r["status"] for r in records] == [COMPLETED] * 3
    assert {f"data.root={shapes_root}"} <= set(records[0]["overrides"])

    # another shared change: the completed jobs are kept, not retrained
    again = run_in_process("train.py", *common, *TINY_SHAPES, f"data.root={shapes_root}", "data.batch_size=4")
    assert (again.stdout + again.stderr).count("completed earlier") == 3
    assert [read_record(sweep / str(n)) for n in range(3)] == records

    # another set of jobs is still refused: its results would mix with these
    other = run_in_process("train.py", *common[:-2], "optimizer=sgd,adam", f"hydra.sweep.dir={sweep}",
                           *TINY_SHAPES, f"data.root={shapes_root}", check=False)
    assert other.returncode == 2 and "already holds a different sweep" in other.stdout + other.stderr


@pytest.mark.slow
def test_a_folder_where_no_job_ran_takes_the_corrected_command(shapes_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    common = ["-m", *TINY_MODEL, *TINY_SHAPES, *SHORT, f"data.root={shapes_root}", f"hydra.sweep.dir={sweep}"]
    mistaken = run_in_process("train.py", *common, "optimizer.lrr=1e-3,1e-4", check=False)
    assert mistaken.returncode != 0 and (sweep / "multirun.yaml").is_file()
    assert not list(sweep.glob("*/metrics.json"))
    corrected = run_in_process("train.py", *common, "optimizer.lr=1e-3,1e-4")
    assert "holds no job yet" in corrected.stdout + corrected.stderr
    assert [read_record(sweep / str(n))["status"] for n in range(2)] == [COMPLETED] * 2
