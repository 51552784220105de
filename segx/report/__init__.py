"""Reports on training runs: `python -m segx.report multirun/2026-11-24/10-00-00` writes report.md, report.csv
and plots/ (mean, std and max over seeds of each setting's best epoch, the study's way of comparing).

The public names below are what other code imports (evaluate.py prints its scores with `print_scores` and can
draw `confusion_matrix_figure`); matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segx.report.build import Report, write_report
from segx.report.cli import main
from segx.report.runs import Configuration, Run, collect_runs, common_overrides, group_runs, read_run
from segx.report.tables import print_scores, print_summary, to_csv


def confusion_matrix_figure(confmat: Any, class_names: list[str], path: str | Path, title: str | None = None) -> Path:
    """Row-normalised confusion matrix PNG (rows: ground truth) written atomically to `path`."""
    from segx.report.plots import confusion_matrix_figure as draw

    return draw(confmat, class_names, path, title=title)


__all__ = [
    "Configuration", "Report", "Run", "collect_runs", "common_overrides", "confusion_matrix_figure", "group_runs",
    "main", "print_scores", "print_summary", "read_run", "to_csv", "write_report",
]
