"""segx.report on the study's chained trials and its Keras metrics, from run directories written by hand: the
window maxima (each metric on its own), an interrupted run's incomplete window, the independent seeds beside
them, study_points.csv and plots/study_points.png, and the study-metric columns of report.csv and report.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from segx import report
from segx.report.runs import Run
from segx.report.study_points import CSV_COLUMNS, SECTION, collect, windows
from segx.report.tables import STUDY_FOOTNOTE, configuration_row, markdown_table, to_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHAINED = {"trials": 3, "epochs_per_trial": 2}
# per epoch (0-based): val/acc, val/study_meaniou, val/miou; each 2-epoch window's maxima fall on different epochs
CHAINED_SCORES = {
    "unet": ([0.50, 0.60, 0.70, 0.65, 0.80, 0.75], [0.48, 0.47, 0.46, 0.49, 0.45, 0.50],
             [0.10, 0.20, 0.25, 0.22, 0.30, 0.35]),
    "fcn": ([0.40, 0.55, 0.52, 0.58, 0.61, 0.57], [0.44, 0.43, 0.47, 0.42, 0.41, 0.46],
            [0.05, 0.08, 0.12, 0.11, 0.10, 0.15]),
}
# the windows' maxima as report.md shows them: % (epoch counted from 1)
UNET_WINDOWS = ["| model=unet | 0 | 1 | 1-2 | 60.00 (2) | 48.00 (1) | 20.00 (2) |",
                "| model=unet | 0 | 2 | 3-4 | 70.00 (3) | 49.00 (4) | 25.00 (3) |",
                "| model=unet | 0 | 3 | 5-6 | 80.00 (5) | 50.00 (6) | 35.00 (6) |"]
FCN_WINDOWS = ["| model=fcn | 1 | 1 | 1-2 | 55.00 (2) | 44.00 (1) | 8.00 (2) |",
               "| model=fcn | 1 | 2 | 3-4 | 58.00 (4) | 47.00 (3) | 12.00 (3) |",
               "| model=fcn | 1 | 3 | 5-6 | 61.00 (5) | 46.00 (6) | 15.00 (6) |"]
SEED_MIOU = {("unet", 1): 0.40, ("unet", 2): 0.44, ("fcn", 1): 0.30, ("fcn", 2): 0.26}


def history(acc: list[float], study: list[float] | None, miou: list[float]) -> list[dict[str, float]]:
    """Per-epoch entries as RunSummary writes them; the study's metrics left out when `study` is None."""
    entries = []
    for epoch, (a, m) in enumerate(zip(acc, miou, strict=True)):
        entry = {"epoch": float(epoch), "train/loss": 2.0 - m, "val/loss": 1.5 - m, "val/acc": a, "val/miou": m,
                 "val/miou_no_bg": 0.9 * m}
        if study is not None:
            entry.update({"val/study_meaniou": study[epoch], "val/study_iou_no_bg": study[epoch] / 2})
        entries.append(entry)
    return entries


def write_run(root: Path, name: str, overrides: list[str], entries: list[dict[str, float]],
              status: str = "completed", **fields: object) -> Path:
    """A run directory as train.py leaves it (metrics.json and .hydra/overrides.yaml), without a checkpoint."""
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    best = max(entries, key=lambda e: e["val/miou"])
    metrics = {"status": status, "overrides": overrides, "monitor": "val/miou", "history": entries, "best": best,
               "final": entries[-1], "epochs": len(entries), "parameters": {"total": 12, "trainable": 10},
               "seconds_per_epoch": 1.0, **fields}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """multirun/chained (2 models, 3 chained trials of 2 epochs), multirun/fair (the same models × 2 seeds, 2
    epochs, from a version without the study's metrics) and multirun/interrupted (a chained run stopped after 4 of
    its 6 epochs)."""
    root = tmp_path_factory.mktemp("multirun")
    for index, (model, (acc, study, miou)) in enumerate(CHAINED_SCORES.items()):
        write_run(root / "chained", str(index), [f"model={model}", "trainer.max_epochs=6", "seed=1"],
                  history(acc, study, miou), chained_trials=CHAINED)
    for index, ((model, seed), miou) in enumerate(SEED_MIOU.items()):
        write_run(root / "fair", str(index), [f"model={model}", "trainer.max_epochs=2", f"seed={seed}"],
                  history([0.6, 0.7], None, [miou - 0.05, miou]), chained_trials=None)
    acc, study, miou = (values[:4] for values in CHAINED_SCORES["unet"])
    write_run(root / "interrupted", "0", ["model=unet", "trainer.max_epochs=6", "seed=1"], history(acc, study, miou),
              status="failed", error="KeyboardInterrupt", interrupted_by="Ctrl-C", chained_trials=CHAINED)
    return root


@pytest.fixture(scope="module")
def mixed(sweeps: Path) -> tuple[Path, list[dict]]:
    """One report of the chained and the fair sweep together (written into multirun/chained)."""
    rows = report.main([str(sweeps / "chained"), str(sweeps / "fair")])
    return sweeps / "chained", rows


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def section(text: str) -> str:
    """report.md's study section, up to the next `## ` heading."""
    return text.split(f"## {SECTION}\n")[1].split("\n## ")[0]


def test_chained_and_fair_runs_rank_as_four_configurations(mixed: tuple[Path, list[dict]]) -> None:
    out, rows = mixed
    assert [(r["setting"], r["runs"], r["epochs"]) for r in rows] == [
        ("model=unet trainer.max_epochs=2", 2, 2), ("model=unet trainer.max_epochs=6 chained_trials=3x2", 1, 6),
        ("model=fcn trainer.max_epochs=2", 2, 2), ("model=fcn trainer.max_epochs=6 chained_trials=3x2", 1, 6)]
    assert rows[1]["max"] == pytest.approx(0.35) and rows[0]["mean"] == pytest.approx(0.42)
    table = read_csv(out / "report.csv")
    assert [r["chained_trials"] for r in table] == ["", "3x2", "", "3x2"]  # the chained rows say so


def test_study_metrics_get_columns_at_the_best_epoch_and_a_footnote(mixed: tuple[Path, list[dict]]) -> None:
    out, _ = mixed
    table = read_csv(out / "report.csv")
    chained_unet = table[1]
    assert float(chained_unet["val_study_meaniou_max"]) == pytest.approx(0.50)  # best epoch (6) by val/miou
    assert float(chained_unet["val_study_iou_no_bg_mean"]) == pytest.approx(0.25)
    assert chained_unet["val_study_meaniou_std"] == "" and float(table[3]["val_study_meaniou_max"]) == 0.46
    assert [table[0][f"val_study_meaniou_{s}"] for s in ("max", "mean", "std")] == ["", "", ""]  # fair: not logged
    text = (out / "report.md").read_text()
    ranked = text.split("## Configurations ranked by val/miou\n")[1].split("\n## ")[0]
    header = ranked.strip().splitlines()[0]
    assert "| study MeanIoU* mean % | study IoU no bg* mean % |" in header
    assert "| 2 | unet | 6 | 3x2 | 35.00 | 35.00 | — |" in ranked and "| 50.00 | 25.00 |" in ranked
    assert ranked.rstrip().endswith(STUDY_FOOTNOTE)
    assert "not segmentation scores; see the README's \"The study's metrics are not mIoU\"" in STUDY_FOOTNOTE


def test_runs_without_the_study_metrics_get_no_columns(sweeps: Path) -> None:
    configs = report.group_runs(report.collect_runs(sweeps / "fair"))
    rows = [configuration_row(c) for c in configs]
    assert "study" not in to_csv(rows) and "study" not in markdown_table(rows, ["model"])


def test_the_study_points_are_each_windows_maxima_taken_separately(mixed: tuple[Path, list[dict]]) -> None:
    out, _ = mixed
    study = section((out / "report.md").read_text())
    assert "| configuration | job | trial | epochs | max val acc % (epoch) | max study MeanIoU* % (epoch) " \
           "| max val mIoU % (epoch) |" in study
    lines = study.splitlines()
    for expected in UNET_WINDOWS + FCN_WINDOWS:
        job = expected.split(" | ")[1]
        assert expected.replace(f" | {job} | ", f" | chained/{job} | ", 1) in lines
    assert STUDY_FOOTNOTE in lines and "incomplete" not in study.split("### ")[0].split("|---|")[1]
    # the independent seeds beside them, matched by model
    assert "| model=unet | 2 | 40.00, 44.00 | 42.00 | 20.00, 25.00, 35.00 |" in lines
    assert "| model=fcn | 2 | 30.00, 26.00 | 28.00 | 8.00, 12.00, 15.00 |" in lines
    assert "](plots/study_points.png)" in study and "`study_points.csv`" in study


def test_study_points_csv_has_a_row_per_run_and_window_then_per_seed(mixed: tuple[Path, list[dict]]) -> None:
    out, _ = mixed
    rows = read_csv(out / "study_points.csv")
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 2 * 3 + 4
    chained = [r for r in rows if r["kind"] == "chained"]
    got = [(r["configuration"], r["job"], r["trial"], r["epochs"], r["complete"], float(r["val_acc_max"]),
            int(r["val_acc_epoch"]), float(r["val_study_meaniou_max"]), int(r["val_study_meaniou_epoch"]),
            float(r["val_miou_max"]), int(r["val_miou_epoch"])) for r in chained]
    assert got[:3] == [("model=unet", "chained/0", "1", "1-2", "True", 0.60, 2, 0.48, 1, 0.20, 2),
                       ("model=unet", "chained/0", "2", "3-4", "True", 0.70, 3, 0.49, 4, 0.25, 3),
                       ("model=unet", "chained/0", "3", "5-6", "True", 0.80, 5, 0.50, 6, 0.35, 6)]
    assert got[5] == ("model=fcn", "chained/1", "3", "5-6", "True", 0.61, 5, 0.46, 6, 0.15, 6)
    seeds = [(r["configuration"], r["job"], r["seed"], float(r["val_miou_max"]), r["val_miou_epoch"], r["val_acc_max"])
             for r in rows if r["kind"] == "independent"]
    assert seeds == [("model=unet", "fair/0", "1", 0.40, "2", ""), ("model=unet", "fair/1", "2", 0.44, "2", ""),
                     ("model=fcn", "fair/2", "1", 0.30, "2", ""), ("model=fcn", "fair/3", "2", 0.26, "2", "")]


def test_the_study_points_figure_is_a_png_beside_the_others(mixed: tuple[Path, list[dict]]) -> None:
    out, _ = mixed
    data = (out / "plots" / "study_points.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    text = (out / "report.md").read_text()
    assert text.count("](plots/study_points.png)") == 1 and "Not drawn: " not in section(text)
    assert (out / "plots" / "scores.png").is_file()


def test_an_interrupted_chained_run_marks_its_unfinished_window(sweeps: Path) -> None:
    """A one-run report of a chained run shows the section; the window the run never reached is incomplete."""
    run_dir = sweeps / "interrupted" / "0"
    rows = report.main([str(run_dir)])
    assert rows[0]["runs"] == 0 and rows[0]["failed"] == 1
    text = (run_dir / "report.md").read_text()
    study = section(text)
    assert UNET_WINDOWS[0] in study and UNET_WINDOWS[1] in study
    assert "| model=unet | 0 | 3 | 5-6 **incomplete** (0 of 2 epochs recorded) | — | — | — |" in study
    assert "### Independent seeds" not in study
    assert (run_dir / "plots" / "study_points.png").read_bytes().startswith(PNG_MAGIC)
    last = read_csv(run_dir / "study_points.csv")[-1]
    assert (last["trial"], last["epochs_recorded"], last["complete"], last["val_acc_max"]) == ("3", "0", "False", "")
    scores = text.split("## Scores")[1].split("\n## ")[0]
    assert "| study MeanIoU* % | study IoU no bg* % |" in scores and STUDY_FOOTNOTE in scores


def test_a_one_run_report_of_a_chained_run_shows_its_points(sweeps: Path, tmp_path: Path) -> None:
    report.write_report(report.collect_runs(sweeps / "chained" / "0"), tmp_path, roots=[sweeps / "chained" / "0"])
    lines = section((tmp_path / "report.md").read_text()).splitlines()
    assert all(line in lines for line in UNET_WINDOWS) and "### Independent seeds beside them" not in lines
    assert len(read_csv(tmp_path / "study_points.csv")) == 3


def test_a_window_cut_short_keeps_its_maxima_over_the_epochs_recorded() -> None:
    acc, study, miou = (values[:5] for values in CHAINED_SCORES["unet"])
    record = {"status": "running", "history": history(acc, study, miou), "chained_trials": CHAINED}
    last = windows(Run(run_dir=Path("run"), status="running", record=record), "unet")[-1]
    assert (last.trial, last.epochs, last.recorded, last.complete) == (3, "5-6", 1, False)
    assert last.maxima == {"val_acc": (0.80, 4), "val_study_meaniou": (0.45, 4), "val_miou": (0.30, 4)}
    assert windows(Run(run_dir=Path("run"), status="running", record={**record, "chained_trials": None}), "") == []


def test_a_chained_preset_meets_the_fair_grid_at_its_own_learning_rate(tmp_path: Path) -> None:
    """`experiment=compare_models_chained` sets model and lr in its preset: Hydra's choices (.hydra/hydra.yaml) and
    the composed config (.hydra/config.yaml) name them, so only the fair grid's seeds at lr 1e-4 join its points."""
    acc, study, miou = CHAINED_SCORES["unet"]
    chained = write_run(tmp_path / "chained", "0", ["experiment=compare_models_chained"], history(acc, study, miou),
                        chained_trials=CHAINED)
    (chained / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      model: unet\n")
    (chained / ".hydra" / "config.yaml").write_text("optimizer:\n  lr: 0.0001\ntrainer:\n  max_epochs: 6\n")
    for index, (model, lr) in enumerate([("unet", "1e-4"), ("unet", "1e-3"), ("fcn", "1e-4")]):
        write_run(tmp_path / "fair", str(index), ["experiment=compare_models", f"model={model}", f"optimizer.lr={lr}",
                                                  "seed=1"], history([0.6, 0.7], None, [0.3, 0.4 + index / 100]))
    points = collect(report.collect_runs(tmp_path / "chained", tmp_path / "fair"))
    assert points is not None and points.labels == ["model=unet optimizer.lr=0.0001"]
    assert [s.run.run_dir.name for s in points.seeds] == ["0"] and points.unmatched == 2
    assert {w.label for w in points.windows} == {"model=unet optimizer.lr=0.0001"}


def test_a_report_without_chained_runs_has_no_study_section(sweeps: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    (out / "plots").mkdir(parents=True)
    (out / "study_points.csv").write_text("stale")  # from an earlier report of other runs
    report.write_report(report.collect_runs(sweeps / "fair" / "0"), out)
    assert SECTION not in (out / "report.md").read_text() and not (out / "study_points.csv").exists()
