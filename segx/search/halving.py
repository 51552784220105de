"""Synchronous successive halving (`hydra.sweeper.scheduler=sha`): every configuration trains to the first rung, then
only the best 1/η of them go on to the next, and so on up to max_t. A trial waiting for its rung to fill is paused
(Ray Tune's PAUSE), and resumes from its run's own `last.ckpt` when promoted.

The rules:
- a rung's population is every trial that entered it (rung 0: all `num_trials`); it keeps the best
  max(1, ⌊population / η⌋), ranked by score at the rung's epoch, ties to the lower job number;
- a trial that ends by itself (failed, or completed early) before a rung leaves it and the rung is decided among the
  others, still keeping ⌊population / η⌋ (never more than arrived); a NaN score ranks last;
- a trial whose worker was lost and that Tune retries keeps its place: the rung waits for its score;
- the rung state is written to a JSON file beside Tune's experiment state after every change, so a search resumed
  after Ctrl-C or a killed driver makes the same decisions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from segx.core.files import write_json_atomic
from segx.search.searchers import JOB_KEY

log = logging.getLogger(__name__)

RUNNING, WAITING, DROPPED, ENDED = "running", "waiting", "dropped", "ended"
STALL_SECONDS = 120.0  # how long every trial may wait at a rung, none running, before it is decided as it stands


@dataclass
class JobState:
    """One configuration's place on the ladder: the rung it trains towards (or waits at) and its rung scores."""

    rung: int = 0
    state: str = RUNNING  # running (towards `rung`), waiting (at `rung`, undecided), dropped, ended
    scores: dict[str, float] = field(default_factory=dict)  # rung index (as a JSON key) → score there


class Ladder:
    """The rung bookkeeping of successive halving, free of Ray (SuccessiveHalving below is its Ray Tune face)."""

    def __init__(self, num_trials: int, rungs: list[int], reduction_factor: float) -> None:
        self.num_trials, self.rungs, self.eta = int(num_trials), [int(r) for r in rungs], float(reduction_factor)
        self.jobs: dict[int, JobState] = {}
        self.populations: list[list[int]] = [[] for _ in self.rungs]  # rung index → jobs that entered it
        self.decided: list[bool] = [False for _ in self.rungs]

    def add(self, job: int) -> None:
        if job not in self.jobs:
            self.jobs[job] = JobState()
            if self.rungs:
                self.populations[0].append(job)

    def keep(self, rung: int) -> int:
        return max(1, math.floor(len(self.populations[rung]) / self.eta))

    def arrive(self, job: int, epoch: int, score: float) -> tuple[str, list[int], list[int]]:
        """A report of `job` after `epoch` with `score`: its fate ('continue', 'wait' or 'stop') and the jobs that
        a decision this report completed promoted and dropped (the reporting job among them)."""
        self.add(job)
        state = self.jobs[job]
        if state.state == DROPPED:
            return "stop", [], []
        if state.state == ENDED or state.rung >= len(self.rungs) or epoch < self.rungs[state.rung]:
            return "continue", [], []
        if state.state == RUNNING and self.decided[state.rung]:  # arrived after its rung was decided without it
            state.state = DROPPED
            return "stop", [], [job]
        if state.state == RUNNING:
            state.scores[str(state.rung)] = float(score)
            state.state = WAITING
        promoted, dropped = self.decide_ready()
        fate = {RUNNING: "continue", WAITING: "wait", DROPPED: "stop", ENDED: "continue"}[state.state]
        return fate, promoted, dropped

    def end(self, job: int) -> tuple[list[int], list[int]]:
        """`job` ended by itself (completed, failed) or was removed: it leaves its rung, which may now be decided."""
        state = self.jobs.get(job)
        if state is None or state.state in (DROPPED, ENDED):
            return [], []
        state.state = ENDED
        return self.decide_ready()

    def ready(self, rung: int) -> bool:
        """Every member of the rung's population has arrived or ended (rung 0 also needs every trial added)."""
        if self.decided[rung] or (rung > 0 and not self.decided[rung - 1]):
            return False
        if rung == 0 and len(self.jobs) < self.num_trials:
            return False
        members = [self.jobs[j] for j in self.populations[rung]]
        return all(m.state in (ENDED, DROPPED) or (m.state == WAITING and m.rung == rung) for m in members)

    def decide_ready(self, force: bool = False) -> tuple[list[int], list[int]]:
        """Decide every rung that is ready (with `force`, the lowest undecided one as it stands)."""
        promoted: list[int] = []
        dropped: list[int] = []
        for rung in range(len(self.rungs)):
            if self.decided[rung]:
                continue
            if not (self.ready(rung) or force):
                break
            force = False
            up, down = self._decide(rung)
            promoted += up
            dropped += down
        return [j for j in promoted if j not in dropped], dropped

    def _decide(self, rung: int) -> tuple[list[int], list[int]]:
        arrived = [j for j in self.populations[rung] if self.jobs[j].state == WAITING and self.jobs[j].rung == rung]

        def rank(job: int) -> tuple[float, int]:
            score = self.jobs[job].scores.get(str(rung), float("nan"))
            return (-score if math.isfinite(score) else math.inf, job)

        ranked = sorted(arrived, key=rank)
        keep = min(self.keep(rung), len(ranked))
        promoted, dropped = ranked[:keep], ranked[keep:]
        for job in promoted:
            self.jobs[job].state, self.jobs[job].rung = RUNNING, rung + 1
        for job in dropped:
            self.jobs[job].state = DROPPED
        if rung + 1 < len(self.rungs):
            self.populations[rung + 1] = list(promoted)
        self.decided[rung] = True
        log.info("Successive halving, rung %d (epoch %d): %d of %d trial(s) go on (jobs %s), %d stopped", rung + 1,
                 self.rungs[rung], len(promoted), len(self.populations[rung]), ", ".join(map(str, promoted)) or "-",
                 len(dropped))
        return promoted, dropped

    def runnable(self, job: int) -> bool:
        """May the job train now (not waiting for its rung, not dropped)?"""
        state = self.jobs.get(job)
        return state is None or state.state == RUNNING

    def to_dict(self) -> dict[str, Any]:
        return {"num_trials": self.num_trials, "rungs": self.rungs, "reduction_factor": self.eta,
                "jobs": {str(j): asdict(s) for j, s in self.jobs.items()}, "populations": self.populations,
                "decided": self.decided}

    def load(self, payload: dict[str, Any]) -> None:
        if [int(r) for r in payload["rungs"]] != self.rungs or int(payload["num_trials"]) != self.num_trials:
            raise ValueError(f"the saved ladder has rungs {payload['rungs']} over {payload['num_trials']} trials, "
                             f"this search {self.rungs} over {self.num_trials}")
        self.jobs = {int(j): JobState(**s) for j, s in payload["jobs"].items()}
        self.populations = [list(p) for p in payload["populations"]]
        self.decided = list(payload["decided"])


class SuccessiveHalving(FIFOScheduler):
    """Ray Tune's scheduler for `Ladder`: PAUSE at a rung until it is decided, then the promoted trials run again
    (choose_trial_to_run) and the others are stopped. `state_path` keeps the ladder across a resumed search."""

    def __init__(self, num_trials: int, rungs: list[int], reduction_factor: float, max_t: int,
                 state_path: str | Path | None = None, max_running: int | None = None, time_attr: str = "epoch",
                 metric: str = "score", mode: str = "max") -> None:
        super().__init__()
        # Trials training at once. Tune's own max_concurrent_trials counts paused trials too, so a rung could never
        # fill once that many wait at it: the limit is kept here instead.
        self.max_running = max_running
        self._metric, self._mode = metric, mode
        self.ladder = Ladder(num_trials, rungs, reduction_factor)
        self.max_t, self.time_attr = int(max_t), time_attr
        self.state_path = str(state_path) if state_path else None
        self._stalled_since: float | None = None
        self._loaded = False  # a Tuner restored from its pickle holds this object as it was first built
        self._saved: dict[str, Any] | None = None  # the ladder as its file holds it

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    # --- the ladder's file -------------------------------------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        write_json_atomic(Path(checkpoint_path), self.ladder.to_dict())

    def restore(self, checkpoint_path: str) -> None:
        self.ladder.load(json.loads(Path(checkpoint_path).read_text()))

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.state_path and Path(self.state_path).is_file():
            self.restore(self.state_path)
            self._saved = self.ladder.to_dict()
            log.info("Successive halving resumed from %s: rungs decided %s", self.state_path,
                     sum(self.ladder.decided))

    def _save(self) -> None:
        """Rewrite the ladder's file when the ladder changed (most reports between rungs change nothing)."""
        if not self.state_path or self.ladder.to_dict() == self._saved:
            return
        Path(self.state_path).parent.mkdir(parents=True, exist_ok=True)
        self.save(self.state_path)
        self._saved = self.ladder.to_dict()

    # --- Tune's calls ------------------------------------------------------------------------------------------
    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._load_once()
        self.ladder.add(_job(trial))
        self._save()

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        self._load_once()
        epoch = int(result.get(self.time_attr, 0))
        score = float(result.get(self._metric, math.nan))
        score = score if self._mode == "max" else -score
        fate, promoted, dropped = self.ladder.arrive(_job(trial), epoch, score)
        self._save()
        self._stop_others(tune_controller, trial, dropped)
        if fate == "stop" or epoch >= self.max_t:
            return TrialScheduler.STOP
        return TrialScheduler.PAUSE if fate == "wait" else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        if will_retry(trial):  # Tune requeues it (on_trial_add follows): it still owes its rung a score
            log.info("Successive halving: job %d lost its worker and is retried; its rung waits for it", _job(trial))
            return
        self._ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._ended(tune_controller, trial)

    def _ended(self, tune_controller: Any, trial: Trial) -> None:
        self._load_once()
        _, dropped = self.ladder.end(_job(trial))
        self._save()
        self._stop_others(tune_controller, trial, dropped)

    def _stop_others(self, tune_controller: Any, current: Trial | None, dropped: list[int]) -> None:
        """Stop the dropped trials that wait paused (or pending, after a resume); the reporting one gets STOP."""
        gone = set(dropped)
        for trial in tune_controller.get_trials():
            if trial is not current and _job(trial) in gone and trial.status in (Trial.PAUSED, Trial.PENDING):
                tune_controller.stop_trial(trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        self._load_once()
        trials = tune_controller.get_trials()
        # a trial dropped while the search was down comes back PENDING from Tune's restore: end it now
        self._stop_others(tune_controller, None, [j for j, s in self.ladder.jobs.items() if s.state == DROPPED])
        running = sum(t.status == Trial.RUNNING for t in trials)
        if self.max_running and running >= self.max_running:
            return None
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in trials:
                if trial.status == status and self.ladder.runnable(_job(trial)):
                    return trial
        # Nothing may run and nothing runs: every trial there is waits at a rung that cannot fill. With every
        # announced trial here that is a rule this ladder does not foresee; with some missing, Tune may yet create
        # them, so give it STALL_SECONDS. Then decide the rung among those that arrived rather than hang.
        waiting = running == 0 and any(t.status in (Trial.PENDING, Trial.PAUSED) for t in trials)
        if not waiting:
            self._stalled_since = None
            return None
        now = time.monotonic()
        self._stalled_since = self._stalled_since or now
        if len(self.ladder.jobs) < self.ladder.num_trials and now - self._stalled_since < STALL_SECONDS:
            return None
        log.warning("Successive halving: %d of %d trials came and all wait at a rung; deciding it among them",
                    len(self.ladder.jobs), self.ladder.num_trials)
        self._stalled_since = None
        _, dropped = self.ladder.decide_ready(force=True)
        self._save()
        self._stop_others(tune_controller, None, dropped)
        for trial in trials:
            if trial.status in (Trial.PENDING, Trial.PAUSED) and self.ladder.runnable(_job(trial)):
                return trial
        return None

    def debug_string(self) -> str:
        decided = sum(self.ladder.decided)
        return f"Using successive halving: rungs at epochs {self.ladder.rungs}, {decided} decided."


def will_retry(trial: Any) -> bool:
    """Tune calls on_trial_error both for a trial it requeues after a lost worker and for one that failed for good;
    only the first has already been marked ERROR (TuneController._try_recover stops it before it requeues it)."""
    return trial.status == Trial.ERROR and trial.should_recover()


def _job(trial: Any) -> int:
    return int(trial.config[JOB_KEY])
