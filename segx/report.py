"""Human-readable tables of scores."""

from __future__ import annotations

from typing import Any

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
