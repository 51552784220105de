"""Tables of a report: one row per configuration (stats over seeds) as CSV, Markdown and a console table."""

from __future__ import annotations

import csv
import io
import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

from segx.report.runs import Configuration

# report.csv's metric columns: val_<name>_{max,mean,std}, each from the jobs' best epochs
METRICS = {"miou": "val/miou", "miou_no_bg": "val/miou_no_bg", "acc": "val/acc", "mdice": "val/mdice",
           "macc": "val/macc", "mfscore": "val/mfscore", "loss": "val/loss"}
# the study's Keras metrics (logged beside the real scores): report.csv's val_study_<name>_{max,mean,std} and their
# own columns in report.md, only where some run recorded them
STUDY_METRICS = {"study_meaniou": "val/study_meaniou", "study_iou_no_bg": "val/study_iou_no_bg"}
STUDY_HEADERS = {"study_meaniou": "study MeanIoU*", "study_iou_no_bg": "study IoU no bg*"}
STUDY_FOOTNOTE = ("\\* The study's Keras metrics, not segmentation scores; see the README's \"The study's "
                  "metrics are not mIoU\".")
LR_KEYS = ("lr", "lr_decay")  # override keys (or key suffixes) that choose a learning rate


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _stats(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """max, mean and sample standard deviation (None where undefined)."""
    if not values:
        return None, None, None
    return max(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def configuration_row(config: Configuration) -> dict[str, Any]:
    """One configuration's numbers: report.csv's columns plus `setting`, `monitor` and its `mean`/`std`/`max`."""
    row: dict[str, Any] = {"setting": config.label, "settings": dict(config.settings),
                           "runs": len(config.completed), "failed": sum(r.ended_badly for r in config.runs),
                           "running": sum(not r.completed and not r.ended_badly for r in config.runs)}
    row["parameters"] = next((r.parameters for r in config.runs if r.parameters is not None), None)
    epochs = [r.record.get("epochs") for r in config.completed]
    row["epochs"] = max((int(e) for e in epochs if isinstance(e, int | float)), default=None)
    for name, metric in {**METRICS, **STUDY_METRICS}.items():
        row[f"val_{name}_max"], row[f"val_{name}_mean"], row[f"val_{name}_std"] = _stats(config.best_values(metric))
    row["seconds_per_epoch"] = _mean([r.value("seconds_per_epoch") for r in config.completed])
    row["predict_val_seconds"] = _mean([r.value("predict_val_seconds") for r in config.completed])
    row["monitor"] = config.monitor
    row["max"], row["mean"], row["std"] = _stats(config.best_values(config.monitor))
    row["run_dirs"] = [str(r.run_dir) for r in config.runs]
    return row


def study_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The study's metrics (STUDY_METRICS' names) when some row has a value of either, else []."""
    present = any(row.get(f"val_{name}_max") is not None for row in rows for name in STUDY_METRICS)
    return list(STUDY_METRICS) if present else []


def csv_columns(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row["settings"] if k not in keys)
    columns = [*keys, "runs", "failed", "parameters", "epochs"]
    columns += [f"val_{name}_{stat}" for name in [*METRICS, *study_metrics(rows)] for stat in ("max", "mean", "std")]
    columns.append("seconds_per_epoch")
    if any(row["predict_val_seconds"] is not None for row in rows):
        columns.append("predict_val_seconds")
    return columns


def to_csv(rows: list[dict[str, Any]]) -> str:
    """report.csv: fractions, full precision; a missing value is an empty cell, never 0."""
    columns = csv_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {**row, **row["settings"]}
        writer.writerow({c: "" if cells.get(c) is None else cells[c] for c in columns})
    return buffer.getvalue()


# -- Markdown ---------------------------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """Ranked rows in percent: the ranking metric's mean, max and std first, then the other means."""
    monitors = {row["monitor"] for row in rows}
    rank_name = next(iter(monitors)) if len(monitors) == 1 else "monitor"
    others = [(name, metric) for name, metric in METRICS.items() if name != "loss" and metric not in monitors]
    study = study_metrics(rows)
    header = ["#", *keys, f"{rank_name} mean %", "max %", "std %",
              *([] if len(monitors) == 1 else ["monitor"]), *(f"{metric} mean %" for _, metric in others),
              *(f"{STUDY_HEADERS[name]} mean %" for name in study),
              "val/loss mean", "runs", "failed", "parameters", "epochs", "s/epoch"]
    timed = any(row["predict_val_seconds"] is not None for row in rows)
    if timed:
        header.append("predict val s")
    align = ["---"] * (1 + len(keys)) + ["---:"] * (len(header) - 1 - len(keys))  # numbers to the right
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    for index, row in enumerate(rows, 1):
        cells = [str(index), *(row["settings"].get(k, "") for k in keys),
                 _pct(row["mean"]), _pct(row["max"]), _pct(row["std"]),
                 *([] if len(monitors) == 1 else [row["monitor"]]),
                 *(_pct(row[f"val_{name}_mean"]) for name, _ in others),
                 *(_pct(row.get(f"val_{name}_mean")) for name in study),
                 _number(row["val_loss_mean"], 4), str(row["runs"]), str(row["failed"]),
                 "—" if row["parameters"] is None else f"{row['parameters']:,}",
                 "—" if row["epochs"] is None else str(row["epochs"]), _number(row["seconds_per_epoch"], 1)]
        if timed:
            cells.append(_number(row["predict_val_seconds"], 2))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if study:
        lines += ["", STUDY_FOOTNOTE]
    return "\n".join(lines)


def lr_keys(keys: list[str]) -> list[str]:
    """The varying keys that choose a learning rate (`optimizer.lr`, `lr_decay`, ...)."""
    return [k for k in keys if k in LR_KEYS or k.rsplit(".", 1)[-1] in LR_KEYS]


def tuned_per_model(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Each model's best learning rate (the study's "tuned per model"): among rows that differ only by their lr
    keys, the one with the best mean. Empty unless `model` and an lr key both vary."""
    lrs = lr_keys(keys)
    if "model" not in keys or not lrs:
        return []
    best: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for row in rows:  # rows are ranked: the first of each group is its best
        if row["mean"] is None:
            continue
        group = tuple((k, v) for k, v in row["settings"].items() if k not in lrs)
        best.setdefault(group, row)
    return list(best.values())


# -- console ----------------------------------------------------------------------------------------------------

def print_scores(result: dict[str, Any], console: Console | None = None) -> None:
    """Overall scores, then IoU per class (— for a class absent from ground truth and prediction)."""
    console = console or Console()
    title = (f"{result.get('split', '')} split, {result.get('n_images', '?')} images, "
             f"{'full resolution' if result.get('full_res') else str(result.get('image_size', '')) + ' px'}"
             + (f", test-time augmentation {result['tta']}" if result.get("tta") not in (None, "none") else "")
             + (", sliding windows" if (result.get("inference") or {}).get("mode") == "slide" else "")
             + (f", {result['precision']}" if result.get("precision") not in (None, "32-true") else ""))
    overall = Table(title=title)
    beta = result.get("fscore_beta", 1.0)
    means = (("mIoU %", "miou"), ("mIoU no bg %", "miou_no_bg"), ("mDice %", "mdice"), ("mAcc %", "macc"),
             (f"mF{beta:g} %", "mfscore"), ("pixel acc %", "pixel_acc"))
    for column, _ in means:
        overall.add_column(column, justify="right")
    overall.add_column("seconds", justify="right")
    overall.add_row(*(_pct(result.get(key)) for _, key in means), f"{result.get('seconds', 0):.1f}")
    console.print(overall)
    per_class = Table(title="IoU per class, with Dice, precision and recall (—: undefined, left out of the means)")
    per_class.add_column("class")
    columns = [(name, key) for name, key in (("IoU %", "iou"), ("Dice %", "dice"), ("precision %", "precision"),
                                              ("recall %", "recall")) if f"per_class_{key}" in result]
    for column, _ in columns:
        per_class.add_column(column, justify="right")
    for name in result["per_class_iou"]:
        per_class.add_row(name, *(_pct(result[f"per_class_{key}"].get(name)) for _, key in columns))
    console.print(per_class)


def print_summary(rows: list[dict[str, Any]], shared: list[str] | None = None, console: Console | None = None) -> None:
    """The ranked configurations: mean, std and max over seeds of the monitored best-epoch score."""
    console = console or Console()
    monitors = sorted({row["monitor"] for row in rows})
    table = Table(title=f"best {' / '.join(monitors)} % per setting (over seeds)",
                  caption=f"all runs: {' '.join(shared)}" if shared else None)
    # A narrow terminal wraps the settings instead of cutting them ("optimizer.lr=0.0…" hid every learning rate);
    # the numbers never wrap.
    table.add_column("setting", justify="left", overflow="fold", min_width=24)
    for column in ("runs", "failed", "mean", "std", "max", "parameters", "s/epoch"):
        table.add_column(column, justify="right", overflow="fold")
    for row in rows:
        table.add_row(row["setting"], str(row["runs"]), str(row["failed"]), _pct(row["mean"]), _pct(row["std"]),
                      _pct(row["max"]), f"{row['parameters']:,}" if row["parameters"] else "—",
                      _number(row["seconds_per_epoch"], 1))
    console.print(table)
