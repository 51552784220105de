"""Ray Tune searchers over a SearchSpace that number their trials 0, 1, 2, ... as a Hydra sweep numbers its jobs,
so each trial is the run directory `<sweep dir>/<N>/`."""

from __future__ import annotations

import pickle
import random
from typing import Any

from ray.tune.search import Searcher

from segx.search.space import Distribution, SearchSpace

JOB_KEY = "_job"  # the trial's job number, in each trial's config


class GridSearcher(Searcher):
    """Every grid point `samples` times (the first axis varying slowest), each with its distributions drawn from
    a seeded random generator: the same seed gives the same trials. `points` replaces the grid's with a list of
    its own (the confirmation stage's), numbered from `first_job`. With `shuffle` the trials start in a seeded
    random order (each keeps its job number, its place in the grid): ASHA judges a trial only against those that
    reached its rung before it, so a grid ordered from weak to strong (lr ascending) would pass nearly every trial."""

    def __init__(self, space: SearchSpace, samples: int, seed: int, metric: str, mode: str,
                 points: list[dict[str, str]] | None = None, first_job: int = 0, shuffle: bool = False) -> None:
        super().__init__(metric=metric, mode=mode)
        grid = space.grid_points() if points is None else points
        self.points = [point for point in grid for _ in range(samples)]
        self.distributions = space.distributions
        self.rng = random.Random(seed)
        self.order = list(range(len(self.points)))
        if shuffle:
            random.Random(f"order-{seed}").shuffle(self.order)  # its own generator: the samples stay as they were
        self.first_job = first_job
        self.next_job = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.next_job >= len(self.points):
            return Searcher.FINISHED
        index = self.order[self.next_job]
        values = dict(self.points[index])
        values.update({key: dist.sample(self.rng) for key, dist in self.distributions.items()})
        config = {JOB_KEY: self.first_job + index, **values}
        self.next_job += 1
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # a grid does not learn from its trials

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump({"next_job": self.next_job, "rng": self.rng.getstate()}, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            state = pickle.load(file)
        self.next_job = state["next_job"]
        self.rng.setstate(state["rng"])


def optuna_distribution(dist: Distribution) -> Any:
    """A Distribution as Optuna's (integer intervals include both ends, as Hydra's do)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if dist.kind == "choice":
        return CategoricalDistribution(list(dist.values))
    log = dist.kind == "loguniform"
    if dist.integer:
        return IntDistribution(int(dist.low), int(dist.high), log=log)
    return FloatDistribution(dist.low, dist.high, log=log)


class NumberedSearcher(Searcher):
    """Another searcher (Optuna's) with each suggestion numbered and its values written as override strings."""

    def __init__(self, inner: Searcher, limit: int) -> None:
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner = inner
        self.limit = limit
        self.next_job = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.next_job >= self.limit:
            return Searcher.FINISHED
        suggested = self.inner.suggest(trial_id)
        if not isinstance(suggested, dict):
            return suggested
        config = {JOB_KEY: self.next_job, **{key: _as_override(value) for key, value in suggested.items()}}
        self.next_job += 1
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.inner.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path + ".inner")
        with open(checkpoint_path, "wb") as file:
            pickle.dump({"next_job": self.next_job}, file)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path + ".inner")
        with open(checkpoint_path, "rb") as file:
            self.next_job = pickle.load(file)["next_job"]


def _as_override(value: Any) -> str:
    """A sampled value as Hydra reads it back: floats in full precision, the rest as written."""
    return repr(value) if isinstance(value, float) else str(value)
