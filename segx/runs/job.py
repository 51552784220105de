"""A job's lifecycle: skip it when done, resume it when interrupted, record how it ended, isolate its failure.

A job of a sweep never takes the sweep down: its exception is recorded and the job returns NaN, so every other
job still runs (`SweepSummary` then lists the failed ones and exits non-zero). Re-running the same sweep command
into the same `hydra.sweep.dir` skips the completed (and scheduler-stopped) jobs and resumes the others from
their `last.ckpt`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from segx.core.errors import DatasetUnavailableError, SegxError, find_user_error
from segx.core.job_console import ON_CONSOLE
from segx.core.ranks import is_rank_zero
from segx.runs.overrides import job_count, split_override, varying_keys
from segx.runs.ownership import RunDirTakenError, claim_run_dir, release_run_dir
from segx.runs.record import DEFAULT_MONITOR, TUNE_ENDED, JobRecord, best_value, epochs_recorded, read_record
from segx.runs.status import CTRL_C, EXIT_CODES, FINAL, StopRequested, describe_exit, interruption

log = logging.getLogger(__name__)

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


@dataclass
class JobInfo:
    """What a run knows about how it was launched."""

    run_dir: Path
    multirun: bool = False
    num: int | None = None
    overrides: list[str] = field(default_factory=list)
    launcher: str = "basic"
    launch_dir: Path | None = None  # where the command was started (Hydra's runtime.cwd); None: the working directory
    choices: dict[str, Any] = field(default_factory=dict)  # each config group's choice, e.g. {"optimizer": "sgd"}
    name: str = "train"  # Hydra's job name

    @property
    def in_worker(self) -> bool:
        """Runs in a process of its own beside other jobs (Ray, submitit): no live progress bar there."""
        return self.multirun and self.launcher != "basic"

    @property
    def sweep_dir(self) -> Path | None:
        """The sweep's folder (the run directory's parent) for a job of a multirun."""
        return self.run_dir.parent if self.multirun else None

    def run_name(self) -> str:
        """The job named by the overrides its sweep varies, e.g. `optimizer=sgd,seed=1` (TensorBoard's run name);
        `job<N>` when nothing varies or the sweep's multirun.yaml cannot be read."""
        keys = varying_keys(self.sweep_dir) if self.sweep_dir is not None else []
        values = dict(split_override(o) for o in self.overrides)
        parts = [f"{key}={values[key]}" for key in keys if key in values]
        return ",".join(parts).replace("/", "_") or f"job{self.num}"

    @classmethod
    def from_hydra(cls) -> JobInfo:
        """From Hydra's state inside a task function."""
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        return cls(
            run_dir=Path(hydra_cfg.runtime.output_dir),
            multirun=multirun,
            num=int(hydra_cfg.job.num) if multirun else None,
            overrides=[str(o) for o in hydra_cfg.overrides.task],
            # A tune search runs its trials itself: Hydra's launcher setting is not used there.
            launcher="tune" if hydra_cfg.runtime.choices.get("hydra/sweeper") == "tune" else
            str(hydra_cfg.runtime.choices.get("hydra/launcher", "basic")),
            launch_dir=Path(hydra_cfg.runtime.cwd),
            choices=dict(hydra_cfg.runtime.choices),
            name=str(hydra_cfg.job.name),
        )


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last`: this run directory's `checkpoints/last.ckpt` (it must exist); `auto`: that file when it exists,
    else a fresh start; anything else is a checkpoint path (or null)."""
    last = run_dir / LAST_CHECKPOINT
    if ckpt_path == "auto":
        return str(last) if last.is_file() else None
    if ckpt_path == "last":
        if not last.is_file():
            raise SegxError(
                f"ckpt_path=last resumes {last}, which does not exist. Pass the run directory to resume as "
                "hydra.run.dir=<run dir> (the folder holding checkpoints/last.ckpt), give the checkpoint's path as "
                "ckpt_path=<file>, or use ckpt_path=auto to resume when there is a last.ckpt and start fresh otherwise."
            )
        return str(last)
    if ckpt_path is not None and "://" not in ckpt_path and not Path(ckpt_path).is_file():
        raise SegxError(
            f"ckpt_path={ckpt_path} does not exist{' (it is a folder)' if Path(ckpt_path).is_dir() else ''}. Give the "
            "path of a checkpoint file (a run's checkpoints/last.ckpt or best.ckpt), ckpt_path=last to resume the run "
            "in hydra.run.dir, or ckpt_path=auto to resume it when it has a last.ckpt and start fresh otherwise."
        )
    return ckpt_path


def _same_job(recorded: list[str], job: JobInfo) -> bool:
    """A run directory's record is this job's when it has the same values of what the sweep varies (settings every
    job shares may change between re-runs of a sweep); every override must match when those keys are unknown."""
    keys = varying_keys(job.sweep_dir) if job.sweep_dir is not None else []
    if not keys:
        return recorded == job.overrides
    before, now = dict(split_override(o) for o in recorded), dict(split_override(o) for o in job.overrides)
    return all(before.get(key) == now.get(key) for key in keys)


def describe_error(error: BaseException) -> str:
    """The user-facing paragraph of a segx error, else the exception's type and message."""
    user_error = find_user_error(error)
    if user_error is not None:
        return str(user_error)
    return f"{type(error).__name__}: {error}".strip()


TrainFunction = Callable[[DictConfig, JobInfo, JobRecord], float]


def run_job(cfg: DictConfig, job: JobInfo, train: TrainFunction) -> float:
    """Run `train` as one job: skip it when this run directory already completed it, resume it from
    `last.ckpt` when it was interrupted, and record how it ended.

    Ctrl-C and SIGTERM are recorded as interruptions and exit 130 and 143; a scheduler's `StopRequested` is
    recorded as `stopped` and returns the best score so far. A single run re-raises any other error, a
    `sys.exit()` included (the entry point prints a user error as one paragraph). A sweep job logs it, records
    `failed` and returns NaN, so the sweep goes on with its other jobs. The run directory is this process's while
    the job runs (segx.runs.ownership): a directory another live process owns is refused untouched.
    """
    if not is_rank_zero():  # the other ranks of a DDP run work in rank 0's directory and write no run files
        return _run_job(cfg, job, train)
    try:
        claim_run_dir(job.run_dir, "hydra.sweep.dir's job folder" if job.multirun else "hydra.run.dir")
    except RunDirTakenError as error:
        if not job.multirun:
            raise
        log.error("Job %s: %s", job.num, error)
        return float("nan")
    try:
        return _run_job(cfg, job, train)
    finally:
        release_run_dir(job.run_dir)


def _run_job(cfg: DictConfig, job: JobInfo, train: TrainFunction) -> float:
    previous = read_record(job.run_dir) if job.multirun else None
    if previous is not None:
        recorded = previous.get("overrides")
        if recorded is not None and not _same_job(list(recorded), job):
            log.error(
                "Job %s: %s holds a run of other overrides (%s), not this job's (%s). It is left as it is; use a "
                "new hydra.sweep.dir for a different sweep.", job.num, job.run_dir, " ".join(recorded),
                " ".join(job.overrides),
            )
            return float("nan")
        if previous.get("status") in FINAL:
            return skipped(job, previous)
        if cfg.get("ckpt_path") is None and (job.run_dir / LAST_CHECKPOINT).is_file():
            log.info("Job %s resumes after epoch %d from %s (attempt %d, status was %s)", job.num,
                     epochs_recorded(previous), job.run_dir / LAST_CHECKPOINT,
                     len(previous.get("attempts") or []) + 1, previous.get("status"), extra=ON_CONSOLE)
            with open_dict(cfg):
                cfg.ckpt_path = "last"

    # A sweep job's earlier attempts (and a run resumed from its own last.ckpt) stay in the record it carries on.
    resumes = previous if previous is not None else _resumed_record(cfg, job)
    record = JobRecord(job, resumes=resumes)
    try:
        with open_dict(cfg):
            cfg.ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), job.run_dir)
        value = train(cfg, job, record)
    except StopRequested as stop:
        if stop.recorded_elsewhere:
            record.end_attempt(f"ended by Ray Tune after epoch {stop.epoch}: {TUNE_ENDED}")
            log.info("Job %s ended by Ray Tune after epoch %d: the search records why (its scheduler, or Ctrl-C)",
                     job.num, stop.epoch)
        else:
            record.stop(stop.epoch, stop.by)
            log.info("Job %s %s: its scores so far are its result", "-" if job.num is None else job.num, stop)
        written = read_record(job.run_dir) or {}
        return best_value(written, str(written.get("monitor", DEFAULT_MONITOR)))
    except (KeyboardInterrupt, SystemExit) as error:
        cause = interruption(error)
        if cause is None and isinstance(error, SystemExit):  # the code's own sys.exit(): a failure, with its code
            record.fail(describe_exit(error))
            if not job.multirun:
                if error.code in (None, 0):  # the run did not finish: the process must not report success
                    raise SystemExit(1) from error
                raise
            log.error("Job %s failed: %s", job.num, describe_exit(error))
            _release_cuda_memory()
            return float("nan")
        cause = cause or CTRL_C  # a KeyboardInterrupt always is
        record.fields["interrupted_by"] = cause
        record.fail(f"interrupted by {cause}: resume with ckpt_path=last in this run directory, or run the same "
                    "sweep command again")
        raise SystemExit(EXIT_CODES[cause]) from error
    except Exception as error:
        shared = job.multirun and shared_failure(error, job)
        if shared:  # the launcher running jobs side by side (gpus) reads this to stop the sweep
            record.fields["shared_failure"] = True
        record.fail(describe_error(error))
        if not job.multirun:
            raise
        if shared and job.launcher == "basic":
            _stop_basic_sweep(error, job)
        if shared:  # the launcher prints the error with its stop (this worker's log lines may not reach the console)
            log.info("Job %s failed on its dataset, as every job would: the launcher stops the sweep", job.num)
        elif find_user_error(error) is not None:
            log.error("Job %s failed: %s", job.num, describe_error(error))
        else:
            log.exception("Job %s failed with an unexpected error", job.num)
        _release_cuda_memory()
        return float("nan")
    record.complete()
    return value


def finished_earlier(job: JobInfo) -> dict[str, Any] | None:
    """The record of this sweep job when its run directory already holds it completed or stopped (a launcher skips
    it without starting a worker), else None."""
    previous = read_record(job.run_dir)
    if previous is None or previous.get("status") not in FINAL:
        return None
    recorded = previous.get("overrides")
    return previous if recorded is None or _same_job(list(recorded), job) else None


def skipped(job: JobInfo, previous: dict[str, Any]) -> float:
    """Say that the job is skipped, having ended earlier; its best score is its result."""
    monitor = str(previous.get("monitor", DEFAULT_MONITOR))
    log.info("Job %s %s earlier in %s: skipped (best %s %.4f)", job.num, previous["status"], job.run_dir,
             monitor, best_value(previous, monitor), extra=ON_CONSOLE)
    return best_value(previous, monitor)


def _resumed_record(cfg: DictConfig, job: JobInfo) -> dict[str, Any] | None:
    """The record of this run directory when the run resumes its own last.ckpt (ckpt_path=last or auto)."""
    ckpt = cfg.get("ckpt_path")
    own = job.run_dir / LAST_CHECKPOINT
    if ckpt in ("last", "auto") or (ckpt is not None and Path(str(ckpt)).resolve() == own.resolve()):
        return read_record(job.run_dir) if own.is_file() else None
    return None


def shared_failure(error: BaseException, job: JobInfo) -> bool:
    """A dataset that cannot be read fails every job that reads it: True when the sweep varies no data setting,
    so every other job of the sweep would fail the same way."""
    if not isinstance(find_user_error(error), DatasetUnavailableError) or job.sweep_dir is None:
        return False
    return not any(key == "data" or key.startswith("data.") for key in varying_keys(job.sweep_dir))


def stop_message(job_num: int | None, sweep_dir: Path, left: str) -> str:
    """The paragraph a sweep ends with when a job's failure would repeat in every job; `left` says what became
    of the other jobs."""
    varied = ", ".join(varying_keys(sweep_dir)) or "nothing varies"
    return (f"The sweep stops after job {job_num}: it varies no data setting ({varied}), so every job would fail the "
            f"same way; {left}. Fix the cause and run the same command again (hydra.sweep.dir={sweep_dir}): it "
            "carries on from here.")


def _stop_basic_sweep(error: BaseException, job: JobInfo) -> None:
    """The basic launcher runs the jobs one after another in this process: the sweep ends here, exit code 2."""
    assert job.sweep_dir is not None
    total = job_count(job.sweep_dir)
    left = "the other jobs were not started" if total is None else \
        f"{total - (job.num or 0) - 1} of its {total} jobs were not started"
    log.error("Job %s failed: %s\n%s", job.num, find_user_error(error), stop_message(job.num, job.sweep_dir, left))
    raise SystemExit(2)


def _release_cuda_memory() -> None:
    """After a failed job (out of memory, say), the next in-process job starts with an empty cache."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def record_worker_death(run_dir: Path, job_num: int, overrides: list[str], launcher: str, error: str) -> None:
    """For launchers: the worker process of a job died (killed, out of host memory) after its retries. Its first
    start and its attempts are kept; the launcher's process adds no attempt of its own."""
    job = JobInfo(run_dir=run_dir, multirun=True, num=job_num, overrides=overrides, launcher=launcher)
    earlier = read_record(run_dir) or {}
    record = JobRecord(job)
    record.fields["attempts"] = earlier.get("attempts") or []  # the launcher's own process ran no attempt
    if "started_at" in earlier:
        record.fields["started_at"] = earlier["started_at"]
    else:  # it never started: no start time to give it
        record.fields.pop("started_at")
    record.fail(error)


def job_end_line(job_num: int, run_dir: Path) -> str:
    """The sweep console's line for a finished job, from its metrics.json: its status, best score and epochs, or
    the first line of its error."""
    record = read_record(run_dir) or {}
    status = str(record.get("status", "ended without a metrics.json"))
    if record.get("error"):
        return f"Job {job_num} {status}: {str(record['error']).splitlines()[0]} · {run_dir}"
    monitor = str(record.get("monitor", DEFAULT_MONITOR))
    best = best_value(record, monitor)
    epoch = (record.get("best") or {}).get("epoch")
    at = f" (epoch {int(epoch) + 1} of {record.get('epochs', '?')})" if isinstance(epoch, int | float) else ""
    score = f" · best {monitor} {best:.4f}{at}" if best == best else ""
    return f"Job {job_num} {status}{score} · {run_dir}"
