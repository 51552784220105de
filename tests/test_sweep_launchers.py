"""Sweeps: the Ray GPU launcher with simulated devices, failure isolation, re-runs, submitit, DDP in a sweep."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from hydra_plugins.segx_gpus_launcher.gpus_launcher import fit_to_cluster
from segx.core.errors import ConfigError
from segx.data.augment import BatchAugment
from segx.runs.record import read_record
from segx.runs.status import COMPLETED, FAILED
from segx.training.runtime import resolve_precision, strategy_for_sweep_job
from tests.conftest import QUIET, ROOT, TINY_MODEL, TINY_SHAPES, run_entry_point, run_in_process
from tests.ray_processes import TAG, OwnProcesses, interrupt_sweep, run_sweep

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
# A Ray of the sweep's own, even where $RAY_ADDRESS or a `ray start` on this machine names another one.
OWN_RAY = ["hydra/launcher=gpus", "hydra.launcher.ray.init.address=local"]
SIMULATED_GPUS = [*OWN_RAY, "hydra.launcher.ray.init.num_gpus=2", "hydra.launcher.ray.init.num_cpus=2"]
# The study's U-Net pools 4 times (needs a multiple of 16); unet_small pools twice (a multiple of 4).
FIRST_JOB_FAILS = ["model=unet,unet_small", "data.image_size=40", "data.batch_size=4", *SHORT]


def records(sweep_dir: Path) -> list[dict]:
    return [read_record(d) for d in sorted((p.parent for p in sweep_dir.glob("*/metrics.json")),
                                           key=lambda d: int(d.name))]


def interval(record: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(record["started_at"]), datetime.fromisoformat(record["ended_at"])


def overlap(a: dict, b: dict) -> bool:
    (start_a, end_a), (start_b, end_b) = interval(a), interval(b)
    return start_a < end_b and start_b < end_a


# -- the GPU launcher (Ray) ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """4 jobs on 2 simulated GPUs, on a data root no job has seen yet. Shared: Ray takes seconds to start."""
    sweep_dir = tmp_path_factory.mktemp("ray_sweep")
    data_root = tmp_path_factory.mktemp("fresh_data") / "shapes"
    # A whole epoch (12 batches), not SHORT's 2: jobs of a few seconds, so the two running side by side overlap
    # even when one worker process starts a second later than the other.
    result = run_sweep(*TINY_MODEL, *TINY_SHAPES, "trainer.max_epochs=1", "trainer.limit_val_batches=1",
                       f"data.root={data_root}", "optimizer=sgd,adam", "seed=1,2", *SIMULATED_GPUS,
                       f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return sweep_dir, result


@pytest.mark.slow
def test_gpus_launcher_runs_one_job_per_device_two_at_a_time(ray_sweep: tuple) -> None:
    sweep_dir, _ = ray_sweep
    jobs = records(sweep_dir)
    assert len(jobs) == 4 and all(j["status"] == COMPLETED for j in jobs)
    assert all(j["launcher"] == "gpus" and j["devices"] in ("0", "1") for j in jobs), [j["devices"] for j in jobs]
    assert {j["devices"] for j in jobs} == {"0", "1"}
    for i, a in enumerate(jobs):
        for b in jobs[i + 1:]:
            if a["devices"] == b["devices"]:
                assert not overlap(a, b), f"jobs {a['job']} and {b['job']} shared device {a['devices']}"
    assert any(overlap(a, b) for i, a in enumerate(jobs) for b in jobs[i + 1:]), "no two jobs ran at the same time"


@pytest.mark.slow
def test_every_job_records_its_provenance(ray_sweep: tuple) -> None:
    sweep_dir, _ = ray_sweep
    for number, job in enumerate(records(sweep_dir)):
        assert job["job"] == number and job["host"] and job["precision"] == "32-true"  # auto on a CPU
        start, end = interval(job)
        assert start.tzinfo is not None and start < end
        assert "error" not in job and job["epochs"] == 1
        assert f"seed={1 + number % 2}" in job["overrides"]


@pytest.mark.slow
def test_parallel_jobs_build_the_cache_once_and_log_per_job(ray_sweep: tuple) -> None:
    sweep_dir, result = ray_sweep
    logs = [(sweep_dir / str(n) / "train.log").read_text() for n in range(4)]
    assert sum(log.count("Building the train cache") for log in logs) == 1
    assert sum(log.count("Building the val cache") for log in logs) == 1
    assert all("Epoch 1/1" in log for log in logs)  # each job's own log file has its progress
    output = result.stdout + result.stderr
    for number in range(4):
        assert f"(job {number} pid=" in output  # live lines say which job they come from
    assert "4 jobs, 4 completed, 0 failed" in output


@pytest.mark.slow
def test_gpus_launcher_isolates_a_failed_job_and_files_all_four_in_one_fresh_mlflow_database(
        shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 jobs, two at a time on 2 simulated GPUs, logging to an MLflow database that does not exist yet (parallel
    jobs race on a fresh SQLite file's migrations unless it is created once before they start); job 0 fails."""
    pytest.importorskip("mlflow", reason="the mlflow extra (pip install 'segx[mlflow]') is not installed")
    import mlflow

    database, sweep_dir = tmp_path / "tracking" / "mlflow.db", tmp_path / "sweep"
    result = run_sweep(*TINY_MODEL, *TINY_SHAPES, *QUIET, *SHORT, f"data.root={shapes_root}", "data.batch_size=0,2,4,8",
                       "logger=mlflow", f"logger.tracking_uri=sqlite:///{database}", "logger.experiment_name=sweep",
                       *SIMULATED_GPUS, f"hydra.sweep.dir={sweep_dir}")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    jobs = records(sweep_dir)
    assert [j["status"] for j in jobs] == [FAILED, COMPLETED, COMPLETED, COMPLETED]
    assert "data.batch_size=0 must be at least 1" in jobs[0]["error"] and all(j["epochs"] == 1 for j in jobs[1:])
    assert f"{sweep_dir / '0'}: data.batch_size=0 must be at least 1" in output
    assert output.count("Creating initial MLflow database tables") == 1  # once, by the sweep before its jobs

    client = mlflow.MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("sweep")
    runs = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: int(r.data.tags["segx.job"]))
    assert [r.info.run_id for r in runs] == [j["mlflow"]["run_id"] for j in jobs]
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert "data.batch_size=0 must be at least 1" in runs[0].data.tags["segx.error"]
    assert [r.info.run_name for r in runs] == [f"data.batch_size={n}" for n in (0, 2, 4, 8)]
    assert {r.data.tags["segx.devices"] for r in runs[1:]} <= {"0", "1"}
    assert {r.data.tags["segx.sweep_dir"] for r in runs} == {str(sweep_dir.resolve())}
    assert experiment.creation_time <= min(r.info.start_time for r in runs)
    # README's query: a param filter, ordered by the score
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    found = mlflow.search_runs(experiment_names=["sweep"], order_by=["metrics.`val/miou` DESC"],
                               filter_string="params.model = 'unet_small' and tags.`segx.status` = 'completed'")
    assert sorted(found["params.data.batch_size"]) == ["2", "4", "8"]
    assert list(found["metrics.val/miou"]) == sorted(j["best"]["val/miou"] for j in jobs[1:])[::-1]


@pytest.mark.slow
def test_a_dead_worker_is_retried_and_then_isolated(shapes_root: Path, tmp_path: Path) -> None:
    """Job 0's worker is killed once and the retry finishes it; job 1's is killed on every try. Ray is told there
    is no GPU, so this sweep also checks that the jobs (one GPU each by default) run on CPUs instead of waiting
    forever (one Ray start for both: each costs seconds)."""
    result = run_sweep(
        *TINY_MODEL, *TINY_SHAPES, *QUIET, *SHORT, f"data.root={shapes_root}", *OWN_RAY,
        "hydra.launcher.ray.init.num_gpus=0", "hydra.launcher.ray.init.num_cpus=2",
        "+callbacks.kill._target_=tests.crash.KillOwnProcess", "+callbacks.kill.every_time=false,true",
        "hydra.launcher.ray.remote.max_retries=1", f"hydra.sweep.dir={tmp_path}", timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    retried, dead = records(tmp_path)
    assert retried["status"] == COMPLETED and (tmp_path / "0" / "killed-once").exists()
    assert dead["status"] == FAILED and "worker running job 1 died" in dead["error"]
    assert "retried 1 time(s)" in dead["error"]
    # the console names the job, where it ran and its retry; the final failure is one line
    assert re.search(r"Job 0 lost its worker process on node [0-9a-f]{56} \(host \S+\); Ray said: .* It is queued "
                     r"for retry 1 of 1 \(hydra.launcher.ray.remote.max_retries\): it will start again\.", output), \
        output[-4000:]
    assert output.count("Job 1 failed: The Ray worker running job 1 died") == 1, output[-4000:]
    # each record lists its attempts; the first start is kept, the failure's time is its end only
    assert [a["ended"].split(":")[0] for a in retried["attempts"]] == ["lost its worker", COMPLETED]
    assert retried["started_at"] == retried["attempts"][0]["started_at"]
    assert [a["ended"].split(":")[0] for a in dead["attempts"]] == ["lost its worker", "failed"]
    assert dead["started_at"] < dead["ended_at"]
    assert output.count("The Ray cluster has no GPU (1 node(s), 2 CPU(s)): running the 2 job(s) on CPUs "
                        "instead of hydra.launcher.ray.remote.num_gpus=1 each") == 1
    assert retried["devices"] == "cpu"


@pytest.mark.slow
def test_gpus_launcher_refuses_a_request_no_node_can_hold_before_any_job_starts(tmp_path: Path) -> None:
    result = run_sweep(*TINY_MODEL, *TINY_SHAPES, *QUIET, "seed=1,2", *OWN_RAY, "hydra.launcher.ray.init.num_gpus=1",
                       "hydra.launcher.ray.remote.num_gpus=2", f"hydra.sweep.dir={tmp_path}", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert "Traceback" not in output
    assert ("hydra.launcher.ray.remote.num_gpus=2 asks for 2 GPU(s) per job, but the largest node has 1" in output
            and "set hydra.launcher.ray.remote.num_gpus=1 or less" in output)
    assert "(job 0 pid=" not in output and not list(tmp_path.glob("*/metrics.json"))


@pytest.mark.slow
def test_ctrl_c_of_a_gpus_sweep_records_its_running_jobs_as_interrupted_and_exits_130(shapes_root: Path,
                                                                                    tmp_path: Path) -> None:
    def both_training() -> bool:
        return len([r for r in records(tmp_path) if r and r.get("history")]) >= 2

    result = interrupt_sweep(*TINY_MODEL, *TINY_SHAPES, *QUIET, "logger=none", f"data.root={shapes_root}",
                             "trainer.max_epochs=200", "seed=1,2", *SIMULATED_GPUS, f"hydra.sweep.dir={tmp_path}",
                             ready=both_training)
    output = result.stdout
    assert result.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert "Sweep interrupted by Ctrl-C: 2 running job(s) recorded as interrupted, 0 not started" in output
    for record in records(tmp_path):
        assert record["status"] == FAILED and record["error"].startswith("interrupted by Ctrl-C"), record


@pytest.mark.slow
def test_a_gpus_sweep_without_its_dataset_stops_after_the_first_job(tmp_path: Path) -> None:
    """One job at a time (each asks for both simulated GPUs): job 0 cannot read VOC, so jobs 1 and 2 never run."""
    result = run_sweep(*TINY_MODEL, *QUIET, *SHORT, f"data.root={tmp_path / 'no-voc'}", "optimizer=sgd,adam,adamax",
                       *SIMULATED_GPUS, "hydra.launcher.ray.remote.num_gpus=2", f"hydra.sweep.dir={tmp_path / 's'}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert "Traceback" not in output
    assert ("The sweep stops after job 0: it varies no data setting (optimizer), so every job would fail the same "
            "way; 2 job(s) were not started and 0 running job(s) were stopped") in output
    assert output.count("holds no VOCdevkit") + output.count("Pascal VOC 2012 was not found") == 1, output[-4000:]
    assert read_record(tmp_path / "s" / "0")["status"] == FAILED
    assert not list((tmp_path / "s").glob("[12]/metrics.json"))


def test_a_ray_started_without_its_dashboard_collects_no_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra_plugins.segx_gpus_launcher.gpus_launcher import skip_ray_metrics

    monkeypatch.delenv("RAY_enable_metrics_collection", raising=False)
    skip_ray_metrics({"include_dashboard": True})
    assert "RAY_enable_metrics_collection" not in os.environ  # the dashboard shows them: kept
    skip_ray_metrics({"include_dashboard": False})
    assert os.environ["RAY_enable_metrics_collection"] == "0"
    monkeypatch.setenv("RAY_enable_metrics_collection", "1")
    skip_ray_metrics({})
    assert os.environ["RAY_enable_metrics_collection"] == "1"  # a user's own setting wins


def test_job_requests_are_fitted_to_the_nodes_or_refused() -> None:
    one_gpu = [{"CPU": 2.0, "GPU": 1.0, "memory": 1e9}]
    assert fit_to_cluster({"num_gpus": 0.5, "num_cpus": 1}, one_gpu, jobs=4) == ({"num_gpus": 0.5, "num_cpus": 1}, None)
    fitted, note = fit_to_cluster({"num_gpus": 1, "max_retries": 3}, [{"CPU": 8.0}, {"CPU": 4.0}], jobs=3)
    assert fitted == {"num_gpus": 0, "max_retries": 3}
    assert note == ("The Ray cluster has no GPU (2 node(s), 12 CPU(s)): running the 3 job(s) on CPUs instead of "
                    "hydra.launcher.ray.remote.num_gpus=1 each")
    with pytest.raises(ConfigError, match=r"num_cpus=4 asks for 4 CPU\(s\) per job, but the largest node has 2"):
        fit_to_cluster({"num_gpus": 1, "num_cpus": 4}, one_gpu, jobs=1)
    with pytest.raises(ConfigError, match="no single node has all of it at once"):  # CPUs here, GPUs there
        fit_to_cluster({"num_gpus": 1, "num_cpus": 4}, [{"CPU": 8.0}, {"CPU": 2.0, "GPU": 4.0}], jobs=1)
    with pytest.raises(ConfigError, match=r"drop hydra\.launcher\.ray\.remote\.resources\.tpu=1"):
        fit_to_cluster({"num_gpus": 0, "resources": {"tpu": 1}}, one_gpu, jobs=1)


def test_the_leftover_check_sees_the_tests_own_processes_and_no_others() -> None:
    """A survivor the test started fails the check, even one whose environment lost the tag (as a renamed Ray
    agent's does); another process that looks like Ray (`ray::...`) does not."""
    own, sleep = OwnProcesses(uuid.uuid4().hex), "import time; time.sleep(60)"
    spawn_untagged = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleep!r}], env={{}}); " \
                     "time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", spawn_untagged], env={**os.environ, TAG: own.tag})
    other = subprocess.Popen([sys.executable, "-c", sleep, "ray::IDLE"],
                             env={k: v for k, v in os.environ.items() if k != TAG})
    try:
        deadline = time.monotonic() + 20
        while len(own.alive()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the parent's environment is readable and its child started
        [child] = set(own.alive()) - {parent.pid}
        parent.kill()
        parent.wait()
        with pytest.raises(pytest.fail.Exception, match=f"still running after it ended: {{{child}: "):
            own.wait_until_gone(timeout=0.5)
        own.wait_until_gone(timeout=5)  # the failed check killed the child
        assert other.poll() is None  # not the test's: left alone
    finally:
        for process in (parent, other):
            process.kill()
            process.wait()


# -- the basic launcher and re-runs ------------------------------------------------------------------------------

@pytest.mark.slow
def test_basic_launcher_isolates_a_failed_job_and_a_rerun_skips_the_completed_one(shapes_root: Path,
                                                                                  tmp_path: Path) -> None:
    command = ["train.py", "-m", *TINY_SHAPES, *QUIET, *FIRST_JOB_FAILS, f"data.root={shapes_root}",
               f"hydra.sweep.dir={tmp_path}"]
    first = run_in_process(*command, check=False)
    assert first.returncode == 1
    assert "Traceback" not in first.stderr
    failed, completed = records(tmp_path)
    assert failed["status"] == FAILED and "divisible by 16" in failed["error"]
    assert completed["status"] == COMPLETED

    again = run_in_process(*command, check=False)
    assert again.returncode == 1
    assert "Job 1 completed earlier" in again.stdout + again.stderr
    failed_again, skipped = records(tmp_path)
    assert skipped == completed  # not retrained, not rewritten
    # the failed job ran again: a second attempt, its first start kept
    assert failed_again["status"] == FAILED and failed_again["started_at"] == failed["started_at"]
    assert [a["started_at"] for a in failed_again["attempts"]][0] == failed["started_at"]
    assert len(failed_again["attempts"]) == 2 and failed_again["attempts"][1]["ended"].startswith("failed: ")

    other = run_in_process(*command, "seed=3,4", check=False)  # another axis: another set of jobs
    assert other.returncode == 2 and "already holds a different sweep" in other.stdout + other.stderr
    assert records(tmp_path) == [failed_again, skipped]


@pytest.mark.slow
def test_a_single_run_with_a_user_error_is_one_paragraph_and_exit_2(shapes_root: Path, tmp_path: Path) -> None:
    result = run_in_process("train.py", *TINY_SHAPES, *QUIET, "model=unet", "data.image_size=40",
                             f"data.root={shapes_root}", f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "divisible by 16" in result.stdout + result.stderr
    record = read_record(tmp_path)
    assert record["status"] == FAILED and record["job"] is None and record["devices"] == "cpu"


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_interrupted_job_from_last_ckpt(shapes_root: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "-m", *TINY_MODEL, *TINY_SHAPES, *QUIET,
               f"data.root={shapes_root}", "trainer.max_epochs=15", "trainer.limit_train_batches=3", "seed=5",
               "logger=none", f"hydra.sweep.dir={tmp_path}"]
    last = tmp_path / "0" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        def epochs_done() -> int:
            return (read_record(tmp_path / "0") or {}).get("epochs", 0) if last.exists() else 0

        while epochs_done() < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # killed a few epochs in, whatever this machine's speed: 13 epochs are still to go
        assert process.poll() is None, "the sweep ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed = read_record(tmp_path / "0")
    assert killed["status"] == "running" and 1 <= killed["epochs"] < 15

    result = run_in_process("train.py", *command[2:])
    assert re.search(r"Job \d resumes after epoch \d+ from \S+last.ckpt \(attempt 2, status was running\)",
                     result.stdout + result.stderr), result.stdout[-3000:]
    [resumed] = records(tmp_path)
    assert resumed["status"] == COMPLETED
    # the first start is kept; the killed attempt is said to have ended without a word, the second to complete
    killed_attempt, last_attempt = resumed["attempts"]
    assert resumed["started_at"] == killed["started_at"] == killed_attempt["started_at"]
    assert killed_attempt["ended"].startswith("its process ended without recording how") and "ended_at" not in \
        killed_attempt
    assert (last_attempt["ended"], last_attempt["from_epoch"]) == (COMPLETED, killed["epochs"])
    assert [int(h["epoch"]) for h in resumed["history"]] == list(range(15))
    # the epochs before the kill came back from the checkpoint with their scores
    assert [h["val/miou"] for h in resumed["history"][: killed["epochs"]]] == [h["val/miou"] for h in killed["history"]]


# -- other launchers and configs ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(shapes_root: Path, tmp_path: Path) -> None:
    """Its jobs run side by side in processes of their own, logging to one fresh MLflow database."""
    pytest.importorskip("mlflow", reason="the mlflow extra (pip install 'segx[mlflow]') is not installed")
    from mlflow.tracking import MlflowClient

    database = tmp_path / "tracking" / "mlflow.db"
    result = run_entry_point("train.py", "-m", *TINY_MODEL, *TINY_SHAPES, *QUIET, *SHORT, f"data.root={shapes_root}",
                             "seed=1,2", "hydra/launcher=submitit_local", "logger=mlflow",
                             f"logger.tracking_uri=sqlite:///{database}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    jobs = records(tmp_path / "sweep")
    assert [j["status"] for j in jobs] == [COMPLETED, COMPLETED]
    assert {j["launcher"] for j in jobs} == {"submitit_local"}
    assert "2 jobs, 2 completed, 0 failed" in result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{database}")
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(j["mlflow"]["run_id"] for j in jobs)
    assert {r.info.status for r in runs} == {"FINISHED"} and {r.data.tags["segx.launcher"] for r in runs} == \
        {"submitit_local"}


def test_launcher_configs_compose_with_their_documented_keys() -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        gpus = compose("train", overrides=["hydra/launcher=gpus", "hydra.launcher.ray.init.num_gpus=4"],
                       return_hydra_config=True).hydra.launcher
        slurm = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True).hydra.launcher
    assert gpus._target_.endswith("GpuLauncher")
    assert gpus.ray.init.num_gpus == 4 and gpus.ray.init.address is None
    assert gpus.ray.init.include_dashboard is False
    assert gpus.ray.remote.num_gpus == 1 and gpus.ray.remote.max_retries >= 1
    assert gpus.check_resources is True
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.partition == "gpu" and slurm.gpus_per_node == 1 and slurm.tasks_per_node == 1
    assert {"timeout_min", "cpus_per_task", "mem_gb"} <= set(slurm)


# -- DDP inside and outside sweeps -------------------------------------------------------------------------------

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1", "logger=none"]


@pytest.fixture(scope="module")
def odd_val_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """13 val images: a padding sampler would give one of 2 ranks a repeated image."""
    from segx.data.shapes import write_shapes_dataset
    from segx.data.shapes_datamodule import ShapesDataModule

    root = tmp_path_factory.mktemp("odd_val")
    write_shapes_dataset(root, num_train=16, num_val=13, seed=0, min_size=48, max_size=80)
    data = ShapesDataModule(root=str(root), num_train=16, num_val=13, min_size=48, max_size=80, image_size=32)
    masks = data.load_split("val").masks
    return root, int((masks != 255).sum())


def ddp_overrides(root: Path) -> list[str]:
    """A 2-rank gloo run with the shipped callbacks, progress bar included: rank 0's bar reads the epoch's logged
    values while the other ranks are in the module's hooks, the deadlock users met."""
    return [*TINY_MODEL, *DDP, "data=shapes", f"data.root={root}", "data.num_train=16", "data.num_val=13",
            "data.min_size=48", "data.max_size=80", "data.image_size=32", "data.batch_size=4",
            "data.val_batch_size=4"]


@pytest.mark.slow
def test_ddp_run_scores_every_val_pixel_exactly_once(odd_val_root: tuple, tmp_path: Path) -> None:
    root, labelled = odd_val_root
    run_entry_point("train.py", *ddp_overrides(root), f"hydra.run.dir={tmp_path}")
    record = read_record(tmp_path)
    assert record["status"] == COMPLETED and record["strategy"] == "ddp"
    assert record["final"]["val/pixels"] == labelled
    assert (tmp_path / "train_ddp_process_1.log").is_file()  # rank 1 ran, and wrote no run files of its own


@pytest.mark.slow
def test_ddp_job_inside_a_multirun_spawns_its_ranks(odd_val_root: tuple, tmp_path: Path) -> None:
    root, labelled = odd_val_root
    result = run_entry_point("train.py", "-m", *ddp_overrides(root), "seed=1,2", f"hydra.sweep.dir={tmp_path}")
    jobs = records(tmp_path)
    assert len(jobs) == 2, result.stdout[-2000:]  # the sweep ran once, not once per rank
    for job in jobs:
        assert job["status"] == COMPLETED and job["strategy"] == "ddp_spawn"
        assert job["final"]["val/pixels"] == labelled and job["best"]["val/miou"] >= 0


def _ranks_running(own: OwnProcesses, job: int) -> bool:
    """Whether the job's process has started its other ranks (a process of the test's besides the job's)."""
    return any(pid != job for pid in own.alive())


@pytest.mark.slow
@pytest.mark.parametrize("kind, sig", [("sweep job", signal.SIGKILL), ("run", signal.SIGTERM)])
def test_no_rank_outlives_its_ddp_job(odd_val_root: tuple, tmp_path: Path, kind: str, sig: signal.Signals) -> None:
    """The job's process of a DDP sweep job (ddp_spawn ranks) killed with SIGKILL, and of a single `ddp` run (ranks
    1..n run the command line again) ended with SIGTERM: within 60 s none of its ranks is left."""
    root, _ = odd_val_root
    own = OwnProcesses(uuid.uuid4().hex)
    command = [sys.executable, str(ROOT / "train.py"), *(["-m"] if kind == "sweep job" else []),
               *ddp_overrides(root), "trainer.max_epochs=200",
               f"hydra.{'sweep' if kind == 'sweep job' else 'run'}.dir={tmp_path}"]
    with subprocess.Popen(command, cwd=ROOT, env={**os.environ, TAG: own.tag, "HYDRA_FULL_ERROR": "0"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as job:
        deadline = time.monotonic() + 300
        while not (tmp_path / ("0/metrics.json" if kind == "sweep job" else "metrics.json")).is_file() \
                or not _ranks_running(own, job.pid):
            assert job.poll() is None and time.monotonic() < deadline, "the DDP job did not start its ranks"
            time.sleep(0.5)
        time.sleep(2)  # into training: every rank inside its epochs
        ranks = {pid: name for pid, name in own.alive().items() if pid != job.pid}
        assert ranks, "no rank besides the job's process"
        job.send_signal(sig)
        job.wait(timeout=120)
    own.wait_until_gone(timeout=60)


@pytest.mark.slow
def test_a_rank_that_stops_answering_fails_the_run_within_the_collective_timeout(odd_val_root: tuple,
                                                                                tmp_path: Path) -> None:
    """Rank 1 hangs at the end of the first epoch; rank 0 waits in the epoch's all_gather. With
    distributed.collective_timeout_s=10 the run fails in one paragraph naming rank 0 and the hook, the record says
    failed, and the hung rank ends with its job."""
    root, _ = odd_val_root
    own = OwnProcesses(uuid.uuid4().hex)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *ddp_overrides(root), "trainer.max_epochs=2",
                             "distributed.collective_timeout_s=10",
                             "+callbacks.hang={_target_: tests.faults.HangOnRank, rank: 1, seconds: 900}",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, TAG: own.tag, "HYDRA_FULL_ERROR": "0"})
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert time.monotonic() - started < 590  # the timeout fired: without it the rank would wait 900 s
    assert "Rank 0 of this DDP run waited 10 s in a collective" in output
    assert "in on_train_epoch_end (segx/training/module.py" in output
    record = read_record(tmp_path)
    assert record["status"] == FAILED and "another rank never answered" in record["error"]
    own.wait_until_gone(timeout=60)  # the hung rank 1 went with its job


def _can_mount_a_small_dev_shm() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_a_small_dev_shm(),
                    reason="needs a private mount namespace (root, `unshare -m`) to give the run a 1 MB /dev/shm")
def test_a_ddp_sweep_job_needs_no_dev_shm_for_its_data_and_compiles_in_its_ranks(tmp_path: Path) -> None:
    """ddp_spawn pickles the data module to its ranks: with the loaded splits that goes through /dev/shm (Docker's
    is 64 MB, VOC trainaug's cache 690 MB). Here the train split (2.6 MB) is larger than the run's /dev/shm (1 MB).
    And run.compile survives into the spawned ranks, which recompile (`configure_model`)."""
    command = [sys.executable, str(ROOT / "train.py"), "-m", *TINY_MODEL, *DDP, "data=shapes",
               f"data.root={tmp_path / 'shapes'}", "data.num_train=160", "data.num_val=8", "data.min_size=64",
               "data.max_size=80", "data.image_size=64", "data.batch_size=8", "trainer.limit_train_batches=2",
               "trainer.limit_val_batches=1", "run.compile=eager", "seed=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    shell = "mount -t tmpfs -o size=1m tmpfs /dev/shm && exec \"$@\""
    result = subprocess.run(["unshare", "-m", "sh", "-c", shell, "sh", *command], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    [job] = records(tmp_path / "sweep")
    assert job["status"] == COMPLETED, (job.get("error"), result.stdout[-3000:], result.stderr[-3000:])
    assert job["strategy"] == "ddp_spawn" and job["compiled"] is True
    cache = next((tmp_path / "shapes" / "segx-cache").glob("train-64px-*.pt"))
    assert cache.stat().st_size > 2 * 2**20  # larger than the 1 MB /dev/shm the ranks had


def test_a_data_module_pickles_without_its_splits_and_reloads_them(shapes_root: Path) -> None:
    from segx.data.shapes_datamodule import ShapesDataModule

    data = ShapesDataModule(root=str(shapes_root), num_train=96, num_val=16, min_size=48, max_size=80,
                            image_size=32)
    train = data.load_split("train")
    copy = pickle.loads(pickle.dumps(data))
    assert len(pickle.dumps(data)) < train.images.numel() // 4  # the tensors stay behind
    assert torch.equal(copy.load_split("train").images, train.images)  # mapped again from the cache file
    assert data.load_split("train") is train  # the original keeps its own


# -- units ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision, cuda, bf16, expected", [
    ("auto", False, False, "32-true"),
    ("auto", True, True, "bf16-mixed"),
    ("auto", True, False, "16-mixed"),
    ("16-mixed", True, True, "16-mixed"),
    ("bf16-mixed", False, False, "bf16-mixed"),
    (32, False, False, "32"),
])
def test_precision_auto_resolves_by_device(precision: str, cuda: bool, bf16: bool, expected: str) -> None:
    assert resolve_precision(precision, cuda, bf16) == expected


def test_ddp_in_a_sweep_job_spawns_its_ranks_instead_of_rerunning_the_command() -> None:
    assert strategy_for_sweep_job("ddp") == "ddp_spawn"
    assert strategy_for_sweep_job("ddp_find_unused_parameters_true") == "ddp_spawn_find_unused_parameters_true"
    assert strategy_for_sweep_job("auto") == "auto" and strategy_for_sweep_job("ddp_spawn") == "ddp_spawn"


def test_augmentation_survives_pickling_for_spawned_ranks_and_reseeds_per_rank() -> None:
    images, masks = torch.rand(64, 3, 8, 8), torch.randint(0, 21, (64, 8, 8))
    augment = BatchAugment(seed=3)
    augment(images, masks)
    copy = pickle.loads(pickle.dumps(augment))
    assert torch.equal(copy(images, masks)[0], augment(images, masks)[0])  # same stream, same position
    rank0, rank1 = BatchAugment(seed=3), BatchAugment(seed=3)
    rank1.reseed(3 + 1_000_003)
    assert not torch.equal(rank0(images, masks)[0], rank1(images, masks)[0])


def test_the_devices_recorded_are_those_the_run_trains_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not every GPU of the host: trainer.devices picks among those the launcher gave the job."""
    from segx.training.runtime import visible_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert visible_devices("gpu", 1) == "4" and visible_devices("gpu", 2) == "4,5"
    assert visible_devices("gpu", -1) == visible_devices("gpu", "auto") == "4,5,6"
    assert visible_devices("gpu", "0,2") == "4,6" and visible_devices("gpu", [1]) == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_devices("cpu", 1) == "cpu"


def test_a_collective_timeout_is_told_with_its_rank_and_hook_from_a_spawned_rank_s_traceback() -> None:
    from segx.training.collectives import collective_timeout_message, is_collective_timeout
    from segx.training.runtime import check_collective_timeout

    spawned = RuntimeError(
        "\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n"
        '  File "/x/pytorch_lightning/trainer/call.py", line 48, in _call_and_handle_interrupt\n'
        '  File "/x/segx/training/module.py", line 171, in on_validation_epoch_end\n'
        '  File "/x/segx/training/module.py", line 140, in _log_scores\n'
        "RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 300000ms for recv operation")
    assert is_collective_timeout(spawned) and not is_collective_timeout(RuntimeError("out of memory"))
    message = collective_timeout_message(spawned, 0, 300.0)
    assert message.startswith("Rank 1 of this DDP run waited 300 s in a collective")
    assert "in on_validation_epoch_end (segx/training/module.py:171)" in message
    assert "distributed.collective_timeout_s" in message and "Timed out waiting 300000ms" in message
    assert check_collective_timeout("60") == 60.0
    with pytest.raises(ConfigError, match="distributed.collective_timeout_s=0"):
        check_collective_timeout(0)
