"""One segx run as one MLflow run: opened when the job starts, written by Lightning's logger while it trains, and
closed with segx's ending (completed → FINISHED, failed → FAILED, stopped by a scheduler or interrupted → KILLED)."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from segx.core.errors import first_line
from segx.runs.discovery import find_runs
from segx.runs.record import ENDING_FIELDS, RECORD_FILE, JobRecord, read_record
from segx.runs.status import ACTIVE, COMPLETED, RUNNING, STOPPED
from segx.tracking.registry import register_checkpoint
from segx.tracking.settings import TrackingSettings, mlflow_nodes, tracking_settings
from segx.tracking.store import client, prepare_experiment

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from segx.runs.job import JobInfo

log = logging.getLogger(__name__)

RECORD_KEY = "mlflow"        # metrics.json: {"tracking_uri", "experiment", "run_id"} of the run's MLflow run
MAX_PARAM = 500              # characters of a param's value kept (MLflow takes 6000; long lists are rarely queried)
MAX_TAG = 5000
BEST_CHECKPOINT = Path("checkpoints") / "best.ckpt"
ENDING_TAGS = tuple(key for key in ENDING_FIELDS if key != "ended_at")  # tagged segx.<key> when a run ends


def mlflow_status(record: dict[str, Any]) -> str:
    """The MLflow run status of a segx run's record."""
    status = record.get("status")
    if status == COMPLETED:
        return "FINISHED"
    if status == STOPPED or record.get("interrupted_by"):
        return "KILLED"
    return "RUNNING" if status in ACTIVE else "FAILED"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def run_params(cfg: DictConfig, job: JobInfo) -> dict[str, str]:
    """The run's params: its flattened config (`optimizer.lr`), each config group's choice (`optimizer`: `sgd`)
    and its overrides as typed (`overrides`)."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation only Hydra's job can resolve
        container = OmegaConf.to_container(cfg, resolve=False)
    params = {key: value for key, value in _flatten(container).items() if not key.startswith("hydra.")}
    params.update({group: choice for group, choice in job.choices.items()
                   if not group.startswith("hydra/") and choice is not None})
    params["overrides"] = " ".join(job.overrides)
    return {re.sub(r"[^A-Za-z0-9_/. -]", "_", str(key))[:250]: str(value)[:MAX_PARAM]
            for key, value in params.items()}


def run_name(job: JobInfo) -> str:
    """A sweep job is named by what its sweep varies (`optimizer=sgd,seed=1`), a single run by its run directory
    (`outputs/2026-12-02/12-00-00`, from the launch directory)."""
    if job.multirun:
        return job.run_name()[:250]
    run_dir = job.run_dir.resolve()
    launch = (job.launch_dir or Path.cwd()).resolve()
    return str(run_dir.relative_to(launch) if run_dir.is_relative_to(launch) else run_dir)[-250:]


class TrackedRun:
    """The MLflow run of one segx run; `end` is the `JobRecord` listener that closes it."""

    def __init__(self, settings: TrackingSettings, mlflow: MlflowClient, run_id: str, run_dir: Path) -> None:
        self.settings = settings
        self.client = mlflow
        self.run_id = run_id
        self.run_dir = run_dir

    def logger_arguments(self) -> dict[str, str]:
        """What Lightning's MLflow logger needs to write into this run."""
        return {"tracking_uri": self.settings.tracking_uri, "experiment_name": self.settings.experiment_name,
                "run_id": self.run_id}

    def set_tags(self, tags: dict[str, Any]) -> None:
        _log_tags(self.client, self.run_id, tags)

    def note_runtime(self, fields: dict[str, Any]) -> None:
        """Where the run trains: its devices, precision and strategy as tags."""
        self.set_tags({f"segx.{key}": fields[key] for key in ("devices", "accelerator", "precision", "strategy")
                       if fields.get(key) is not None})

    def end(self, fields: dict[str, Any]) -> None:
        """Close the run with segx's ending; MLflow trouble is logged, never failing a run that trained."""
        status = mlflow_status(fields)
        try:
            self.set_tags(_ending_tags(fields))
            record = read_record(self.run_dir) or dict(fields)
            self._log_record(record)
            if status in ("FINISHED", "KILLED") and self.settings.log_model:
                self._log_best_checkpoint(register=status == "FINISHED" and self.settings.register)
            self.client.set_terminated(self.run_id, status)
        except Exception as error:
            log.warning("MLflow: could not close run %s in %s (%s); the run directory %s holds its results.",
                        self.run_id, self.settings.tracking_uri, first_line(error), self.run_dir)

    def _log_record(self, record: dict[str, Any]) -> None:
        """metrics.json, and the best epoch's confusion matrix with its class names (what segx-report draws)."""
        if (self.run_dir / RECORD_FILE).is_file():
            self.client.log_artifact(self.run_id, str(self.run_dir / RECORD_FILE))
        matrix, names = record.get("best_confusion_matrix"), record.get("class_names")
        if matrix and names:
            self.client.log_dict(self.run_id, {"class_names": names, "rows": "ground truth", "columns": "prediction",
                                               "epoch": (record.get("best") or {}).get("epoch"), "matrix": matrix},
                                 "confusion_matrix.json")

    def _log_best_checkpoint(self, register: bool) -> None:
        best = self.run_dir / BEST_CHECKPOINT
        if not best.is_file():
            log.warning("MLflow: logger.log_model=true but %s does not exist (callbacks.model_checkpoint off?): "
                        "no checkpoint logged", best)
            return
        self.client.log_artifact(self.run_id, str(best), "checkpoints")
        if register:
            source = f"{self.client.get_run(self.run_id).info.artifact_uri}/checkpoints"
            version = register_checkpoint(self.client, self.settings.model_name, self.run_id, source,
                                          self.settings.tracking_uri)
            log.info("MLflow: registered %s version %s (load it with ckpt=models:/%s/%s)", self.settings.model_name,
                     version, self.settings.model_name, version)


def _log_tags(mlflow: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    mlflow.log_batch(run_id, tags=[RunTag(key, str(value)[:MAX_TAG]) for key, value in tags.items()])


def _ending_tags(fields: dict[str, Any]) -> dict[str, Any]:
    tags: dict[str, Any] = {"segx.status": fields.get("status")}
    for key in ENDING_TAGS:
        if fields.get(key) is not None:
            tags[f"segx.{key}"] = fields[key]
    return tags


def _continued_run(mlflow: MlflowClient, previous: dict[str, Any], settings: TrackingSettings) -> str | None:
    """The MLflow run this run directory had before (a resumed or re-run job), when it is in the same store."""
    if previous.get("tracking_uri") != settings.tracking_uri or not previous.get("run_id"):
        return None
    try:
        run = mlflow.get_run(previous["run_id"])
    except Exception:  # deleted meanwhile
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def start_tracking(cfg: DictConfig, job: JobInfo, record: JobRecord) -> TrackedRun | None:
    """Open this job's MLflow run when a logger is MLflow's (on rank zero): tags, params, and the record's listener
    that closes it. A job re-run in its run directory continues its earlier MLflow run."""
    nodes = mlflow_nodes(cfg.get("logger"))
    if not nodes or not record.write:
        return None
    settings = tracking_settings(nodes[0], job.launch_dir or Path.cwd(), job.choices, job.name)
    experiment_id = prepare_experiment(settings.tracking_uri, settings.experiment_name)
    mlflow = client(settings.tracking_uri)
    params = run_params(cfg, job)
    run_id = _continued_run(mlflow, (read_record(job.run_dir) or {}).get(RECORD_KEY) or {}, settings)
    if run_id is not None:
        mlflow.update_run(run_id, status="RUNNING")
        earlier = mlflow.get_run(run_id).data
        for key in ENDING_TAGS:  # of the attempt that ended
            if f"segx.{key}" in earlier.tags:
                mlflow.delete_tag(run_id, f"segx.{key}")
        # a param keeps its first value: what a resume changed is in metrics.json (resume_changes)
        params = {key: value for key, value in params.items() if key not in earlier.params}
        log.info("MLflow: continuing run %s in experiment %r of %s", run_id, settings.experiment_name,
                 settings.tracking_uri)
    else:
        from mlflow.tracking.context.registry import resolve_tags

        tags = {"segx.run_dir": str(job.run_dir.resolve()), "segx.job": "-" if job.num is None else job.num,
                "segx.sweep_dir": str(job.sweep_dir.resolve()) if job.sweep_dir else "", "segx.launcher": job.launcher,
                "segx.host": socket.gethostname(), **settings.tags}
        run = mlflow.create_run(experiment_id, run_name=run_name(job),
                                tags=resolve_tags({k: str(v) for k, v in tags.items()}))
        run_id = run.info.run_id
        log.info("MLflow: run %s (%s) in experiment %r of %s", run_id, run.info.run_name, settings.experiment_name,
                 settings.tracking_uri)
    tracked = TrackedRun(settings, mlflow, run_id, job.run_dir)
    tracked.set_tags({"segx.status": RUNNING})
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes 100 params per call
        mlflow.log_batch(run_id, params=items[start:start + 100])
    record.fields[RECORD_KEY] = {"tracking_uri": settings.tracking_uri, "experiment": settings.experiment_name,
                                 "run_id": run_id}
    record.listeners.append(tracked.end)
    return tracked


def close_sweep_runs(sweep_dir: str | Path) -> int:
    """After a sweep, give every job's MLflow run the status its record ended with, where the job could not itself
    (its worker died, or Ray Tune's scheduler stopped it); returns how many were changed."""
    changed = 0
    clients: dict[str, MlflowClient] = {}
    for run in find_runs([sweep_dir]):
        info = run.record.get(RECORD_KEY) or {}
        wanted = mlflow_status(run.record)
        if not info.get("run_id") or wanted == "RUNNING":
            continue
        try:
            mlflow = clients.setdefault(info["tracking_uri"], client(info["tracking_uri"]))
            if mlflow.get_run(info["run_id"]).info.status == wanted:
                continue
            _log_tags(mlflow, info["run_id"], _ending_tags(run.record))
            mlflow.set_terminated(info["run_id"], wanted)
            changed += 1
        except Exception as error:
            log.warning("MLflow: could not close the run of %s (%s)", run.run_dir, first_line(error))
    return changed

