"""Experiment tracking in MLflow (`logger=mlflow`): every run of segx an MLflow run, in a SQLite store by default.

segx opens the MLflow run when a job starts (so a job that fails before training is filed too), Lightning's
logger writes the epochs' metrics into it, and the job's ending (completed, failed, stopped, interrupted) closes it
with the matching MLflow status, its `metrics.json` and confusion matrix and, when asked, its best checkpoint as a
registered model version. MLflow is an optional extra: `pip install 'segx[mlflow]'`.
"""

from segx.tracking.settings import is_mlflow_node, logger_nodes, mlflow_nodes

__all__ = ["is_mlflow_node", "logger_nodes", "mlflow_nodes"]
