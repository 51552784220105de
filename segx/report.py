"""Human-readable tables: one evaluation's scores, and a sweep's runs grouped over seeds.

`python -m segx.report multirun/2026-11-24/10-00-00` prints mean ± std and max of the best val mIoU of
every setting, the study's way of comparing models and optimizers (it took the max over 3 runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def print_scores(result: dict[str, Any], console: Console | None = None) -> None:
    """Overall scores, then IoU per class (— for a class absent from ground truth and prediction)."""
    console = console or Console()
    title = (f"{result.get('split', '')} split, {result.get('n_images', '?')} images, "
             f"{'full resolution' if result.get('full_res') else str(result.get('image_size', '')) + ' px'}")
    overall = Table(title=title)
    for column in ("mIoU %", "mIoU no bg %", "pixel acc %", "seconds"):
        overall.add_column(column, justify="right")
    overall.add_row(_pct(result["miou"]), _pct(result["miou_no_bg"]), _pct(result["pixel_acc"]),
                    f"{result.get('seconds', 0):.1f}")
    console.print(overall)
    per_class = Table(title="IoU per class")
    per_class.add_column("class")
    per_class.add_column("IoU %", justify="right")
    for name, value in result["per_class_iou"].items():
        per_class.add_row(name, _pct(value))
    console.print(per_class)


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every training run under `root` (a multirun or outputs folder): its overrides and headline numbers."""
    runs = []
    for path in sorted(Path(root).rglob("metrics.json")):
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        metrics = json.loads(path.read_text())
        if "history" not in metrics or not overrides_file.is_file():
            continue  # an evaluation, or not a segx training run
        overrides = [str(o) for o in OmegaConf.load(overrides_file)]
        best = metrics.get("best") or {}
        runs.append({
            "run_dir": str(path.parent),
            "overrides": [o for o in overrides if not o.startswith(("hydra.", "data.root="))],
            "best_val_miou": best.get("val/miou"),
            "final_val_miou": (metrics.get("final") or {}).get("val/miou"),
            "epochs": metrics.get("epochs"),
            "trainable": (metrics.get("parameters") or {}).get("trainable"),
            "seconds_per_epoch": metrics.get("seconds_per_epoch"),
        })
    return runs


def summarize(runs: list[dict[str, Any]], over: str = "seed") -> list[dict[str, Any]]:
    """Groups runs that differ only in `over` (the seed, by default): mean, std and max of best val mIoU."""
    common = set(common_overrides(runs)) if len(runs) > 1 else set()
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for run in runs:  # a setting is named by what varies across the sweep
        key = tuple(o for o in run["overrides"] if not o.startswith(f"{over}=") and o not in common)
        groups.setdefault(key, []).append(run)
    rows = []
    for key, members in groups.items():
        scores = [m["best_val_miou"] for m in members if m["best_val_miou"] is not None]
        rows.append({
            "setting": " ".join(key) or "(defaults)",
            "runs": len(members),
            "mean": statistics.fmean(scores) if scores else None,
            "std": statistics.stdev(scores) if len(scores) > 1 else None,
            "max": max(scores) if scores else None,
            "trainable": members[0]["trainable"],
            "seconds_per_epoch": statistics.fmean(m["seconds_per_epoch"] or 0 for m in members),
        })
    return sorted(rows, key=lambda r: -(r["mean"] if r["mean"] is not None else -1))


def common_overrides(runs: list[dict[str, Any]]) -> list[str]:
    """Overrides every run shares, in the first run's order."""
    shared = set.intersection(*(set(r["overrides"]) for r in runs)) if runs else set()
    return [o for o in runs[0]["overrides"] if o in shared] if runs else []


def print_summary(rows: list[dict[str, Any]], shared: list[str] | None = None, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="best val mIoU % per setting (over seeds)",
                  caption=f"all runs: {' '.join(shared)}" if shared else None)
    for column, justify in (("setting", "left"), ("runs", "right"), ("mean", "right"), ("std", "right"),
                            ("max", "right"), ("parameters", "right"), ("s/epoch", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row["setting"], str(row["runs"]), _pct(row["mean"]), _pct(row["std"]), _pct(row["max"]),
                      f"{row['trainable']:,}" if row["trainable"] else "—", f"{row['seconds_per_epoch']:.1f}")
    console.print(table)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m segx.report",
                                     description="Table of a sweep's runs, grouped over seeds.")
    parser.add_argument("root", type=Path, help="a multirun/<date>/<time> folder (or any folder of runs)")
    parser.add_argument("--over", default="seed", help="the override to aggregate over (default: seed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the grouped rows here")
    args = parser.parse_args(argv)
    runs = collect_runs(args.root)
    if not runs:
        print(f"No segx training runs (metrics.json + .hydra/overrides.yaml) under {args.root}.", file=sys.stderr)
        sys.exit(2)
    rows = summarize(runs, args.over)
    print_summary(rows, common_overrides(runs) if len(runs) > 1 else None)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
