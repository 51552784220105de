"""A sweep's overrides in Hydra's grammar read as a search space: grid axes, sampled distributions, fixed settings.

Comma lists, `range(...)` and `glob(*)` are grid axes (a preset expands to exactly its job count); `choice(...)`,
`interval(a, b)` and `tag(log, interval(a, b))` are distributions a search samples from.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

from segx.core.errors import ConfigError


@dataclass(frozen=True)
class Distribution:
    """One sampled parameter: `choice` over values, or a `uniform` / `loguniform` interval (integers when both ends
    are)."""

    kind: str  # "choice", "uniform" or "loguniform"
    values: tuple[str, ...] = ()  # choice: the override values, as written
    low: float = 0.0
    high: float = 0.0
    integer: bool = False

    def sample(self, rng: random.Random) -> str:
        """One value, as an override's value string."""
        if self.kind == "choice":
            return rng.choice(self.values)
        if self.kind == "loguniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return str(int(round(value))) if self.integer else repr(float(value))


@dataclass
class SearchSpace:
    """The trials a sweep asks for: every combination of `grid` values, each with its `distributions` sampled."""

    grid: dict[str, list[str]] = field(default_factory=dict)
    distributions: dict[str, Distribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)  # overrides every trial shares, as written

    @property
    def keys(self) -> list[str]:
        """Every key the search varies, grid axes first."""
        return [*self.grid, *self.distributions]

    def grid_points(self) -> list[dict[str, str]]:
        """The grid's combinations in Hydra's basic sweeper order (the first axis varies slowest)."""
        return [dict(zip(self.grid, values, strict=True)) for values in itertools.product(*self.grid.values())]

    def trial_overrides(self, values: dict[str, str]) -> list[str]:
        """A trial's full override list: the shared settings (less those the trial sets), then its own values."""
        shared = [o for o in self.fixed if o.partition("=")[0].lstrip("+~") not in values]
        return [*shared, *(f"{key}={value}" for key, value in values.items())]


def _number(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: interval({value}, ...) needs numbers at both ends.") from None


def _distribution(override: Any, key: str) -> Distribution:
    """`choice(...)` or an (optionally log-tagged) `interval(a, b)` as a Distribution."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep

    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        return Distribution("choice", values=tuple(override.sweep_string_iterator()))
    if isinstance(sweep, IntervalSweep):
        low, high = _number(sweep.start, key), _number(sweep.end, key)
        log = "log" in (sweep.tags or set())
        if not low < high:
            raise ConfigError(f"{key}=interval({sweep.start}, {sweep.end}): the lower end must be below the upper.")
        if log and low <= 0:
            raise ConfigError(f"{key}=tag(log, interval({sweep.start}, {sweep.end})): a log interval needs a positive "
                              "lower end (e.g. 1e-5).")
        integer = isinstance(sweep.start, int) and isinstance(sweep.end, int)
        return Distribution("loguniform" if log else "uniform", low=low, high=high, integer=integer)
    raise ConfigError(f"{key}: the tune sweeper cannot read {override.input_line!r}; use a comma list, range(...), "
                      "glob(*), choice(...), interval(a, b) or tag(log, interval(a, b)).")


def parse_space(overrides: list[str], config_loader: Any = None) -> SearchSpace:
    """The search space of a sweep's overrides (its preset's `hydra.sweeper.params` first, then the command line's);
    `config_loader` lets `glob(*)` list a config group's options. A key given twice keeps its last value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    space = SearchSpace()
    fixed: dict[str, str] = {}
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(overrides):
        key = override.get_key_element()
        for place in (space.grid, space.distributions, fixed):
            place.pop(key, None)
        sweep = override.value() if override.is_sweep_override() else None
        if sweep is None:
            fixed[key] = f"{key}={override.get_value_element_as_str()}"
        elif isinstance(sweep, ChoiceSweep) and not sweep.simple_form:  # choice(a,b): sampled, not a grid axis
            space.distributions[key] = _distribution(override, key)
        elif override.is_discrete_sweep():  # a,b / range(...) / glob(*)
            space.grid[key] = list(override.sweep_string_iterator())
        else:
            space.distributions[key] = _distribution(override, key)
    space.fixed = list(fixed.values())
    return space
