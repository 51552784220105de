"""The run record: a run directory's `metrics.json`, its status and provenance, read and merged atomically.

Every run directory's `metrics.json` says whether the run is `running`, `completed`, `failed` or `stopped`
(by a search scheduler), where and how it ran, and why it failed; `RunSummary` adds the training summary.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segx.core.files import write_json_atomic
from segx.core.ranks import is_rank_zero
from segx.runs.status import COMPLETED, FAILED, RETRYING, RUNNING, STOPPED

if TYPE_CHECKING:
    from segx.runs.job import JobInfo

RECORD_FILE = "metrics.json"
# A search scheduler's verdict, written by the sweep's driver: the worker it stops is killed while it may still be
# writing metrics.json, so the verdict lives in a file of its own and read_record merges the two.
STOP_FILE = "stopped.json"
DEFAULT_MONITOR = "val/miou"  # the score a run's best epoch is picked by when its record names none
ENDING_FIELDS = ("error", "ended_at", "stopped_at_epoch", "stopped_by", "interrupted_by")  # how a run ended
LOST = "lost"  # how an attempt whose worker went away ended (the start of its `ended`)
RETRY_FIELDS = ("retry", "retries")  # a job waiting for its launcher's next attempt: which one, of how many
TUNE_ENDED = "paused at a rung, or stopped"  # the end of an attempt that Ray Tune ended at a report


def utc_now() -> str:
    """ISO 8601 time in UTC, to the millisecond (sweep jobs on one device are ordered by it)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """A run directory's `metrics.json`, or None when there is none (or it cannot be read)."""
    record = _read_json(Path(run_dir) / RECORD_FILE)
    if record is None:
        return None
    verdict = _read_json(Path(run_dir) / STOP_FILE)
    if verdict is not None and record.get("status") != COMPLETED:  # a run that finished keeps its own ending
        record.update(status=STOPPED, stopped_at_epoch=verdict.get("epoch"), stopped_by=verdict.get("by"))
        _say_how_tune_ended(record, f"stopped by {verdict.get('by')}")
        record.pop("error", None)  # what the dying worker may have written about its own end
        record.setdefault("ended_at", verdict.get("at"))
    return record


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _say_how_tune_ended(record: dict[str, Any], how: str) -> None:
    """The last attempt ended at a report by Ray Tune, which its process could not tell apart: say which it was."""
    attempts = record.get("attempts") or []
    if attempts and str(attempts[-1].get("ended", "")).endswith(TUNE_ENDED):
        attempts[-1]["ended"] = attempts[-1]["ended"].removesuffix(TUNE_ENDED) + how


def write_stop_verdict(run_dir: str | Path, epoch: int | None, by: str) -> None:
    """Record, from the sweep's driver, that a search scheduler stopped this run after `epoch`."""
    write_json_atomic(Path(run_dir) / STOP_FILE, {"epoch": epoch, "by": by, "at": utc_now()})


def finalize_stopped(sweep_dir: str | Path) -> list[Path]:
    """Once a search's trials have all ended: each run directory the scheduler stopped gets the stop written into
    its own `metrics.json` (status stopped, where it still said running), so the record is final without the
    verdict file beside it. Returns the run directories rewritten."""
    rewritten = []
    for verdict in sorted(Path(sweep_dir).glob(f"*/{STOP_FILE}")):
        run_dir = verdict.parent
        raw = _read_json(run_dir / RECORD_FILE)
        if raw is None or raw.get("status") in (COMPLETED, STOPPED):
            continue
        merged = read_record(run_dir)
        if merged is not None:
            write_json_atomic(run_dir / RECORD_FILE, merged)
            rewritten.append(run_dir)
    return rewritten


def ray_node() -> str | None:
    """The id of the Ray node this process runs on, None outside a Ray worker (Ray is not imported for it)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # a driver, or a Ray without a runtime context here: no node to name
        return None


def new_attempt(started_at: str, epochs_before: int) -> dict[str, Any]:
    """One process's turn at a run: where it ran, when it started, and the epochs recorded before it."""
    return {"host": socket.gethostname(), "node": ray_node(), "pid": os.getpid(), "started_at": started_at,
            "from_epoch": epochs_before}


def end_attempt(record: dict[str, Any], how: str, at: str | None = None) -> None:
    """Close the record's last attempt, if still open, with `how` it ended (a word, or a line for a loss)."""
    attempts = record.get("attempts") or []
    if attempts and "ended_at" not in attempts[-1]:
        attempts[-1].update(ended_at=at or utc_now(), ended=how)


def record_retry(run_dir: str | Path, why: str, retry: int, retries: int) -> dict[str, Any] | None:
    """From a launcher: the job's worker was lost (`why`) and it waits for attempt `retry` of `retries` retries.
    Its status becomes `retrying` and its open attempt ends with `why`; the record as written is returned."""
    record = _read_json(Path(run_dir) / RECORD_FILE)
    if record is None:  # lost before its first record: its retry starts it afresh
        return None
    end_attempt(record, why if why.startswith(LOST) else f"{LOST}: {why}")
    record.update(status=RETRYING, retry=retry, retries=retries)
    write_json_atomic(Path(run_dir) / RECORD_FILE, record)
    return record


def epochs_recorded(record: dict[str, Any]) -> int:
    """How many epochs the record's history holds (0 when it has none, or none readable)."""
    history = record.get("history")
    return len(history) if isinstance(history, list) else 0


def lost_attempts(record: dict[str, Any]) -> int:
    """How many times the run lost its worker (its process killed, its node dead) and was retried."""
    return sum(str(a.get("ended", "")).startswith(LOST) for a in record.get("attempts") or [])


def best_value(record: dict[str, Any], monitor: str = DEFAULT_MONITOR) -> float:
    """The monitored score at the best epoch, NaN when the run recorded none (what a sweeper gets back)."""
    value = (record.get("best") or {}).get(monitor)
    return float(value) if value is not None else float("nan")


class JobRecord:
    """Status and provenance of one run, merged into its `metrics.json` beside the training summary.

    `fields` is also what `RunSummary` writes with every epoch, so the file never loses them. Only rank
    zero writes: the other processes of a DDP run keep quiet.
    """

    def __init__(self, job: JobInfo, resumes: dict[str, Any] | None = None) -> None:
        """`resumes`: the record of the run this one carries on (same run directory, resumed from its last.ckpt):
        its first `started_at` and its attempts are kept, this process's attempt added to them."""
        self.path = job.run_dir / RECORD_FILE
        self.write = is_rank_zero()
        now, resumes = utc_now(), resumes or {}
        attempts = [dict(a) for a in resumes.get("attempts") or []]
        if attempts and "ended_at" not in attempts[-1]:  # its process ended without a word (killed with its driver)
            attempts[-1]["ended"] = "its process ended without recording how (killed, or its driver was)"
        if resumes.get("status") == RUNNING:  # Tune ended the attempt, and the trial goes on: it was paused
            _say_how_tune_ended({"attempts": attempts}, "paused at a rung")
        attempts.append(new_attempt(now, epochs_recorded(resumes)))
        self.fields: dict[str, Any] = {
            "status": RUNNING, "host": socket.gethostname(), "launcher": job.launcher, "job": job.num,
            "overrides": job.overrides, "started_at": resumes.get("started_at", now), "attempts": attempts,
        }
        # Called with `fields` once the run has ended and metrics.json says so (e.g. to close its MLflow run).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def start(self, **fields: Any) -> None:
        """Mark the run as running (again, when resumed), with `fields` such as devices and precision."""
        self.fields.update(fields, status=RUNNING)
        for key in (*ENDING_FIELDS, *RETRY_FIELDS):  # of an earlier attempt
            self.fields.pop(key, None)
        self._update(drop=(*ENDING_FIELDS, *RETRY_FIELDS))

    def note(self, **fields: Any) -> None:
        """Add results measured outside training (e.g. prediction timing) to metrics.json."""
        self.fields.update(fields)
        self._update()

    def complete(self) -> None:
        now = utc_now()
        end_attempt(self.fields, COMPLETED, now)
        self.fields.update(status=COMPLETED, ended_at=now)
        self._update(drop=("error", *RETRY_FIELDS))
        self._ended()

    def fail(self, error: str) -> None:
        now = utc_now()
        end_attempt(self.fields, f"{FAILED}: {error.splitlines()[0] if error else ''}".rstrip(": "), now)
        self.fields.update(status=FAILED, error=error, ended_at=now)
        self._update(on_full_disk_in_place=True, drop=RETRY_FIELDS)  # a run that failed for a full disk says so
        self._ended()

    def stop(self, epoch: int, by: str) -> None:
        """Ended early by a search scheduler at `epoch`: its scores so far are its result, not a failure."""
        now = utc_now()
        end_attempt(self.fields, f"{STOPPED} by {by} after epoch {int(epoch)}", now)
        self.fields.update(status=STOPPED, stopped_at_epoch=int(epoch), stopped_by=by, ended_at=now)
        self._update(drop=("error", *RETRY_FIELDS))
        self._ended()

    def end_attempt(self, how: str) -> None:
        """This process's attempt ends without ending the run (Ray Tune paused or stopped it at a report)."""
        end_attempt(self.fields, how)
        self._update()

    def _ended(self) -> None:
        if self.write:
            for listener in self.listeners:
                listener(dict(self.fields))

    def _update(self, drop: tuple[str, ...] = (), on_full_disk_in_place: bool = False) -> None:
        if not self.write:
            return
        record = {k: v for k, v in (read_record(self.path.parent) or {}).items() if k not in drop}
        write_json_atomic(self.path, {**record, **self.fields}, on_full_disk_in_place=on_full_disk_in_place)
