"""Runs as a report sees them: each run directory (found and read by `segx.runs.discovery`) with its settings,
scores and history, grouped into configurations that differ only by seed.

Tolerant by design: a job still running, a failed one, one whose metrics.json is missing or corrupt, and runs
written by older versions (no `status`, `monitor` or `overrides`) all read back as a `Run`, never an exception.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from segx.runs.discovery import RunDirectory, find_runs, read_run_dir
from segx.runs.overrides import override_settings, split_override
from segx.runs.record import DEFAULT_MONITOR

CHAINED_KEY = "chained_trials"  # metrics.json's field, and the setting that marks such a run when no override does


@dataclass
class Run(RunDirectory):
    """One training job: where it is, what it overrode, how it ended and what it measured."""

    settings: dict[str, str] = field(default_factory=dict)  # override key → value, without data.root and hydra.*

    @property
    def monitor(self) -> str:
        return str(self.record.get("monitor") or DEFAULT_MONITOR)

    @property
    def best(self) -> dict[str, Any]:
        best = self.record.get("best")
        return best if isinstance(best, dict) else {}

    @property
    def history(self) -> list[dict[str, Any]]:
        history = self.record.get("history")
        return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []

    def value(self, key: str) -> float | None:
        """A top-level number of metrics.json (`seconds_per_epoch`, `predict_val_seconds`), None when absent."""
        return _number(self.record.get(key))

    def best_value(self, metric: str) -> float | None:
        """`metric` (e.g. `val/miou`) at the best epoch, picked by the run's own monitor."""
        return _number(self.best.get(metric))

    @property
    def chained_trials(self) -> tuple[int, int] | None:
        """(trials, epochs per trial) of a run trained as the study's chained trials (metrics.json's
        `chained_trials`), None for an ordinary run."""
        return parse_chained_trials(self.record.get("chained_trials"))

    @property
    def parameters(self) -> int | None:
        counts = self.record.get("parameters")
        if not isinstance(counts, dict):
            return None
        value = counts.get("total", counts.get("trainable"))
        return int(value) if isinstance(value, int | float) else None

    @cached_property
    def config(self) -> Any:
        """The composed config (`.hydra/config.yaml`), or None."""
        try:
            return OmegaConf.load(self.run_dir / ".hydra" / "config.yaml")
        except Exception:  # missing or malformed: callers fall back to defaults
            return None

    @cached_property
    def choices(self) -> dict[str, str]:
        """The config groups Hydra chose (`model` → `unet`, from `.hydra/hydra.yaml`), {} when unknown."""
        try:
            chosen = OmegaConf.select(OmegaConf.load(self.run_dir / ".hydra" / "hydra.yaml"), "hydra.runtime.choices")
            values = OmegaConf.to_container(chosen, resolve=False) if chosen is not None else {}
        except Exception:  # missing or malformed: no choices known
            return {}
        return {str(k): str(v) for k, v in values.items() if v is not None} if isinstance(values, dict) else {}

    def setting(self, key: str) -> str | None:
        """`key`'s value for this run: its override, else Hydra's group choice, else the composed config's value
        (a scalar only); None when none says."""
        if key in self.settings:
            return self.settings[key]
        if key in self.choices:
            return self.choices[key]
        try:
            value = OmegaConf.select(self.config, key) if self.config is not None else None
        except Exception:  # an interpolation that cannot be resolved here
            return None
        return None if value is None or OmegaConf.is_config(value) else str(value)

    @property
    def class_names(self) -> list[str]:
        """From metrics.json, else the run's config, else the VOC names."""
        names = self.record.get("class_names")
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        config = self.config
        try:
            names = list(config.data.class_names) if config is not None else []
        except Exception:
            names = []
        if names:
            return [str(n) for n in names]
        from segx.data.voc_classes import VOC_CLASSES

        return list(VOC_CLASSES)

    @property
    def checkpoint(self) -> Path:
        """`checkpoints/best.ckpt` here (right for a copied or moved sweep), else the path metrics.json recorded."""
        local = self.run_dir / "checkpoints" / "best.ckpt"
        recorded = self.record.get("best_checkpoint")
        return Path(recorded) if not local.is_file() and recorded else local


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def parse_chained_trials(value: Any) -> tuple[int, int] | None:
    """`{"trials": 3, "epochs_per_trial": 25}` → (3, 25); None when absent, null or malformed."""
    if not isinstance(value, dict):
        return None
    trials, length = _number(value.get("trials")), _number(value.get("epochs_per_trial"))
    if trials is None or length is None or trials < 1 or length < 1 or trials % 1 or length % 1:
        return None
    return int(trials), int(length)


def _settings(found: RunDirectory) -> dict[str, str]:
    """The run's overrides as settings; a chained-trials run whose overrides do not say so (e.g. set by a preset)
    gets `chained_trials=<trials>x<epochs>`, so it never groups with ordinary runs and its label shows it."""
    settings = override_settings(found.overrides)
    chained = parse_chained_trials(found.record.get("chained_trials"))
    if chained is not None and not any("chained" in key for key in settings):
        settings[CHAINED_KEY] = f"{chained[0]}x{chained[1]}"
    return settings


def _with_settings(found: RunDirectory) -> Run:
    values = {f.name: getattr(found, f.name) for f in fields(RunDirectory)}
    return Run(**values, settings=_settings(found))


def read_run(run_dir: str | Path) -> Run | None:
    """The run in `run_dir`, or None when the directory holds an evaluation rather than a training run."""
    found = read_run_dir(run_dir)
    return _with_settings(found) if found is not None else None


def collect_runs(*roots: str | Path) -> list[Run]:
    """Every training run under the given folders (sweeps, outputs/, or single run directories), in job order."""
    return [_with_settings(found) for found in find_runs(roots)]


def common_overrides(runs: list[Run]) -> list[str]:
    """`key=value` settings every run shares, in the first run's order."""
    if not runs:
        return []
    first = runs[0].settings
    return [f"{k}={v}" for k, v in first.items() if all(r.settings.get(k, None) == v for r in runs)]


def varying_keys(runs: list[Run], over: str = "seed") -> list[str]:
    """The override keys whose value differs between runs (or is missing in some), `over` excluded."""
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run.settings if k not in keys)
    shared = {split_override(o)[0] for o in common_overrides(runs)}
    return [k for k in keys if k != over and k not in shared]


@dataclass
class Configuration:
    """Jobs that differ only by `over` (the seed): the unit a report compares."""

    settings: dict[str, str]  # varying key → value (keys absent from these runs are left out)
    runs: list[Run]
    name: str = "(all runs)"  # the label when nothing varies

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items()) or self.name

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.completed]

    @property
    def monitor(self) -> str:
        """The metric that picked its jobs' best epochs (the most common one, should they differ)."""
        monitors = [r.monitor for r in self.completed or self.runs]
        return max(set(monitors), key=monitors.count) if monitors else DEFAULT_MONITOR

    def best_values(self, metric: str) -> list[float]:
        """`metric` at each completed job's best epoch (jobs that lack it are left out)."""
        return [v for v in (r.best_value(metric) for r in self.completed) if v is not None]

    def mean(self, metric: str) -> float | None:
        values = self.best_values(metric)
        return statistics.fmean(values) if values else None

    def best_run(self) -> Run | None:
        """The completed job with the highest monitored score."""
        scored = [(r.best_value(self.monitor), r) for r in self.completed]
        scored = [(v, r) for v, r in scored if v is not None]
        return max(scored, key=lambda pair: pair[0])[1] if scored else None


def group_runs(runs: Iterable[Run], over: str = "seed") -> list[Configuration]:
    """Configurations in order of first appearance, named by the overrides that vary across `runs`."""
    runs = list(runs)
    keys = varying_keys(runs, over)
    groups: dict[tuple[tuple[str, str], ...], Configuration] = {}
    name = runs[0].run_dir.name if len(runs) == 1 else "(all runs)"
    for run in runs:
        settings = {k: run.settings[k] for k in keys if k in run.settings}
        key = tuple(settings.items())
        groups.setdefault(key, Configuration(settings=settings, runs=[], name=name)).runs.append(run)
    return list(groups.values())


def rank(configurations: list[Configuration]) -> list[Configuration]:
    """Best first by the mean of each configuration's monitor over its seeds; those without a score last."""
    def key(config: Configuration) -> tuple[bool, float]:
        mean = config.mean(config.monitor)
        return (mean is None, -(mean or 0.0))

    return sorted(configurations, key=key)
