"""Finding run directories under a sweep, `outputs/` or any folder, and how each one ended.

The one reader of run directories: the end-of-sweep summary and `segx.report` both use it, so a job whose worker
died before Hydra wrote its `.hydra/` (only a `metrics.json` from the launcher) counts in both. Tolerant by design:
a job still running, a failed one, one whose metrics.json is missing or corrupt, and runs written by older versions
(no `status` or `overrides`) all read back as a `RunDirectory`, never an exception.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from segx.core.errors import first_line
from segx.runs.ownership import gone_owner
from segx.runs.record import RECORD_FILE, epochs_recorded, read_record
from segx.runs.status import COMPLETED, FAILED, RETRYING, RUNNING, STATUSES, STOPPED

MISSING, UNREADABLE = "missing", "unreadable"  # no metrics.json / one that cannot be parsed


@dataclass
class RunDirectory:
    """One training run's directory and how it ended."""

    run_dir: Path
    status: str  # running | retrying | completed | failed | stopped | missing | unreadable
    record: dict[str, Any] = field(default_factory=dict)  # metrics.json ({} when missing or unreadable)

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def ended_badly(self) -> bool:
        """Failed, or left no readable metrics.json: what a sweep's summary and a report count as failed."""
        return self.status in (FAILED, MISSING, UNREADABLE)

    @property
    def unfinished(self) -> bool:
        """Neither completed nor stopped by a scheduler: at the end of a sweep, a job that did not do its work."""
        return self.status not in (COMPLETED, STOPPED)

    @property
    def overrides(self) -> list[str]:
        """The run's command-line overrides: metrics.json's, else `.hydra/overrides.yaml`'s (older runs)."""
        recorded = self.record.get("overrides")
        if isinstance(recorded, list):
            return [str(o) for o in recorded]
        try:
            loaded = OmegaConf.load(self.run_dir / ".hydra" / "overrides.yaml")
            return [str(o) for o in loaded] if OmegaConf.is_list(loaded) else []
        except Exception:  # older or hand-made runs without .hydra/
            return []

    @property
    def reason(self) -> str:
        """One line on why the run has no full result (empty for a completed one)."""
        if self.status == FAILED:
            return first_line(str(self.record.get("error") or "")) or "failed (no error recorded)"
        if self.status == STOPPED:
            return (f"stopped by {self.record.get('stopped_by') or 'the search scheduler'} at epoch "
                    f"{self.record.get('stopped_at_epoch', '?')}")
        if self.status in (RUNNING, RETRYING):
            count = epochs_recorded(self.record)
            gone = gone_owner(self.run_dir)
            if gone is not None:
                return (f"status {self.status}, but its process ({gone}) has ended without recording how: killed, or "
                        f"its sweep's driver was (epochs recorded: {count}); the same command resumes it")
            if self.status == RETRYING:
                return (f"waiting for retry {self.record.get('retry', '?')} of {self.record.get('retries', '?')} "
                        f"after its worker was lost (epochs recorded: {count})")
            return f"status running: still training, or stopped without a word (epochs recorded: {count})"
        if self.status == MISSING:
            return "no metrics.json: the job ended (or is starting) before training began"
        if self.status == UNREADABLE:
            return "metrics.json cannot be read (truncated or not JSON)"
        return ""


def is_evaluation(record: dict[str, Any] | None) -> bool:
    """evaluate.py's metrics.json (scores of a checkpoint, no training history) is not a training run."""
    return record is not None and "history" not in record and ("per_class_iou" in record or "miou" in record)


def _config_is_evaluation(run_dir: Path) -> bool:
    try:
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    except Exception:
        return False
    return "ckpt" in config and "trainer" not in config


def _status(record: dict[str, Any]) -> str:
    status = record.get("status")
    if status in STATUSES:
        return str(status)
    # Older versions wrote no status: a run with a best epoch finished training (or was stopped after some).
    return COMPLETED if record.get("best") or record.get("history") else RUNNING


def read_run_dir(run_dir: str | Path) -> RunDirectory | None:
    """The training run in `run_dir`, or None when the directory holds an evaluation instead."""
    run_dir = Path(run_dir)
    path = run_dir / RECORD_FILE
    record = read_record(run_dir)
    if record is None:
        if not path.exists() and _config_is_evaluation(run_dir):
            return None
        return RunDirectory(run_dir=run_dir, status=UNREADABLE if path.exists() else MISSING)
    if is_evaluation(record):
        return None
    return RunDirectory(run_dir=run_dir, status=_status(record), record=record)


# MLflow's artifact stores (logger=mlflow keeps a copy of each run's metrics.json there): not run directories
TRACKING_FOLDERS = {"mlartifacts", "mlruns"}


def find_run_dirs(root: str | Path) -> list[Path]:
    """Directories under `root` (itself included) holding a metrics.json or a `.hydra/overrides.yaml`, in job
    order (`2` before `10`)."""
    root = Path(root)
    found = {p.parent for p in root.rglob(RECORD_FILE)}
    found |= {p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    return sorted((d for d in found if not TRACKING_FOLDERS & set(d.relative_to(root).parts)), key=_job_order)


def _job_order(path: Path) -> tuple[Any, ...]:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def find_runs(roots: Iterable[str | Path]) -> list[RunDirectory]:
    """Every training run under the given folders (sweeps, outputs/, or single run directories), in job order,
    each once."""
    runs, seen = [], set()
    for root in roots:
        for run_dir in find_run_dirs(root):
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            run = read_run_dir(run_dir)
            if run is not None:
                runs.append(run)
    return runs
