"""The Hydra callback around a multirun (`hydra.callbacks.tracking_store` in conf/train.yaml): with an MLflow logger,
the database and experiment are created once before any job starts, and at the end every job's MLflow run has the
ending its record says."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from segx.core.errors import SegxError

log = logging.getLogger(__name__)


class TrackingStore(Callback):
    """Prepares the MLflow store before a sweep's jobs and closes what they left open after; nothing otherwise."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from segx.tracking.settings import mlflow_nodes, tracking_settings

        try:
            nodes = mlflow_nodes(config.get("logger"))
            if not nodes:
                return
            from segx.tracking.store import prepare_experiment

            hydra = config.hydra
            settings = tracking_settings(nodes[0], hydra.runtime.cwd, dict(hydra.runtime.choices), hydra.job.name)
            prepare_experiment(settings.tracking_uri, settings.experiment_name)
        except SegxError as error:  # before any job: one paragraph, no job started
            log.error("%s", error)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from segx.tracking.settings import mlflow_nodes

        if not mlflow_nodes(config.get("logger")):
            return
        from segx.tracking.run import close_sweep_runs

        changed = close_sweep_runs(Path(str(config.hydra.sweep.dir)))
        if changed:
            log.info("MLflow: %d run(s) closed with the ending their job recorded (a worker that died, or a trial "
                     "Ray Tune stopped)", changed)
