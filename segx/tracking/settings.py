"""Which configured loggers are MLflow's, and the store, experiment and registry settings of one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segx.core.errors import ConfigError
from segx.tracking.store import absolute_uri, default_tracking_uri


def logger_nodes(logger_cfg: DictConfig | None) -> list[DictConfig]:
    """The loggers `cfg.logger` configures: one node with a `_target_`, or (`logger=many`) a mapping of named nodes,
    of which a null one (e.g. `logger.csv=null`) is dropped."""
    if not logger_cfg:
        return []
    if "_target_" in logger_cfg:
        return [logger_cfg]
    nodes = []
    for name, node in logger_cfg.items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"logger.{name} is not a logger: each entry of a logger list needs a _target_ "
                              "(see conf/logger/many.yaml), or null to drop it.")
        nodes.append(node)
    return nodes


def is_mlflow_node(node: DictConfig) -> bool:
    """Lightning's MLFlowLogger or segx's subclass of it."""
    return str(node.get("_target_", "")).lower().endswith("mlflowlogger")


def mlflow_nodes(logger_cfg: DictConfig | None) -> list[DictConfig]:
    """The MLflow loggers of `cfg.logger` (at most one: a run is one MLflow run)."""
    nodes = [node for node in logger_nodes(logger_cfg) if is_mlflow_node(node)]
    if len(nodes) > 1:
        raise ConfigError("cfg.logger holds more than one MLflow logger; a segx run is one MLflow run: keep one.")
    return nodes


@dataclass(frozen=True)
class TrackingSettings:
    """Where a run is filed and what is kept of it (the keys of conf/logger/mlflow.yaml, defaults resolved)."""

    tracking_uri: str
    experiment_name: str
    log_model: bool = False
    register: bool = False
    model_name: str = "segx"
    tags: dict[str, str] = field(default_factory=dict)


def tracking_settings(node: DictConfig, launch_dir: str | Path, choices: dict[str, Any],
                      job_name: str) -> TrackingSettings:
    """Resolve an MLflow logger node: the store defaults to `<launch dir>/mlflow.db`, the experiment to the experiment
    preset's name (e.g. `optimizer_grid`), else Hydra's job name (`train`, or `hydra.job.name=...`)."""
    uri = node.get("tracking_uri") or default_tracking_uri(launch_dir)
    preset = choices.get("experiment")
    name = node.get("experiment_name") or (str(preset) if preset not in (None, "null") else job_name)
    register = bool(node.get("register", False))
    model = node.get("model_name") or f"segx-{choices.get('model') or 'model'}"
    tags = node.get("tags") or {}
    tags = OmegaConf.to_container(tags, resolve=True) if isinstance(tags, DictConfig) else dict(tags)
    return TrackingSettings(
        tracking_uri=absolute_uri(str(uri), launch_dir), experiment_name=str(name),
        log_model=bool(node.get("log_model", False)) or register,  # a model version needs its checkpoint
        register=register, model_name=str(model).replace("/", "_"), tags={str(k): str(v) for k, v in tags.items()},
    )
