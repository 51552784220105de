"""MLflow's tracking store: the default SQLite database beside the launch directory, and the experiment runs are
filed under, created once under a file lock (parallel jobs opening a fresh SQLite database race on its migrations)."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from segx.core.errors import ConfigError, SegxError, first_line

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

DATABASE = "mlflow.db"        # the default store: <launch dir>/mlflow.db
ARTIFACTS = "mlartifacts"     # beside it: <launch dir>/mlartifacts/<experiment>/<run id>/artifacts
MLFLOW_MISSING = (
    "logger=mlflow needs MLflow, which is not installed here ({missing}). Install the extra: "
    "pip install 'segx[mlflow]' (mlflow-skinny, SQLAlchemy and alembic; `make test` installs it), or choose another "
    "logger (logger=tensorboard or logger=csv)."
)


def require_mlflow() -> None:
    """A missing MLflow is a user error, named with the extra to install."""
    try:
        import mlflow.tracking  # noqa: F401
    except ImportError as error:
        raise ConfigError(MLFLOW_MISSING.format(missing=first_line(error))) from error


def client(tracking_uri: str) -> MlflowClient:
    """An MLflow client of `tracking_uri` (`require_mlflow` first)."""
    require_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def default_tracking_uri(launch_dir: str | Path) -> str:
    """`sqlite:///<launch dir>/mlflow.db`: one database for every run and sweep started from that folder."""
    return f"sqlite:///{Path(launch_dir).resolve() / DATABASE}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (`sqlite:////abs/path.db` is absolute), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])


def absolute_uri(tracking_uri: str, launch_dir: str | Path) -> str:
    """A relative SQLite path taken from the launch directory, so every job (whatever its working directory, as
    under Ray) opens the same database."""
    path = sqlite_path(tracking_uri)
    if path is None or path.is_absolute():
        return tracking_uri
    return f"sqlite:///{(Path(launch_dir) / path).resolve()}"


def _artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    path = sqlite_path(tracking_uri)
    if path is None:  # a server decides where its artifacts go
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment_name).strip("._") or "experiment"
    return str(path.parent / ARTIFACTS / folder)


def store_lock(tracking_uri: str) -> contextlib.AbstractContextManager:
    """The file lock beside a SQLite database (its folder created), under which it is created or changed by one job
    at a time; nothing for a server."""
    path = sqlite_path(tracking_uri)
    if path is None:
        return contextlib.nullcontext()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"logger.tracking_uri={tracking_uri}: cannot create the folder {path.parent} for the "
                          f"database ({first_line(error)}); choose a writable place.") from error
    return FileLock(str(path) + ".lock")


def prepare_experiment(tracking_uri: str, experiment_name: str) -> str:
    """The id of `experiment_name` in the store, which is created (database and experiment) when new; under a file
    lock beside a SQLite database, so parallel jobs never migrate or create twice."""
    require_mlflow()  # before any file is made
    with store_lock(tracking_uri):
        try:
            mlflow = client(tracking_uri)  # opening a fresh SQLite store creates and migrates it
            experiment = mlflow.get_experiment_by_name(experiment_name)
            if experiment is None:
                log.info("MLflow: creating experiment %r in %s", experiment_name, tracking_uri)
                return mlflow.create_experiment(experiment_name,
                                                artifact_location=_artifact_location(tracking_uri, experiment_name))
        except SegxError:
            raise
        except ImportError as error:  # SQLAlchemy or alembic, for a SQL store
            raise ConfigError(MLFLOW_MISSING.format(missing=first_line(error))) from error
        except Exception as error:
            raise SegxError(
                f"logger.tracking_uri={tracking_uri} cannot be used as an MLflow store: {first_line(error)}. For a "
                "server, check that it runs and is reachable; for a SQLite file, that it is an MLflow database (or "
                "choose a new file); logger.tracking_uri=null uses <launch dir>/mlflow.db."
            ) from error
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"logger.experiment_name={experiment_name} names an experiment deleted in {tracking_uri}; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or choose another name."
        )
    return experiment.experiment_id
