"""Hydra's `key=value` overrides as a run records them: split into settings, and the keys a sweep varies."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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


def varying_keys(sweep_dir: str | Path) -> list[str]:
    """The keys a sweep sweeps over (`optimizer=sgd,adam`, `loss=glob(*)`, its preset's sweeper params), in
    command-line order, read from the sweep's `multirun.yaml` (written before any job starts); [] when it
    cannot be read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        config = OmegaConf.load(Path(sweep_dir) / "multirun.yaml")
        params = config.hydra.sweeper.get("params") or {}
        overrides = [*(str(o) for o in config.hydra.overrides.task), *(f"{k}={v}" for k, v in params.items())]
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # an unreadable or foreign multirun.yaml: the caller falls back to job numbers
        return []
    keys: list[str] = []
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override() and key not in keys and not key.startswith("hydra."):
            keys.append(key)
    return keys
