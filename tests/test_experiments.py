"""segx.report on run directories, and segx.bench."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from segx import bench, report


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
