"""Experiment presets compose to the study's settings and run as sweeps."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segx import bench, report
from tests.conftest import QUIET, ROOT, TINY_SHAPES, read_json, run_entry_point


def test_compare_models_uses_the_study_settings() -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=compare_models"], return_hydra_config=True)
    assert cfg.data.image_size == 128 and cfg.data.batch_size == 16
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.decay == 1e-3
    assert cfg.loss._target_.endswith("WeightedCrossEntropyLoss") and cfg.trainer.max_epochs == 25
    params = cfg.hydra.sweeper.params
    assert params.model.split(",") == ["fcn", "unet", "resunet", "pspnet", "deeplabv3plus"]
    assert params.seed.split(",") == ["1", "2", "3"]


def test_compare_models_smoke_sweep_on_shapes(shapes_root: Path, tmp_path: Path) -> None:
    run_entry_point("train.py", "-m", "experiment=compare_models", *TINY_SHAPES, *QUIET, f"data.root={shapes_root}",
                    "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                    "hydra.sweeper.params.seed=1", f"hydra.sweep.dir={tmp_path}")
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.json"))
    models = [OmegaConf.load(r / ".hydra" / "overrides.yaml") for r in runs]
    assert [next(o for o in m if o.startswith("model=")) for m in models] == [
        "model=fcn", "model=unet", "model=resunet", "model=pspnet", "model=deeplabv3plus"]
    assert all(read_json(r / "metrics.json")["parameters"]["trainable"] > 1_000_000 for r in runs)
    rows = report.main([str(tmp_path), "--json", str(tmp_path / "summary.json")])
    assert sorted(r["setting"] for r in rows) == sorted(
        ["model=fcn", "model=unet", "model=resunet", "model=pspnet", "model=deeplabv3plus"])
    assert all(r["runs"] == 1 and 0 <= r["max"] <= 1 for r in rows)
    assert read_json(tmp_path / "summary.json") == rows


def test_report_groups_runs_over_seeds(tmp_path: Path) -> None:
    def fake_run(name: str, overrides: list[str], miou: float) -> None:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        metrics = {"history": [], "best": {"val/miou": miou}, "final": {"val/miou": miou}, "epochs": 1,
                   "parameters": {"trainable": 10}, "seconds_per_epoch": 1.0}
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))

    fake_run("0", ["model=unet", "seed=1", "data.root=/x"], 0.5)
    fake_run("1", ["model=unet", "seed=2", "data.root=/x"], 0.7)
    fake_run("2", ["model=fcn", "seed=1", "data.root=/x"], 0.4)
    (tmp_path / "2" / "evaluate").mkdir()
    (tmp_path / "2" / "evaluate" / "metrics.json").write_text(json.dumps({"miou": 0.1}))  # not a training run
    rows = report.summarize(report.collect_runs(tmp_path))
    assert [(r["setting"], r["runs"]) for r in rows] == [("model=unet", 2), ("model=fcn", 1)]
    assert rows[0]["mean"] == pytest.approx(0.6) and rows[0]["max"] == pytest.approx(0.7)
    assert rows[0]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))


def test_report_on_a_folder_without_runs_exits_with_a_message(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2


def test_bench_measures_every_requested_model() -> None:
    rows = bench.main(["--models", "unet_small", "fcn", "--batch", "1", "--size", "32", "--repeats", "1"])
    assert [r["model"] for r in rows] == ["unet_small", "fcn"]
    assert rows[1]["trainable"] == 34_397_525
    assert all(r["train_step_s"] > 0 and r["inference_s"] > 0 for r in rows)
