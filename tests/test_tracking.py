"""logger=mlflow: real MLflow on SQLite, no server: what a run files, how its ending is recorded, the registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from segx.runs.discovery import find_runs
from segx.runs.record import read_record
from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, run_in_process

pytest.importorskip("mlflow", reason="the mlflow extra (pip install 'segx[mlflow]') is not installed")

SHORT = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]


def runs_of(store: Path, experiment: str = "train") -> list:
    """Every run of `experiment` in `<store>/mlflow.db`, as MLflow's client reads them back."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The launch directory of this file's runs: the default store is its mlflow.db."""
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def tracked(store: Path, shapes_root: Path) -> Path:
    """A 2-epoch run with logger=many (TensorBoard, MLflow, CSV), its best checkpoint registered."""
    run_dir = store / "outputs" / "tracked"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(store)  # the launch directory, which holds the default mlflow.db
        run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, *SHORT, f"data.root={shapes_root}",
                       "optimizer.lr=3e-3", "trainer.max_epochs=2", "logger=many", "logger.mlflow.register=true",
                       "logger.mlflow.tags={project: segx-tests}", f"hydra.run.dir={run_dir}")
    return run_dir


def test_a_run_files_its_params_tags_epoch_metrics_and_artifacts(tracked: Path, store: Path) -> None:
    from mlflow.tracking import MlflowClient

    record = read_record(tracked)
    [run] = runs_of(store)
    assert record["mlflow"]["run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "outputs/tracked"  # a single run: its run directory, from the launch directory
    tags = run.data.tags
    assert tags["segx.run_dir"] == str(tracked.resolve()) and tags["segx.status"] == "completed"
    assert tags["segx.devices"] == "cpu" and tags["segx.host"] == record["host"] and tags["segx.job"] == "-"
    assert tags["project"] == "segx-tests"
    params = run.data.params
    assert params["optimizer"] == "adam" and params["model"] == "unet_small" and params["data"] == "shapes"
    assert float(params["optimizer.lr"]) == 3e-3 and params["model.encoder_widths"] == "[16, 32]"
    assert "logger=many" in params["overrides"]
    client = MlflowClient(record["mlflow"]["tracking_uri"])
    miou = client.get_metric_history(run.info.run_id, "val/miou")
    assert [m.value for m in miou] == pytest.approx([h["val/miou"] for h in record["history"]])  # every epoch
    assert {"val/mdice", "val/iou/background", "train/loss"} <= set(run.data.metrics)
    artifacts = Path(client.get_run(run.info.run_id).info.artifact_uri)
    assert artifacts.is_relative_to(store / "mlartifacts")  # beside the database, whatever the worker's cwd
    assert json.loads((artifacts / "metrics.json").read_text())["best"] == record["best"]
    confusion = json.loads((artifacts / "confusion_matrix.json").read_text())
    assert confusion["matrix"] == record["best_confusion_matrix"] and confusion["class_names"] == record["class_names"]
    assert (artifacts / "checkpoints" / "best.ckpt").read_bytes() == (tracked / "checkpoints/best.ckpt").read_bytes()
    # the copy of metrics.json among the artifacts is not a run of its own
    assert [r.run_dir for r in find_runs([store]) if r.run_dir.name == "tracked"] == [tracked]
    assert not [r for r in find_runs([store]) if "mlartifacts" in r.run_dir.parts]
    # logger=many: TensorBoard and CSV wrote beside it
    assert list((tracked / "tensorboard").glob("events.out.tfevents.*")) and (tracked / "csv/metrics.csv").is_file()


def test_the_registered_version_loads_with_segx_predict(tracked: Path, store: Path, shapes_root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    record = read_record(tracked)
    client = MlflowClient(record["mlflow"]["tracking_uri"])
    [version] = client.search_model_versions("name='segx-unet_small'")
    assert str(version.version) == "1" and version.run_id == record["mlflow"]["run_id"]
    monkeypatch.chdir(store)  # where training was launched: predict finds mlflow.db there
    images = sorted((shapes_root / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))[:1]
    result = run_in_process("segx.cli.predict", "ckpt=models:/segx-unet_small/1", f"input={images[0]}",
                            f"output={store / 'masks'}", "progress=false")
    assert result.returncode == 0
    assert (store / "masks" / f"{images[0].stem}.png").is_file()
    missing = run_in_process("segx.cli.predict", "ckpt=models:/segx-unet_small/7", f"input={images[0]}",
                             f"output={store / 'none'}", check=False)
    output = missing.stdout + missing.stderr
    assert missing.returncode == 2 and not (store / "none").exists()
    assert "ckpt=models:/segx-unet_small/7 cannot be fetched from sqlite:///" in output, output


def test_a_run_resumed_in_its_directory_continues_its_mlflow_run(store: Path, shapes_root: Path) -> None:
    run_dir = store / "outputs" / "resumed"
    common = [*TINY_MODEL, *TINY_SHAPES, *QUIET, *SHORT, f"data.root={shapes_root}", "logger=mlflow",
              "logger.experiment_name=resumed", f"logger.tracking_uri=sqlite:///{store / 'mlflow.db'}",
              f"hydra.run.dir={run_dir}"]
    run_in_process("train.py", *common, "trainer.max_epochs=1")
    first = read_record(run_dir)["mlflow"]["run_id"]
    run_in_process("train.py", *common, "trainer.max_epochs=2", "ckpt_path=last")
    [run] = runs_of(store, "resumed")
    assert run.info.run_id == first == read_record(run_dir)["mlflow"]["run_id"] and run.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{store / 'mlflow.db'}").get_metric_history(first, "val/miou")
    assert len(history) == 2 and run.data.params["trainer.max_epochs"] == "1"  # a param keeps its first value


def test_a_run_failing_on_its_config_is_filed_as_failed_with_its_error(store: Path, shapes_root: Path) -> None:
    result = run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}",
                            "logger=mlflow", "logger.experiment_name=failing", "data.batch_size=0",
                            f"logger.tracking_uri=sqlite:///{store / 'mlflow.db'}",
                            f"hydra.run.dir={store / 'outputs' / 'failing'}", check=False)
    assert result.returncode == 2
    [run] = runs_of(store, "failing")
    assert run.info.status == "FAILED" and run.data.tags["segx.status"] == "failed"
    assert "data.batch_size=0 must be at least 1" in run.data.tags["segx.error"]


def test_without_mlflow_the_logger_says_what_to_install(tmp_path: Path, shapes_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    monkeypatch.chdir(tmp_path)
    result = run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}",
                            "logger=mlflow", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "logger=mlflow needs MLflow, which is not installed here" in output
    assert "pip install 'segx[mlflow]'" in output and not (tmp_path / "mlflow.db").exists()
