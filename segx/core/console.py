"""The composed config as a tree at the start of a run, so every run's log says exactly what it ran with.

`.hydra/config.yaml` holds the same values, but a sweep job's log is where one looks when a job fails, and a
tree grouped by data/model/optimizer/... reads faster than a flat dump.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from segx.core.ranks import is_rank_zero

#: Top-level groups shown first, in the order a reader follows a run; other keys follow in config order.
GROUPS = ("data", "model", "optimizer", "scheduler", "loss", "trainer", "callbacks", "logger")

# Wide enough that values do not wrap (a wrapped line would break the tree in a log file).
_WIDTH = 1000


def config_tree(cfg: DictConfig) -> str:
    """The config as plain text: groups as branches, scalars as `key: value` leaves, no colour codes.

    Interpolations are resolved where they can be; one that cannot (e.g. `${hydra:...}` outside a Hydra
    run, or a missing value) shows as written instead of failing the run.
    """
    tree = Tree(Text("config"))
    keys = [key for key in GROUPS if key in cfg] + [key for key in cfg if key not in GROUPS]
    for key in keys:
        _add(tree, cfg, key)
    return _render(tree)


def log_config_tree(cfg: DictConfig, logger: logging.Logger) -> None:
    """Log the tree at INFO as one message beginning "Config:" (into the run's or sweep job's train.log).

    Only global rank 0 logs it: the other ranks of a multi-process run (SLURM tasks, Lightning's `ddp`
    re-running train.py) have the same config and would repeat it, in the same log file under SLURM.
    """
    if is_rank_zero():
        logger.info("Config:\n%s", config_tree(cfg))


def _add(parent: Tree, node: DictConfig, key: Any) -> None:
    """Append `key` of `node`: a branch for a nested mapping, a `key: value` leaf for anything else. Keys keep
    their type: `label_map: {11: 255}` has an int key, which a struct config does not find as "11"."""
    child = node._get_node(key)
    if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
        branch = parent.add(Text(str(key)))
        for sub in child:
            _add(branch, child, sub)
        return
    parent.add(Text(f"{key}: {_value_text(node, key, child)}"))


def _value_text(node: DictConfig, key: Any, child: Any) -> str:
    """The resolved value as YAML-like text, or the raw one (`${...}`, `???`) where resolving fails."""
    try:
        value = node[key]
    except Exception:  # noqa: BLE001 - any resolver error; the raw text is the useful fallback
        return str(child._value())
    if isinstance(value, DictConfig | ListConfig):
        value = _container(value)
    return value if isinstance(value, str) and value else json.dumps(value, default=str)  # "" stays visible


def _container(value: DictConfig | ListConfig) -> Any:
    try:
        return OmegaConf.to_container(value, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation inside a list
        return OmegaConf.to_container(value, resolve=False)


def _render(tree: Tree) -> str:
    console = Console(file=io.StringIO(), width=_WIDTH, color_system=None, force_terminal=False,
                      no_color=True, highlight=False, emoji=False, soft_wrap=False)
    console.print(tree)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


__all__ = ["GROUPS", "config_tree", "log_config_tree"]
