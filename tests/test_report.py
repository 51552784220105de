"""`python -m segx.report` on real sweeps: report.csv numbers, the figures, failed, running, older and broken runs."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from segx import report
from segx.core.files import atomic_path
from segx.report.plots import normalize_rows
from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, read_json, run_in_process

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP_PLOTS = {"scores.png", "curves.png", "per_class_iou.png", "predictions.png"}
METRICS = {"miou": "val/miou", "miou_no_bg": "val/miou_no_bg", "acc": "val/acc", "loss": "val/loss"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, shapes_root: Path) -> Path:
    """A real 2 optimizers × 2 seeds sweep (4 short jobs), reported once."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    run_in_process("train.py", "-m", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}",
                    "trainer.max_epochs=2", "trainer.limit_train_batches=2", "optimizer=sgd,adam", "seed=1,2",
                    "optimizer.lr=0.003", "logger=none", f"hydra.sweep.dir={sweep_dir}")
    report.main([str(sweep_dir)])
    return sweep_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def jobs(sweep_dir: Path) -> list[tuple[Path, dict]]:
    return [(p.parent, read_json(p)) for p in sorted(sweep_dir.glob("[0-9]*/metrics.json"))]


def setting(record: dict, key: str) -> str:
    return dict(o.split("=", 1) for o in record["overrides"])[key]


@pytest.mark.slow
def test_csv_has_the_max_mean_and_std_over_seeds_of_each_jobs_best_epoch(sweep: Path) -> None:
    rows = read_csv(sweep / "report.csv")
    assert [r["optimizer"] for r in rows].count("sgd") == 1 and len(rows) == 2
    assert {"seed", "optimizer.lr", "data.root", "model"}.isdisjoint(rows[0])  # constant or ignored overrides
    assert "predict_val_seconds" not in rows[0]  # not measured in this sweep
    for row in rows:
        records = [r for _, r in jobs(sweep) if setting(r, "optimizer") == row["optimizer"]]
        assert (row["runs"], row["failed"], row["epochs"]) == ("2", "0", "2")
        assert int(row["parameters"]) == records[0]["parameters"]["total"]
        for name, metric in METRICS.items():
            values = [r["best"][metric] for r in records]
            assert float(row[f"val_{name}_max"]) == pytest.approx(max(values))
            assert float(row[f"val_{name}_mean"]) == pytest.approx(statistics.fmean(values))
            assert float(row[f"val_{name}_std"]) == pytest.approx(statistics.stdev(values))
        assert float(row["seconds_per_epoch"]) == pytest.approx(statistics.fmean(r["seconds_per_epoch"]
                                                                                 for r in records))
    means = [float(r["val_miou_mean"]) for r in rows]
    assert means == sorted(means, reverse=True)  # ranked by the monitor's mean


def test_every_figure_is_a_distinct_png_linked_from_report_md(sweep: Path) -> None:
    text = (sweep / "report.md").read_text()
    files = {p.name: p.read_bytes() for p in (sweep / "plots").glob("*.png")}
    assert set(files) == SWEEP_PLOTS
    assert all(data.startswith(PNG_MAGIC) and len(data) > 5000 for data in files.values())
    assert len(set(files.values())) == len(files)
    for name in files:
        assert f"](plots/{name})" in text
    assert "Not drawn" not in text and "Jobs without a result" not in text
    assert "## Settings shared by every job" in text and "`optimizer.lr=0.003`" in text
    assert "| 1 | adam |" in text or "| 1 | sgd |" in text
    # The sweep as typed, data.root included, to paste into a shell: its swept keys with every value.
    command = text.split("```bash\n", 1)[1].split("\n", 1)[0]
    assert command.startswith("python train.py -m ") and f"data.root={setting(jobs(sweep)[0][1], 'data.root')}" \
        in command
    assert "optimizer=sgd,adam" in command and "seed=1,2" in command and "'model.encoder_widths=[16,32]'" in command
    assert not list(sweep.rglob("*.tmp"))  # atomic writes leave no temp file behind


def test_missing_values_are_empty_cells_and_timing_gets_its_figure(sweep: Path, tmp_path: Path) -> None:
    """A metric no job of a configuration recorded is an empty cell (not 0); so is a time measured elsewhere only."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("report.*", "plots"))
    for run_dir, record in jobs(copy):
        if setting(record, "optimizer") == "adam":
            del record["best"]["val/miou_no_bg"]
        else:
            record.update(predict_val_seconds=0.3, predict_images=16)
        (run_dir / "metrics.json").write_text(json.dumps(record))
    report.main([str(copy)])
    rows = {r["optimizer"]: r for r in read_csv(copy / "report.csv")}
    assert [rows["adam"][f"val_miou_no_bg_{s}"] for s in ("max", "mean", "std")] == ["", "", ""]
    assert rows["adam"]["predict_val_seconds"] == "" and float(rows["sgd"]["predict_val_seconds"]) > 0.25
    assert (copy / "plots" / "score_vs_predict_time.png").read_bytes().startswith(PNG_MAGIC)
    assert "](plots/score_vs_predict_time.png)" in (copy / "report.md").read_text()


@pytest.mark.slow
def test_a_sweep_with_a_failed_job_renders_and_lists_it(shapes_root: Path, tmp_path: Path) -> None:
    result = run_in_process("train.py", "-m", *TINY_SHAPES, *QUIET, "model=unet,unet_small", "data.image_size=40",
                             "data.batch_size=4", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                             "trainer.limit_val_batches=1", "logger=none", f"data.root={shapes_root}",
                             f"hydra.sweep.dir={tmp_path}", check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    error = read_json(tmp_path / "0" / "metrics.json")["error"].splitlines()[0]
    rows = report.main([str(tmp_path)])
    assert [(r["setting"], r["runs"], r["failed"]) for r in rows] == [("model=unet_small", 1, 0), ("model=unet", 0, 1)]
    text = (tmp_path / "report.md").read_text()
    assert "## Jobs without a result" in text
    assert f"| 0 | failed | `{tmp_path / '0'}` | {error} |" in text
    failed = {r["model"]: r for r in read_csv(tmp_path / "report.csv")}["unet"]
    assert (failed["runs"], failed["failed"], failed["val_miou_mean"], failed["parameters"]) == ("0", "1", "", "")
    assert (tmp_path / "plots" / "predictions.png").is_file()  # from the job that completed


def test_a_single_run_gets_its_curves_and_confusion_matrix(sweep: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(sweep / "3", run_dir)
    record = read_json(run_dir / "metrics.json")
    if "best_confusion_matrix" not in record:  # runs from before the matrix was recorded: fabricate one
        record["best_confusion_matrix"] = np.diag(np.arange(21)).tolist()
        (run_dir / "metrics.json").write_text(json.dumps(record))
    rows = report.main([str(run_dir)])
    assert len(rows) == 1 and rows[0]["runs"] == 1
    text = (run_dir / "report.md").read_text()
    names = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert names == {"curves.png", "confusion_matrix.png", "predictions.png"}
    assert all(f"](plots/{name})" in text for name in names)
    assert "## IoU per class at the best epoch" in text and "| background |" in text
    assert len(read_csv(run_dir / "report.csv")) == 1
    command = text.split("To train it again:\n\n```bash\n", 1)[1].split("\n", 1)[0]  # job 3 as typed: adam, seed 2
    assert command.startswith("python train.py ") and "optimizer=adam" in command and "seed=2" in command
    assert f"data.root={setting(record, 'data.root')}" in command and "hydra." not in command


def test_predictions_are_skipped_with_the_reason_when_the_data_is_gone(sweep: Path, tmp_path: Path) -> None:
    import torch

    from segx.inference.checkpoint import CHECKPOINT_KEY, load_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(sweep / "2", run_dir)
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    checkpoint[CHECKPOINT_KEY]["config"]["data"]["root"] = str(tmp_path / "gone")
    torch.save(checkpoint, run_dir / "checkpoints" / "best.ckpt")
    report.main([str(run_dir)])
    text = (run_dir / "report.md").read_text()
    assert f"### Predictions\n\nNot drawn: the run's data.root={tmp_path / 'gone'} is not a folder" in text
    assert not (run_dir / "plots" / "predictions.png").exists() and (run_dir / "plots" / "curves.png").is_file()


def test_confusion_matrix_rows_are_normalised_and_absent_classes_left_out(tmp_path: Path) -> None:
    counts = [[8, 2, 0], [0, 0, 0], [1, 1, 2]]
    fractions = normalize_rows(counts)
    assert fractions[0].tolist() == [0.8, 0.2, 0.0] and np.isnan(fractions[1]).all()
    assert fractions[2].tolist() == [0.25, 0.25, 0.5]
    path = report.confusion_matrix_figure(counts, ["background", "cat", "dog"], tmp_path / "cm.png")
    assert path.read_bytes().startswith(PNG_MAGIC) and [p.name for p in tmp_path.iterdir()] == ["cm.png"]


def test_older_running_broken_and_evaluation_dirs_do_not_crash_the_report(sweep: Path, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    # an older version's run: no status, monitor or overrides in metrics.json (.hydra/overrides.yaml has them),
    # and a checkpoint that cannot be read
    shutil.copytree(sweep / "0", root / "old")
    old = read_json(root / "old" / "metrics.json")
    for key in ("status", "monitor", "overrides", "best_confusion_matrix", "class_names"):
        old.pop(key, None)
    (root / "old" / "metrics.json").write_text(json.dumps(old))
    (root / "old" / "checkpoints" / "best.ckpt").write_bytes(b"not a checkpoint")
    # a job still running, one with a corrupt metrics.json, one that never wrote it
    shutil.copytree(sweep / "1", root / "running")
    running = read_json(root / "running" / "metrics.json")
    running.update(status="running", history=running["history"][:1])
    (root / "running" / "metrics.json").write_text(json.dumps(running))
    shutil.copytree(sweep / "2" / ".hydra", root / "corrupt" / ".hydra")
    (root / "corrupt" / "metrics.json").write_text('{"status": "compl')
    shutil.copytree(sweep / "3" / ".hydra", root / "missing" / ".hydra")
    # evaluate.py's output is not a training run
    (root / "old" / "evaluate").mkdir()
    (root / "old" / "evaluate" / "metrics.json").write_text(json.dumps({"miou": 0.1, "per_class_iou": {}}))

    rows = report.main([str(root)])
    sgd, adam = rows  # old + running, corrupt + missing
    assert (sgd["setting"], sgd["runs"], sgd["failed"], sgd["monitor"]) == ("optimizer=sgd", 1, 0, "val/miou")
    assert sgd["max"] == pytest.approx(old["best"]["val/miou"])
    assert (adam["setting"], adam["runs"], adam["failed"], adam["max"]) == ("optimizer=adam", 0, 2, None)
    text = (root / "report.md").read_text()
    assert "| running | running |" in text and "| corrupt | unreadable |" in text and "| missing | missing |" in text
    assert "### Predictions of the best configuration\n\nNot drawn: " in text  # the checkpoint is unreadable
    assert not (root / "plots" / "predictions.png").exists()
    assert (root / "plots" / "curves.png").is_file()


def test_an_interrupted_write_keeps_the_previous_file(tmp_path: Path) -> None:
    (tmp_path / "report.md").write_text("previous report")
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "report.md") as tmp:
        tmp.write_text("half a rep")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
    assert (tmp_path / "report.md").read_text() == "previous report"


def test_a_folder_without_runs_names_itself_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps({"miou": 0.5, "per_class_iou": {}}))
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and len(err.splitlines()) == 1


def test_the_console_table_wraps_settings_instead_of_cutting_them() -> None:
    import io

    from rich.console import Console

    from segx.report.tables import print_summary

    row = {"setting": "optimizer=sgd optimizer.lr=0.00031622776601683794 model=unet_small", "runs": 1, "failed": 0,
           "mean": 0.5, "std": None, "max": 0.5, "parameters": 4_065_749, "seconds_per_epoch": 1.2,
           "monitor": "val/miou"}
    console = Console(file=io.StringIO(), width=80)
    print_summary([row], console=console)
    cells = "".join(line.split("│")[1] for line in console.file.getvalue().splitlines() if line.count("│") > 2)
    assert "optimizer.lr=0.00031622776601683794" in cells.replace(" ", "") and "…" not in console.file.getvalue()
