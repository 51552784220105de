"""The search's driver-side record of how each trial ended, where the trial itself cannot say it."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from segx.runs.job import job_end_line, record_worker_death
from segx.runs.record import read_record, write_stop_verdict
from segx.runs.retries import retry_line
from segx.runs.status import ACTIVE
from segx.search.searchers import JOB_KEY
from segx.search.space import SearchSpace
from segx.search.trial import trial_overrides

log = logging.getLogger(__name__)

# In Tune's experiment folder: every report the scheduler judged, in its order (a trial's last epoch is reported once
# its run has ended and recorded it)
REPORTS_FILE = "segx-reports.jsonl"


class TrialOutcomes(Callback):
    """In the driver: a trial the scheduler ended early gets its verdict file (segx.runs.record.STOP_FILE); one
    whose worker died after its retries is recorded as failed in its run directory."""

    def __init__(self, sweep_dir: Path, space: SearchSpace, stopped_by: str, reports: Path | None = None) -> None:
        self.sweep_dir, self.space, self.stopped_by, self.reports = sweep_dir, space, stopped_by, reports

    def _run_dir(self, trial: Any) -> Path:
        return self.sweep_dir / str(trial.config[JOB_KEY])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        """Appends the report to REPORTS_FILE: Tune calls this right after its scheduler judged the same result, so
        the file's order is the scheduler's (segx.search.replay.replay_events replays it)."""
        if self.reports is None or "score" not in result:
            return
        line = {"job": int(trial.config[JOB_KEY]), "epoch": int(result.get("epoch", 0)),
                "score": float(result["score"]), "time": time.time()}
        with open(self.reports, "a") as file:  # one short line per write: a killed driver leaves whole lines
            file.write(json.dumps(line) + "\n")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_dir = self._run_dir(trial)
        record = read_record(run_dir)
        if record is None or record.get("status") not in ACTIVE:  # the run ended by itself and said how
            log.info("%s", job_end_line(int(trial.config[JOB_KEY]), run_dir))
            return
        epoch = (trial.last_result or {}).get("epoch")
        write_stop_verdict(run_dir, epoch, self.stopped_by)
        log.info("Trial %s stopped by %s after epoch %s", run_dir.name, self.stopped_by, epoch)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Tune requeues a trial whose worker was lost: its record says it waits, and the console which job it is."""
        log.warning("%s", retry_line(int(trial.config[JOB_KEY]), self._run_dir(trial), _error(trial),
                                     int(trial.run_metadata.num_failures), int(trial.max_failures),
                                     "hydra.sweeper.ray.remote.max_retries"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        job = int(trial.config[JOB_KEY])
        retried = max(0, int(trial.run_metadata.num_failures) - 1)
        message = (f"The Ray worker running trial {job} died and was retried {retried} time(s) "
                   f"(hydra.sweeper.ray.remote.max_retries); Ray said: {_error(trial)}")
        log.error("Trial %d: %s", job, message)
        record_worker_death(self._run_dir(trial), job, trial_overrides(trial.config, self.space), "tune", message)


def _error(trial: Any) -> str:
    """The first line of the error Tune wrote for a trial's last failure (its error file, local to the driver), or a
    word when there is none."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    last = text.rsplit("Failure # ", 1)[-1].splitlines()[1:]  # "Failure # n (occurred at ...)" heads each failure
    said = [line.strip() for line in last if line.strip()]
    return said[0] if said else "the worker's process or node went away"
