"""Replaying search schedulers on recorded learning curves: the real scheduler objects (Ray Tune's ASHA, HyperBand,
median stopping, segx's successive halving) fed one simulated epoch at a time, in a given trial order and with a
given number of trials at once. The search bench and the report's "what if" section share it."""

from __future__ import annotations

import heapq
import logging
import math
import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segx.runs.status import COMPLETED

PENDING, RUNNING, PAUSED, TERMINATED = "PENDING", "RUNNING", "PAUSED", "TERMINATED"  # Ray Tune's Trial statuses


@dataclass
class SimTrial:
    """What Ray's schedulers read of a trial."""

    trial_id: str
    config: dict[str, Any]
    curve: Sequence[float]
    status: str = PENDING
    is_saving: bool = False
    epochs: int = 0
    last_result: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:  # HyperBand and median stopping key dicts by trial
        return hash(self.trial_id)

    def __str__(self) -> str:
        return self.trial_id


class SimController:
    """The few TuneController calls the schedulers make, over simulated trials."""

    def __init__(self, scheduler: Any, trials: list[SimTrial]) -> None:
        self.scheduler, self.trials = scheduler, trials

    def get_trials(self) -> list[SimTrial]:
        return self.trials

    def get_live_trials(self) -> list[SimTrial]:
        return [t for t in self.trials if t.status != TERMINATED]

    def stop_trial(self, trial: SimTrial) -> None:
        if trial.status == TERMINATED:
            return
        previous, trial.status = trial.status, TERMINATED
        if previous in (PENDING, PAUSED):
            self.scheduler.on_trial_remove(self, trial)
        else:
            self.scheduler.on_trial_complete(self, trial, trial.last_result)


@dataclass
class Outcome:
    """One simulated search: the epochs each trial trained."""

    epochs: list[int]
    max_t: int

    def fraction(self) -> float:
        return sum(self.epochs) / (len(self.epochs) * self.max_t)


def simulate(scheduler: Any, curves: Sequence[Sequence[float]], order: Sequence[int], workers: int,
             rng: random.Random | None = None) -> Outcome:
    """Run `scheduler` over trials whose epoch k scores `curves[i][k-1]`, added in `order`, `workers` at a time.
    With `rng`, an epoch lasts 0.8–1.2 units and a trial's (re)start up to 0.5 more, as real trials vary (with equal
    times, trials would reach every rung in the order they started); without, every epoch lasts 1. The final epoch
    is reported after the trial completed, as segx's trials do."""

    def epoch_time(starting: bool) -> float:
        if rng is None:
            return 1.0
        return rng.uniform(0.8, 1.2) + (rng.uniform(0.0, 0.5) if starting else 0.0)

    max_t = len(curves[0])
    trials = [SimTrial(f"t{i:04d}", {"_job": i}, curves[i]) for i in range(len(curves))]
    controller = SimController(scheduler, [trials[i] for i in order])
    for trial in controller.trials:
        scheduler.on_trial_add(controller, trial)
    clock, sequence, running = 0.0, 0, []  # heap of (time the epoch ends, tie-breaker, trial)

    def fill() -> None:
        nonlocal sequence
        while sum(1 for t in controller.trials if t.status == RUNNING) < workers:
            trial = scheduler.choose_trial_to_run(controller)
            if trial is None:
                return
            trial.status = RUNNING
            sequence += 1
            heapq.heappush(running, (clock + epoch_time(True), sequence, trial))

    fill()
    while running:
        clock, _, trial = heapq.heappop(running)
        if trial.status != RUNNING:
            continue
        trial.epochs += 1
        result = {"epoch": trial.epochs, "score": float(trial.curve[trial.epochs - 1]),
                  "training_iteration": trial.epochs, "time_total_s": float(trial.epochs), "done": False}
        if trial.epochs >= max_t:
            trial.last_result, trial.status = result, TERMINATED
            scheduler.on_trial_complete(controller, trial, result)
        else:
            decision = scheduler.on_trial_result(controller, trial, result)
            trial.last_result = result
            if decision == "CONTINUE":
                sequence += 1
                heapq.heappush(running, (clock + epoch_time(False), sequence, trial))
            elif decision == "PAUSE":
                trial.status = PAUSED
            else:
                controller.stop_trial(trial)
        fill()
    return Outcome([t.epochs for t in trials], max_t)


# --- schedulers by name ------------------------------------------------------------------------------------------
SchedulerFactory = Callable[[int, int], Any]  # (trials, max_t) → a fresh scheduler


def factory(kind: str, grace_period: int = 1, reduction_factor: float = 3, keep: int = 3,
            rungs: Sequence[int] | None = None) -> SchedulerFactory:
    """A fresh scheduler per simulation: `sha`, `asha`, `hyperband`, `median` or `topk` (one epoch each, then the
    best `keep` to the end)."""
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, MedianStoppingRule

    from segx.search.halving import SuccessiveHalving
    from segx.search.plan import SearchPlan

    def build(trials: int, max_t: int) -> Any:
        if kind == "asha":
            return ASHAScheduler(time_attr="epoch", metric="score", mode="max", max_t=max_t, grace_period=grace_period,
                                 reduction_factor=reduction_factor, stop_last_trials=False)
        if kind == "hyperband":
            return HyperBandScheduler(time_attr="epoch", metric="score", mode="max", max_t=max_t,
                                      reduction_factor=reduction_factor, stop_last_trials=False)
        if kind == "median":
            return MedianStoppingRule(time_attr="epoch", metric="score", mode="max", grace_period=grace_period,
                                      min_samples_required=3)
        if kind == "topk":
            return SuccessiveHalving(trials, [1], trials / keep, max_t)
        if kind == "sha":
            plan = SearchPlan(search="grid", scheduler="sha", trials=trials, max_t=max_t, grace_period=grace_period,
                              reduction_factor=reduction_factor, listed_rungs=list(rungs) if rungs else None)
            return SuccessiveHalving(trials, [int(r) for r in plan.rungs], reduction_factor, max_t)
        raise ValueError(f"unknown scheduler {kind!r}; use sha, asha, hyperband, median or topk")

    return build


# --- recorded grids ----------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """A finished grid's curves: configuration (its settings but the seed) → seed → score per epoch."""

    curves: dict[str, dict[str, list[float]]]
    max_t: int

    @property
    def configs(self) -> list[str]:
        return sorted(self.curves)

    @property
    def seeds(self) -> list[str]:
        """The seeds every configuration was trained with."""
        common = set.intersection(*(set(by_seed) for by_seed in self.curves.values())) if self.curves else set()
        return sorted(common)

    def best_config(self) -> str:
        """The configuration with the highest best score, averaged over seeds."""
        return max(self.configs, key=lambda c: statistics.fmean(max(self.curves[c][s]) for s in self.seeds))

    def noise(self) -> float:
        """The seed spread of the best configuration: the standard deviation of its best score over seeds (0 with
        one seed)."""
        bests = [max(self.curves[self.best_config()][s]) for s in self.seeds]
        return statistics.stdev(bests) if len(bests) > 1 else 0.0


def grid_from_runs(runs: Iterable[Any], monitor: str) -> Grid | None:
    """A Grid of the completed runs (segx.runs.discovery.Run) that trained the same number of epochs, each keyed by
    the overrides that vary between runs, less `seed=`; None when fewer than 2 configurations qualify."""
    finished = []
    for run in runs:
        scores = [h.get(monitor) for h in run.record.get("history") or []]
        if run.status == COMPLETED and scores and all(s is not None and math.isfinite(s) for s in scores):
            finished.append((list(run.record.get("overrides") or []), [float(s) for s in scores]))
    if not finished:
        return None
    max_t = statistics.mode(len(scores) for _, scores in finished)
    finished = [(overrides, scores) for overrides, scores in finished if len(scores) == max_t]
    shared = set.intersection(*(set(overrides) for overrides, _ in finished))
    curves: dict[str, dict[str, list[float]]] = {}
    for overrides, scores in finished:
        seed = next((o.split("=", 1)[1] for o in overrides if o.startswith("seed=")), "")
        key = " ".join(o for o in overrides if o not in shared and not o.startswith("seed="))
        curves.setdefault(key, {})[seed] = scores
    grid = Grid(curves, max_t)
    return grid if len(grid.configs) >= 2 and grid.seeds else None


# --- measured over orders and seeds ------------------------------------------------------------------------------
def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default)."""
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Summary:
    """A scheduler over many simulated searches: epoch fractions, regrets, winners."""

    name: str
    workers: int
    fractions: list[float]
    regrets: list[float]
    same_winner: list[bool]
    noise: float
    found: list[str] = field(default_factory=list)  # the configuration each simulated search picked

    def row(self) -> dict[str, Any]:
        ordered = sorted(self.fractions)
        good = sum(r <= self.noise + 1e-12 for r in self.regrets)
        low, high = wilson(good, len(self.regrets))
        return {"scheduler": self.name, "workers": self.workers, "runs": len(self.fractions),
                "fraction_median": statistics.median(ordered),
                "fraction_p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
                "fraction_min": ordered[0], "fraction_max": ordered[-1],
                "p_regret_le_noise": good / len(self.regrets), "p_low": low, "p_high": high,
                "p_same_winner": sum(self.same_winner) / len(self.same_winner), "noise": self.noise}


def replay(grid: Grid, name: str, make: SchedulerFactory, workers: int, orders: int, seed: int = 0) -> Summary:
    """`make`'s scheduler over `orders` random trial orders for every seed of `grid` (the same orders for each)."""
    halving_log = logging.getLogger("segx.search.halving")
    level, halving_log.level = halving_log.level, logging.WARNING  # a line per rung × thousands of searches
    try:
        configs, rng = grid.configs, random.Random(seed)
        permutations = [rng.sample(range(len(configs)), len(configs)) for _ in range(orders)]
        fractions, regrets, same, picked = [], [], [], []
        for seed_name in grid.seeds:
            curves = [grid.curves[c][seed_name] for c in configs]
            bests = [max(c) for c in curves]
            winner = max(range(len(configs)), key=lambda i: (bests[i], -i))
            for index, order in enumerate(permutations):
                timing = random.Random(f"{seed}-{seed_name}-{index}")  # the same times for every scheduler
                outcome = simulate(make(len(configs), grid.max_t), curves, order, workers, timing)
                seen = [max(c[:e]) if e else -math.inf for c, e in zip(curves, outcome.epochs, strict=True)]
                found = max(range(len(configs)), key=lambda i: (seen[i], -i))
                fractions.append(outcome.fraction())
                regrets.append(bests[winner] - bests[found])
                same.append(found == winner)
                picked.append(configs[found])
        return Summary(name, workers, fractions, regrets, same, grid.noise(), picked)
    finally:
        halving_log.level = level


DEFAULT_SCHEDULERS: dict[str, dict[str, Any]] = {
    # name → factory arguments; "sha" and "asha" at the tune sweeper's defaults (grace_period 2, reduction_factor 3)
    "sha": {"kind": "sha", "grace_period": 2, "reduction_factor": 3},
    "sha g1 rf3": {"kind": "sha", "grace_period": 1, "reduction_factor": 3},
    "sha [2,4,8] rf2": {"kind": "sha", "reduction_factor": 2, "rungs": [2, 4, 8]},
    "asha": {"kind": "asha", "grace_period": 2, "reduction_factor": 3},
    "asha g1 rf3": {"kind": "asha", "grace_period": 1, "reduction_factor": 3},
    "asha g1 rf2": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
    "asha g3 rf3": {"kind": "asha", "grace_period": 3, "reduction_factor": 3},
    "hyperband rf3": {"kind": "hyperband", "reduction_factor": 3},
    "median stopping": {"kind": "median", "grace_period": 1},
    "top 3 after 1 epoch": {"kind": "topk", "keep": 3},
}


def replay_table(grid: Grid, schedulers: dict[str, dict[str, Any]] | None = None, workers: Sequence[int] = (1, 4),
                 orders: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """One row per scheduler and worker count (see Summary.row)."""
    rows = []
    for name, arguments in (schedulers or DEFAULT_SCHEDULERS).items():
        for count in workers:
            rows.append(replay(grid, name, factory(**arguments), count, orders, seed).row())
    return rows


def replay_events(scheduler: Any, events: Sequence[tuple[int, int, float]], jobs: int) -> dict[int, tuple[int, str]]:
    """Feed recorded reports `(job, epoch, score)`, in the order they happened, to `scheduler`: job → the epoch and
    decision (CONTINUE, PAUSE or STOP) of its last report. Checks a replay against a real search's decisions."""
    trials = [SimTrial(f"t{i:04d}", {"_job": i}, []) for i in range(jobs)]
    controller = SimController(scheduler, trials)
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
    decisions: dict[int, tuple[int, str]] = {}
    for job, epoch, score in events:
        trial = trials[job]
        if trial.status == TERMINATED:
            continue
        trial.status = RUNNING
        result = {"epoch": epoch, "score": score, "training_iteration": epoch, "time_total_s": float(epoch)}
        decisions[job] = (epoch, scheduler.on_trial_result(controller, trial, result))
        trial.last_result = result
        if decisions[job][1] == "STOP":
            controller.stop_trial(trial)
    return decisions


def recorded_events(experiment: str | Path) -> list[tuple[int, int, float]]:
    """The reports of a search's Tune experiment folder, `(job, epoch, score)` in the order its scheduler judged
    them (segx.search.outcomes.REPORTS_FILE); a line cut short by a killed driver is skipped."""
    import json

    from segx.search.outcomes import REPORTS_FILE

    events = []
    path = Path(experiment) / REPORTS_FILE
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
            events.append((int(row["job"]), int(row["epoch"]), float(row["score"])))
        except (ValueError, KeyError, TypeError):
            continue
    return events
