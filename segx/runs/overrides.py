"""Hydra's `key=value` overrides as a run records them: split into settings, and the keys a sweep varies."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

#: Overrides that say where a run ran, not what it tried.
IGNORED_PREFIXES = ("hydra.", "data.root")


def split_override(override: str) -> tuple[str, str]:
    """`optimizer.lr=1e-3` → (`optimizer.lr`, `1e-3`); the `+`, `++` and `~` prefixes are dropped."""
    key, _, value = str(override).partition("=")
    return key.lstrip("+~"), value


def override_settings(overrides: Iterable[str], ignored: tuple[str, ...] = IGNORED_PREFIXES) -> dict[str, str]:
    """Key → value of a run's overrides, in command-line order, without the `ignored` prefixes; a repeated key
    keeps its last value, in the last place (as Hydra applies it)."""
    settings: dict[str, str] = {}
    for override in overrides:
        key, value = split_override(override)
        if key and not key.startswith(ignored):
            settings.pop(key, None)
            settings[key] = value
    return settings


def sweep_command(config: Any) -> list[str]:
    """A sweep config's overrides as the sweeper expands them: the command line's, then its preset's sweeper
    params (`hydra.sweeper.params`)."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return [*(str(o) for o in config.hydra.overrides.task), *(f"{k}={v}" for k, v in params.items())]


def _sweep_overrides(sweep_dir: str | Path) -> list:
    """The parsed overrides of a sweep's `multirun.yaml` (written before any job starts), its preset's sweeper
    params included; [] when it cannot be read."""
    path = Path(sweep_dir) / "multirun.yaml"
    try:
        stat = path.stat()
    except OSError:
        return []
    return list(_parsed_sweep(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _parsed_sweep(path: str, mtime_ns: int, size: int) -> tuple:
    """Parsed once per version of the file (a job asks for its sweep's keys several times)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return tuple(OverridesParser.create().parse_overrides(sweep_command(OmegaConf.load(path))))
    except Exception:  # an unreadable or foreign multirun.yaml: the caller falls back to what it knows
        return ()


def sweep_axes(overrides: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(each swept key → its values, in order; each other key → its value) of a sweep's overrides: the axes say
    which jobs the sweep holds, the rest are settings every job shares. `hydra.` keys are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes: dict[str, list[str]] = {}
    shared: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element().lstrip("+~")
        if key.startswith("hydra."):
            continue
        axes.pop(key, None)
        shared.pop(key, None)
        if override.is_sweep_override():  # a sampled interval (the tune sweeper's) has no list of values
            axes[key] = list(override.sweep_string_iterator()) if override.is_discrete_sweep() else \
                [override.get_value_element_as_str()]
        else:
            shared[key] = override.get_value_element_as_str()
    return axes, shared


def varying_keys(sweep_dir: str | Path) -> list[str]:
    """The keys a sweep sweeps over (`optimizer=sgd,adam`, `loss=glob(*)`, its preset's sweeper params), in
    command-line order; [] when the sweep's multirun.yaml cannot be read."""
    keys: list[str] = []
    for override in _sweep_overrides(sweep_dir):
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override() and key not in keys and not key.startswith("hydra."):
            keys.append(key)
    return keys


def job_count(sweep_dir: str | Path) -> int | None:
    """How many jobs the sweep's grid holds (the product of its axes, as Hydra's basic sweeper expands it); None
    when its multirun.yaml cannot be read."""
    parsed = _sweep_overrides(sweep_dir)
    if not parsed:
        return None
    axes: dict[str, int] = {}
    for override in parsed:  # a key given twice: the later value replaces the earlier one, as in Hydra
        key = override.get_key_element()
        if override.is_sweep_override() and not override.is_discrete_sweep():
            return None  # sampled, not a grid: the search's own settings say how many trials it runs
        axes[key] = len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1
    count = 1
    for size in axes.values():
        count *= size
    return count
