"""Lightning's MLflow logger, writing into the MLflow run segx opened for the job (segx.tracking.run)."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import MLFlowLogger as LightningMLFlowLogger

from segx.tracking.store import require_mlflow


class MLflowLogger(LightningMLFlowLogger):
    """`logger=mlflow`: the epochs' metrics under segx's names. The keys only segx reads (`log_model`, `register`,
    `model_name`) are accepted and left to segx, which logs the best checkpoint and ends the run with its own status."""

    def __init__(self, experiment_name: str | None = None, tracking_uri: str | None = None, run_id: str | None = None,
                 log_model: bool = False, register: bool = False, model_name: str | None = None,
                 tags: dict[str, Any] | None = None, **kwargs: Any) -> None:
        require_mlflow()
        self._segx_run = run_id is not None
        super().__init__(experiment_name=experiment_name or "segx", tracking_uri=tracking_uri, run_id=run_id,
                         tags=None if self._segx_run else tags, log_model=False if self._segx_run else log_model,
                         **kwargs)

    def finalize(self, status: str = "success") -> None:
        if not self._segx_run:  # a logger built outside segx's train(): Lightning's ending
            super().finalize(status)
