"""A job's status and provenance in its `metrics.json`, failure isolation, and sweeps that can be re-run.

Every run directory's `metrics.json` says whether the run is `running`, `completed` or `failed`, where
and how it ran, and why it failed. A job of a sweep never takes the sweep down: its exception is
recorded and the job returns NaN, so every other job still runs; `SweepSummary` then lists the failed
ones and exits non-zero. Re-running the same sweep command into the same `hydra.sweep.dir` skips
the completed jobs and resumes the others from their `last.ckpt`.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from segx.core.errors import SegxError, find_user_error
from segx.core.files import write_json_atomic
from segx.runs.status import COMPLETED, FAILED, RUNNING, interruption

log = logging.getLogger(__name__)

RECORD_FILE = "metrics.json"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


def utc_now() -> str:
    """ISO 8601 time in UTC, to the millisecond (sweep jobs on one device are ordered by it)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """A run directory's `metrics.json`, or None when there is none (or it cannot be read)."""
    path = Path(run_dir) / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_rank_zero() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which must not write run files."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@dataclass
class JobInfo:
    """What a run knows about how it was launched."""

    run_dir: Path
    multirun: bool = False
    num: int | None = None
    overrides: list[str] = field(default_factory=list)
    launcher: str = "basic"

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
        values = dict(_split_override(o) for o in self.overrides)
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
            launcher=str(hydra_cfg.runtime.choices.get("hydra/launcher", "basic")),
        )


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def varying_keys(sweep_dir: str | Path) -> list[str]:
    """The keys a sweep sweeps over (`optimizer=sgd,adam`, `loss=glob(*)`, its preset's sweeper params), in
    command-line order, read from the sweep's `multirun.yaml` (written before any job starts)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        config = OmegaConf.load(Path(sweep_dir) / "multirun.yaml")
        params = config.hydra.sweeper.get("params") or {}
        overrides = [*(str(o) for o in config.hydra.overrides.task), *(f"{k}={v}" for k, v in params.items())]
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # an unreadable or foreign multirun.yaml: the caller falls back to job numbers
        return []
    keys: list[str] = []
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override() and key not in keys and not key.startswith("hydra."):
            keys.append(key)
    return keys


class JobRecord:
    """Status and provenance of one run, merged into its `metrics.json` beside the training summary.

    `fields` is also what `RunSummary` writes with every epoch, so the file never loses them. Only rank
    zero writes: the other processes of a DDP run keep quiet.
    """

    def __init__(self, job: JobInfo) -> None:
        self.path = job.run_dir / RECORD_FILE
        self.write = is_rank_zero()
        self.fields: dict[str, Any] = {
            "status": RUNNING, "host": socket.gethostname(), "launcher": job.launcher, "job": job.num,
            "overrides": job.overrides, "started_at": utc_now(),
        }

    def start(self, **fields: Any) -> None:
        """Mark the run as running (again, when resumed), with `fields` such as devices and precision."""
        self.fields.update(fields, status=RUNNING)
        self._update(drop=("error", "ended_at"))

    def note(self, **fields: Any) -> None:
        """Add results measured outside training (e.g. prediction timing) to metrics.json."""
        self.fields.update(fields)
        self._update()

    def complete(self) -> None:
        self.fields.update(status=COMPLETED, ended_at=utc_now())
        self._update(drop=("error",))

    def fail(self, error: str) -> None:
        self.fields.update(status=FAILED, error=error, ended_at=utc_now())
        self._update()

    def _update(self, drop: tuple[str, ...] = ()) -> None:
        if not self.write:
            return
        record = {k: v for k, v in (read_record(self.path.parent) or {}).items() if k not in drop}
        write_json_atomic(self.path, {**record, **self.fields})


def best_value(record: dict[str, Any], monitor: str = "val/miou") -> float:
    value = (record.get("best") or {}).get(monitor)
    return float(value) if value is not None else float("nan")


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
    return ckpt_path


def describe_error(error: BaseException) -> str:
    """The user-facing paragraph of a segx error, else the exception's type and message."""
    user_error = find_user_error(error)
    if user_error is not None:
        return str(user_error)
    return f"{type(error).__name__}: {error}".strip()


TrainFunction = Callable[[DictConfig, JobInfo, JobRecord], float]


def run_job(cfg: DictConfig, job: JobInfo, train: TrainFunction, monitor: str = "val/miou") -> float:
    """Run `train` as one job: skip it when this run directory already completed it, resume it from
    `last.ckpt` when it was interrupted, and record how it ended.

    A single run re-raises its error (the entry point prints a user error as one paragraph). A sweep
    job logs it, records `failed` and returns NaN, so the sweep goes on with its other jobs.
    """
    previous = read_record(job.run_dir) if job.multirun else None
    if previous is not None:
        recorded = previous.get("overrides")
        if recorded is not None and list(recorded) != job.overrides:
            log.error(
                "Job %s: %s holds a run of other overrides (%s), not this job's (%s). It is left as it is; use a "
                "new hydra.sweep.dir for a different sweep.", job.num, job.run_dir, " ".join(recorded),
                " ".join(job.overrides),
            )
            return float("nan")
        if previous.get("status") == COMPLETED:
            monitor = str(previous.get("monitor", monitor))
            log.info("Job %s completed earlier in %s: skipped (best %s %.4f)", job.num, job.run_dir, monitor,
                     best_value(previous, monitor))
            return best_value(previous, monitor)
        if cfg.get("ckpt_path") is None and (job.run_dir / LAST_CHECKPOINT).is_file():
            log.info("Job %s was interrupted (status %s): resuming from %s", job.num, previous.get("status"),
                     job.run_dir / LAST_CHECKPOINT)
            with open_dict(cfg):
                cfg.ckpt_path = "last"

    record = JobRecord(job)
    try:
        with open_dict(cfg):
            cfg.ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), job.run_dir)
        value = train(cfg, job, record)
    except (KeyboardInterrupt, SystemExit) as error:  # Lightning turns Ctrl-C and SIGTERM into SystemExit
        cause = interruption(error)
        record.fail(f"interrupted by {cause}: resume with ckpt_path=last in this run directory, or run the same "
                    "sweep command again")
        raise SystemExit(143 if cause == "SIGTERM" else 130) from error  # the shell's codes; Lightning's SIGTERM is 0
    except Exception as error:
        record.fail(describe_error(error))
        if not job.multirun:
            raise
        if find_user_error(error) is not None:
            log.error("Job %s failed: %s", job.num, describe_error(error))
        else:
            log.exception("Job %s failed with an unexpected error", job.num)
        _release_cuda_memory()
        return float("nan")
    record.complete()
    return value


def _release_cuda_memory() -> None:
    """After a failed job (out of memory, say), the next in-process job starts with an empty cache."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def job_records(sweep_dir: str | Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """(run directory, its metrics.json or None) of every job of a sweep, in job order."""
    run_dirs = {p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")}

    def order(path: Path) -> tuple[int, str]:
        name = path.relative_to(sweep_dir).as_posix()
        return (int(name), name) if name.isdigit() else (sys.maxsize, name)

    return [(run_dir, read_record(run_dir)) for run_dir in sorted(run_dirs, key=order)]


def failed_jobs(sweep_dir: str | Path) -> list[tuple[Path, str]]:
    """(run directory, first line of the error) of every job that did not complete."""
    failed = []
    for run_dir, record in job_records(sweep_dir):
        status = (record or {}).get("status")
        if status == COMPLETED:
            continue
        if record is None:
            reason = "no metrics.json: the job ended before it started training"
        elif status == FAILED:
            reason = str(record.get("error") or "failed").splitlines()[0]
        else:
            reason = f"status {status!r}: stopped before it finished"
        failed.append((run_dir, reason))
    return failed


class SweepSummary(Callback):
    """Hydra callback around a multirun: refuses to mix two different sweeps in one directory, suggests the
    GPU launcher on a multi-GPU machine, and at the end lists the failed jobs and exits non-zero."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        launcher = config.hydra.runtime.choices.get("hydra/launcher", "basic")
        if launcher == "basic":
            import torch

            if torch.cuda.device_count() > 1:
                log.warning("%d CUDA devices are visible but the basic launcher runs one job at a time on the "
                            "first: add hydra/launcher=gpus to run one job per GPU.", torch.cuda.device_count())
        previous = sweep_dir / "multirun.yaml"
        if previous.is_file():
            before = [str(o) for o in OmegaConf.load(previous).hydra.overrides.task]
            now = [str(o) for o in config.hydra.overrides.task]
            if before != now:
                log.error(
                    "hydra.sweep.dir=%s already holds a different sweep (its overrides: %s; yours: %s). Re-running "
                    "the same command there skips its completed jobs and resumes the rest; for a different sweep "
                    "choose a new hydra.sweep.dir, or delete that folder to start over.",
                    sweep_dir, " ".join(before) or "none", " ".join(now) or "none",
                )
                sys.exit(2)
            log.info("Continuing the sweep in %s: completed jobs are skipped, interrupted ones resume.", sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        records = job_records(sweep_dir)
        failed = failed_jobs(sweep_dir)
        log.info("Sweep %s: %d jobs, %d completed, %d failed", sweep_dir, len(records), len(records) - len(failed),
                 len(failed))
        if not failed:
            return
        lines = [f"  {run_dir}: {reason}" for run_dir, reason in failed]
        log.error("%d of %d jobs failed (details in each run directory's metrics.json and log):\n%s\nFix the cause "
                  "and run the same command with hydra.sweep.dir=%s: completed jobs are skipped.",
                  len(failed), len(records), "\n".join(lines), sweep_dir)
        sys.exit(1)


def record_worker_death(run_dir: Path, job_num: int, overrides: list[str], launcher: str, error: str) -> None:
    """For launchers: the worker process of a job died (killed, out of host memory) after its retries."""
    job = JobInfo(run_dir=run_dir, multirun=True, num=job_num, overrides=overrides, launcher=launcher)
    JobRecord(job).fail(error)

