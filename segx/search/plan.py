"""search.json: what a search set out to do (searcher, scheduler, trials, epochs per trial, its parameters and the
confirmation stage), written by the tune sweeper into the sweep directory so a report can tell a search from a grid."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segx.core.files import write_json_atomic
from segx.search.space import SearchSpace

SEARCH_FILE = "search.json"


@dataclass
class SearchPlan:
    """A search's settings and stages; `confirm_jobs` are the job numbers of the confirmation stage."""

    search: str  # grid, random or optuna
    scheduler: str  # sha, asha, hyperband or none
    trials: int  # of the search stage (jobs 0 … trials-1)
    max_t: int  # epochs a trial trains unless stopped
    grace_period: int = 1
    reduction_factor: float = 3
    parameters: dict[str, str] = field(default_factory=dict)  # key → "grid", "choice", "uniform" or "loguniform"
    confirm_jobs: list[int] = field(default_factory=list)
    confirm_seeds: list[int] = field(default_factory=list)
    listed_rungs: list[int] | None = None  # hydra.sweeper.rungs, when given

    @property
    def rungs(self) -> list[float]:
        """The epochs after which ASHA or successive halving compare trials: the listed ones, else
        grace_period · reduction_factor^k below max_t (whole epochs for successive halving)."""
        if self.scheduler not in ("asha", "sha") or self.reduction_factor <= 1:
            return []
        if self.listed_rungs:
            return [int(r) for r in self.listed_rungs]
        rungs, epoch = [], float(self.grace_period)
        while epoch < self.max_t:
            rungs.append(math.ceil(epoch) if self.scheduler == "sha" else epoch)
            epoch *= self.reduction_factor
        return sorted(set(rungs))

    @property
    def log_scale(self) -> set[str]:
        """Parameters sampled on a log scale."""
        return {key for key, kind in self.parameters.items() if kind == "loguniform"}


def space_kinds(space: SearchSpace) -> dict[str, str]:
    """Each varied key's kind, grid axes first."""
    return {**{key: "grid" for key in space.grid}, **{key: d.kind for key, d in space.distributions.items()}}


def write_plan(sweep_dir: str | Path, plan: SearchPlan) -> None:
    write_json_atomic(Path(sweep_dir) / SEARCH_FILE, asdict(plan))


def read_plan(sweep_dir: str | Path) -> SearchPlan | None:
    """The plan in `sweep_dir`, or None where there is none (a grid sweep) or it cannot be read."""
    try:
        payload: dict[str, Any] = json.loads((Path(sweep_dir) / SEARCH_FILE).read_text())
        return SearchPlan(**payload)
    except (OSError, ValueError, TypeError):
        return None
