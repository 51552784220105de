"""The model registry: a completed run's best checkpoint as a version of a registered model, and a checkpoint
named by an MLflow URI (`models:/<name>/<version>`, `runs:/<run id>/checkpoints`) fetched for predict and evaluate."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from segx.core.errors import SegxError, first_line
from segx.tracking.store import DATABASE, client, default_tracking_uri, sqlite_path, store_lock

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TRACKING_SCHEMES = ("models:/", "runs:/")


def register_checkpoint(mlflow: MlflowClient, name: str, run_id: str, source: str, tracking_uri: str) -> str:
    """A new version of registered model `name` (created when new) whose files are `source`; returns its number."""
    from mlflow.exceptions import MlflowException

    with store_lock(tracking_uri):  # two jobs may create the same registered model at once
        try:
            mlflow.create_registered_model(name, description="segx checkpoints (load one with ckpt=models:/...)")
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    version = mlflow.create_model_version(name, source=source, run_id=run_id,
                                          description="best.ckpt of a segx run (segx-predict ckpt=models:/...)")
    return str(version.version)


def is_tracking_reference(ckpt: str | Path) -> bool:
    """`ckpt` names a checkpoint in MLflow rather than a file."""
    return str(ckpt).startswith(TRACKING_SCHEMES)


def _version_source(mlflow: MlflowClient, reference: str) -> str:
    """Where the files of `models:/<name>/<version>` (or `/latest`, or `models:/<name>@<alias>`) are, asked of this
    store's registry (MLflow's own resolution would ask the process's default one)."""
    name, _, version = reference[len("models:/"):].strip("/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        version = str(mlflow.get_model_version_by_alias(name, alias).version)
    elif version in ("", "latest"):
        versions = [int(v.version) for v in mlflow.search_model_versions(f"name='{name}'")]
        if not versions:
            raise SegxError(f"ckpt={reference}: the registry holds no version of {name!r}.")
        version = str(max(versions))
    return mlflow.get_model_version_download_uri(name, version)


def checkpoint_from_tracking(reference: str, tracking_uri: str | None = None) -> Path:
    """The local `.ckpt` file behind an MLflow URI, downloaded when the artifacts are not local. The store is
    `tracking_uri`, else $MLFLOW_TRACKING_URI, else `./mlflow.db`."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path.cwd())
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise SegxError(
            f"ckpt={reference} is an MLflow URI, but the tracking store {uri} does not exist. Run from the folder that "
            f"holds {DATABASE} (where training was launched), or name the store with MLFLOW_TRACKING_URI=sqlite:///"
            "<path>/mlflow.db (or a server's URI)."
        )
    store = client(uri)  # a missing MLflow is named as such
    from mlflow.artifacts import download_artifacts

    try:
        source = _version_source(store, reference) if reference.startswith("models:/") else reference
        local = Path(download_artifacts(artifact_uri=source, tracking_uri=uri))
    except SegxError:
        raise
    except Exception as error:
        raise SegxError(
            f"ckpt={reference} cannot be fetched from {uri}: {first_line(error)}. List the registered models and "
            "their versions with mlflow.search_model_versions() (or `mlflow ui`), or give a checkpoint file."
        ) from error
    if local.is_file():
        return local
    found = sorted(local.rglob("*.ckpt"), key=lambda p: (p.name != "best.ckpt", str(p)))
    if not found:
        raise SegxError(f"ckpt={reference} holds no .ckpt file ({local}); name a run's checkpoint folder or file.")
    return found[0]
