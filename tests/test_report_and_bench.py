"""segx.report on run directories written by hand, and segx.bench."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

from segx import bench, report


def fake_run(root: Path, name: str, overrides: list[str], miou: float | None, **fields: object) -> Path:
    """A run directory as train.py leaves it, without a checkpoint or a history."""
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    best = {} if miou is None else {"val/miou": miou, "val/loss": 1 - miou}
    metrics = {"status": "completed", "overrides": overrides, "history": [], "best": best, "final": best,
               "epochs": 1, "parameters": {"total": 12, "trainable": 10}, "seconds_per_epoch": 1.0, **fields}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def test_report_groups_runs_over_seeds(tmp_path: Path) -> None:
    fake_run(tmp_path, "0", ["model=unet", "seed=1", "data.root=/x"], 0.5)
    fake_run(tmp_path, "1", ["model=unet", "seed=2", "data.root=/x"], 0.7)
    fake_run(tmp_path, "2", ["model=fcn", "seed=1", "data.root=/x"], 0.4)
    (tmp_path / "2" / "evaluate").mkdir()
    (tmp_path / "2" / "evaluate" / "metrics.json").write_text(json.dumps({"miou": 0.1}))  # not a training run
    rows = report.write_report(report.collect_runs(tmp_path), tmp_path / "report").rows
    assert [(r["setting"], r["runs"]) for r in rows] == [("model=unet", 2), ("model=fcn", 1)]
    assert rows[0]["mean"] == pytest.approx(0.6) and rows[0]["max"] == pytest.approx(0.7)
    assert rows[0]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert rows[1]["std"] is None and rows[0]["parameters"] == 12
    assert report.common_overrides(report.collect_runs(tmp_path)) == []  # data.root is not a setting


def test_report_keeps_each_models_best_learning_rate(tmp_path: Path) -> None:
    """A models × learning rates sweep gets the study's "tuned per model" table beside the full ranking."""
    scores = {("unet", "1e-3"): 0.6, ("unet", "1e-4"): 0.7, ("fcn", "1e-3"): 0.5, ("fcn", "1e-4"): 0.3}
    for i, ((model, lr), miou) in enumerate(scores.items()):
        for seed in (1, 2):
            fake_run(tmp_path, f"{2 * i + seed - 1}", [f"model={model}", f"optimizer.lr={lr}", f"seed={seed}",
                                                        "loss=ce"], miou + seed / 100)
    rows = report.main([str(tmp_path)])
    assert [r["setting"] for r in rows] == ["model=unet optimizer.lr=1e-4", "model=unet optimizer.lr=1e-3",
                                            "model=fcn optimizer.lr=1e-3", "model=fcn optimizer.lr=1e-4"]
    text = (tmp_path / "report.md").read_text()
    tuned = text.split("## Tuned per model")[1].split("##")[0]
    assert "| 1 | unet | 1e-4 |" in tuned and "| 2 | fcn | 1e-3 |" in tuned and "1e-3 |" not in tuned.split("fcn")[0]
    assert "`loss=ce`" in text.split("## Settings shared by every job")[1]
    with (tmp_path / "report.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0])[:4] == ["model", "optimizer.lr", "runs", "failed"]
    assert table[0]["val_miou_no_bg_mean"] == "" and float(table[0]["val_miou_mean"]) == pytest.approx(0.715)
    assert "Not drawn: no run has a per-epoch history yet." in text  # curves need a history; nothing crashes


def test_report_on_a_folder_without_runs_exits_with_a_message(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_bench_writes_every_section(tmp_path: Path, trained_run: Path) -> None:
    """The benchmark at toy sizes: every section is measured and written; the figures are not judged here."""
    out = tmp_path / "bench.json"
    results = bench.main(["--json", str(out), "--device", "cpu", "--workdir", str(tmp_path / "work"), "--size", "32",
                          "--batch", "2", "--data-batch", "4", "--images", "12", "--predict-images", "3",
                          "--steps", "2", "--warmup", "1", "--model-batch", "2", "--repeats", "1",
                          "--models", "unet_small", "--precision-ckpt", str(trained_run / "checkpoints" / "best.ckpt"),
                          "--memory-images", "40", "--memory-size", "32"])
    written = json.loads(out.read_text())
    assert written["data_speedup"] == pytest.approx(results["data_speedup"]) and written["data_speedup"] > 0
    data = written["details"]["data_speedup"]
    assert data["images"] == 12 and data["segx_images_per_second"] > 0 and data["torchvision_images_per_second"] > 0
    overhead = written["details"]["lightning_overhead"]
    assert written["lightning_overhead"] == pytest.approx(
        overhead["lightning_step_seconds"] / overhead["bare_step_seconds"])
    for key in ("train_peak_fraction", "infer_peak_fraction"):
        assert 0 < written[key] < 2, (key, written[key])
    peak = written["details"]["peak"]
    assert peak["peak_gflops"] == max(peak["matmul_gflops"], peak["conv3x3_gflops"])
    # the study's three U-Nets, timed on 3 images and scaled to VOC val's 1,449
    predict = written["details"]["predict_val_seconds"]
    assert set(written["predict_val_seconds"]) == {"unet", "unet_medium", "unet_small"}
    assert predict["images_timed"] == 3 and predict["scaled_to"] == 1449
    assert written["predict_val_seconds"]["unet"] == pytest.approx(predict["timed_seconds"]["unet"] * 1449 / 3)
    [row] = written["models"]
    assert row["model"] == "unet_small" and row["parameters"] == 4_065_749
    assert row["forward_gflops_per_image"] == pytest.approx(17.213423616 / 16)  # 128 px figure, 1/16 of the pixels
    assert row["train_images_per_second"] > 0 and row["predict_images_per_second"] > 0
    assert written["details"]["channels_last"]["train_step_speedup"] > 0
    precision = written["details"]["precision"]  # the trained run's 16 val images in fp32 and in bf16
    assert precision["images"] == 16 and 0.9 <= written["bf16_label_agreement"] <= 1
    assert written["bf16_miou_difference"] == pytest.approx(abs(precision["miou_bf16-mixed"] -
                                                                precision["miou_32-true"]))
    assert written["bf16_predict_speedup"] == pytest.approx(precision["seconds_32-true"] /
                                                            precision["seconds_bf16-mixed"])
    memory = written["details"]["data_memory"]  # 1 job, then 4 at once, on one cache of 40 images at 32 px
    assert memory["images"] == 40 and memory["cache_mb"] > 0 and len(memory["load_seconds"]) == 4
    assert written["data_memory_ratio"] == pytest.approx(memory["four_jobs_mb"] / memory["one_job_mb"])
    measured = {"data_speedup", "lightning_overhead", "train_peak_fraction", "infer_peak_fraction",
                "bf16_label_agreement", "bf16_miou_difference", "data_memory_ratio"}
    search = {"search_epoch_fraction", "search_p_regret_le_noise"}  # --sections search (minutes) was not asked for
    assert set(written["targets"]) == measured | search
    assert all(isinstance(written["targets"][key]["met"], bool) for key in measured)
    assert all(written["targets"][key] == {"target": "<= 0.4" if key == "search_epoch_fraction" else ">= 0.9",
                                           "measured": None, "met": None} for key in search)
    assert written["device"].startswith("cpu") and written["torch"] == torch.__version__


def test_bench_refuses_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--models", "unet_huge"])
    assert exit_info.value.code == 2 and "unknown model config(s) ['unet_huge']" in capsys.readouterr().err


def test_a_finished_grid_gets_a_what_if_section_from_its_own_curves(tmp_path: Path) -> None:
    """6 learning rates × 2 seeds × 6 epochs, every job to the end: the report replays successive halving and ASHA on
    the curves. The best rate (lr=3) starts slowest: halving ranks all six at epoch 2, where it is 2nd, and keeps
    it in every order; ASHA at the same settings drops it whenever the leader reached epoch 2 before it."""
    import re

    curves = {"optimizer.lr=0": [0.10, 0.12, 0.13, 0.14, 0.15, 0.15],
              "optimizer.lr=1": [0.20, 0.22, 0.23, 0.24, 0.25, 0.25],
              "optimizer.lr=2": [0.30, 0.31, 0.32, 0.33, 0.34, 0.34],
              "optimizer.lr=3": [0.05, 0.40, 0.60, 0.75, 0.85, 0.90],  # the late bloomer
              "optimizer.lr=4": [0.35, 0.36, 0.37, 0.38, 0.38, 0.38],
              "optimizer.lr=5": [0.50, 0.55, 0.58, 0.60, 0.61, 0.62]}
    job = 0
    for setting, curve in curves.items():
        for seed in (1, 2):
            history = [{"epoch": float(e), "val/miou": v + 0.001 * seed} for e, v in enumerate(curve)]
            fake_run(tmp_path, str(job), [setting, f"seed={seed}", "data.root=/x"], max(curve) + 0.001 * seed,
                     history=history, epochs=6)
            job += 1
    report.write_report(report.collect_runs(tmp_path), tmp_path / "report", roots=[tmp_path])
    text = (tmp_path / "report" / "report.md").read_text()
    section = text.split("## What if a scheduler had run this grid")[1].split("\n## ")[0]
    assert "every one of its 6 configurations for all 6 epochs" in section
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"\| `(\w+)` \| (\d+)% \| (\d+)% \| (\d+)% \|", section)}
    assert set(rows) == {"sha", "asha"}
    assert rows["sha"] == ("56", "56", "100")  # rungs at epoch 2: 6 × 2 + 2 × 4 epochs of 36, in every order
    assert int(rows["asha"][2]) < 100
    assert "best configuration (`optimizer.lr=3`" in section and "(plots/what_if.png)" in section
    assert (tmp_path / "report" / "plots" / "what_if.png").stat().st_size > 5_000
    # a large grid is replayed over fewer orders (at least 20), so the report stays quick
    from segx.report.what_if import orders_for
    from segx.search.replay import Grid

    assert orders_for(Grid({f"c{i}": {"1": [0.5] * 25} for i in range(100)}, 25)) == 80
    assert orders_for(Grid({f"c{i}": {"1": [0.5] * 50} for i in range(1000)}, 50)) == 20
    # a sweep in which a scheduler stopped trials has no such section
    metrics = tmp_path / "0" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"status": "completed"', '"status": "stopped"'))
    report.write_report(report.collect_runs(tmp_path), tmp_path / "report", roots=[tmp_path])
    assert "What if" not in (tmp_path / "report" / "report.md").read_text()
    assert not (tmp_path / "report" / "plots" / "what_if.png").exists()
