"""Report figures (matplotlib, Agg backend): scores per configuration, training curves, per-class IoU, example
predictions, accuracy against prediction time, a confusion matrix, and a search's trial curves and score against
its parameters. Each is saved atomically as a PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segx.core.files import atomic_path
from segx.report.runs import Configuration
from segx.runs.status import COMPLETED, RUNNING

DPI = 120
MAX_CLASS_COLUMNS = 40  # beyond this many classes the per-class heat map lists them as rows
METRIC_NAMES = {"val/miou": "val mIoU", "val/miou_no_bg": "val mIoU without background",
                "val/acc": "val pixel accuracy"}


def _pyplot() -> Any:
    """pyplot on the Agg backend: figures render to files, with or without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path) -> Path:
    """Write `figure` as a PNG via a temp file and a rename, then free it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        _pyplot().close(figure)
    return path


def _colours(count: int) -> list[Any]:
    cmap = _pyplot().get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


def headline_metric(configs: Sequence[Configuration]) -> str:
    """The mIoU the report's figures show: the configurations' monitor when it is an mIoU, else val/miou."""
    monitors = [c.monitor for c in configs]
    common = max(set(monitors), key=monitors.count) if monitors else "val/miou"
    return common if common in ("val/miou", "val/miou_no_bg") else "val/miou"


def score_bars(configs: Sequence[Configuration], metric: str, path: str | Path) -> Path:
    """Horizontal bars of the mean over seeds of the best-epoch `metric`, best on top; whiskers span the seeds'
    min–max and dots mark the seeds."""
    plt = _pyplot()
    labels = [c.label for c in configs]
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.45 * len(configs)))
    labelled: set[str] = set()

    def once(label: str) -> str | None:  # each legend entry once, from the first element that draws it
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for y, config in enumerate(configs):
        values = [100 * v for v in config.best_values(metric)]
        if not values:
            axes.text(0.5, y, "no completed run", va="center", fontsize=8, color="0.4")
            continue
        mean = float(np.mean(values))
        axes.barh(y, mean, color="tab:blue", alpha=0.75, label=once("mean over seeds"))
        if len(values) > 1:
            axes.errorbar(mean, y, xerr=[[mean - min(values)], [max(values) - mean]], fmt="none", ecolor="black",
                          capsize=4, label=once("seed min–max"))
        axes.scatter(values, [y] * len(values), s=14, color="black", zorder=3, label=once("one seed"))
        axes.text(max(values), y, f"  {mean:.1f}", va="center", fontsize=8)
    axes.set_yticks(range(len(configs)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(f"best-epoch {METRIC_NAMES.get(metric, metric)} (%)")
    axes.set_xlim(0, max(5.0, axes.get_xlim()[1] * 1.1))
    axes.set_title(f"Best {METRIC_NAMES.get(metric, metric)} per configuration\n(bar: mean over seeds, "
                   "whiskers: min–max, dots: seeds)")
    axes.grid(axis="x", alpha=0.3)
    handles, _ = axes.get_legend_handles_labels()
    if handles:
        axes.legend(loc="lower right", fontsize=8)
    return save_figure(figure, path)


def _curve(runs: Sequence[Any], key: str, scale: float) -> tuple[np.ndarray, ...] | None:
    """Epoch (1-based), mean, min and max over runs of history `key`."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for index, entry in enumerate(run.history):
            value = entry.get(key)
            if isinstance(value, int | float) and np.isfinite(value):
                recorded = entry.get("epoch")
                epoch = int(recorded if isinstance(recorded, int | float) else index) + 1
                by_epoch.setdefault(epoch, []).append(scale * float(value))
    if not by_epoch:
        return None
    epochs = np.array(sorted(by_epoch))
    values = [by_epoch[e] for e in epochs]
    return (epochs, np.array([np.mean(v) for v in values]), np.array([min(v) for v in values]),
            np.array([max(v) for v in values]))


def curve_runs(config: Configuration) -> list[Any]:
    """The jobs whose history a curve shows: completed ones and, so far, running ones."""
    return [r for r in config.runs if r.status in (COMPLETED, RUNNING) and r.history]


def training_curves(configs: Sequence[Configuration], path: str | Path, total: int | None = None,
                    title: str | None = None) -> Path:
    """Loss, pixel accuracy and mIoU against epoch: train dashed, val solid, one colour per configuration,
    the line the mean over seeds and the band their min–max."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    panels = (("loss", "loss (training objective)", 1.0), ("acc", "pixel accuracy (%)", 100.0),
              ("miou", "mIoU (%)", 100.0))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colours = _colours(len(configs))
    for config, colour in zip(configs, colours, strict=True):
        runs = curve_runs(config)
        for ax, (name, _, scale) in zip(axes, panels, strict=True):
            for split, style in (("train", "--"), ("val", "-")):
                curve = _curve(runs, f"{split}/{name}", scale)
                if curve is None:
                    continue
                epochs, mean, low, high = curve
                ax.plot(epochs, mean, style, color=colour, marker="o" if len(epochs) < 3 else None, markersize=3)
                if len(runs) > 1:
                    ax.fill_between(epochs, low, high, color=colour, alpha=0.15, linewidth=0)
    last_epoch = max((len(r.history) for c in configs for r in curve_runs(c)), default=1)
    for ax, (_, label, _) in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if last_epoch == 1:
            ax.set_xlim(0.5, 1.5)
    axes[0].set_title("loss")
    axes[1].set_title("pixel accuracy")
    axes[2].set_title("mIoU")
    shown = f" (best {len(configs)} of {total} configurations)" if total and total > len(configs) else ""
    several = any(len(curve_runs(c)) > 1 for c in configs)
    figure.suptitle((title or "Training curves per configuration") + shown
                    + ("\nline: mean over seeds, band: seed min–max; " if several else "\n")
                    + "dashed: train, solid: val")
    handles = [Line2D([], [], color=c, lw=2, label=config.label) for config, c in zip(configs, colours, strict=True)]
    handles += [Line2D([], [], color="black", ls="--", label="train"), Line2D([], [], color="black", label="val")]
    figure.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8,
                  bbox_to_anchor=(0.5, -0.02 - 0.035 * (len(handles) // 4)))
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(figure, path)


def per_class_iou(configs: Sequence[Configuration], class_names: Sequence[str], path: str | Path) -> Path:
    """Heat map of best-epoch val IoU (%) per configuration and class, mean over seeds; blank where a class was
    absent (from ground truth and prediction) in every seed."""
    plt = _pyplot()
    values = np.full((len(configs), len(class_names)), np.nan)
    for i, config in enumerate(configs):
        for j, name in enumerate(class_names):
            scores = config.best_values(f"val/iou/{name}")
            if scores:
                values[i, j] = 100 * float(np.mean(scores))
    labels = [c.label for c in configs]
    tall = len(class_names) > MAX_CLASS_COLUMNS  # many classes (ADE20K's 150): one row each, read top to bottom
    if tall:
        values = values.T
        figure, axes = plt.subplots(figsize=(3.5 + 0.6 * len(configs), 1.8 + 0.2 * len(class_names)))
    else:
        figure, axes = plt.subplots(figsize=(2.5 + 0.5 * len(class_names), 1.8 + 0.42 * len(configs)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto",
                        interpolation="nearest")
    if len(configs) <= 25:
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6 if tall else 7,
                          color="white" if value < 55 else "black")
    rows, columns = (class_names, labels) if tall else (labels, class_names)
    axes.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(len(rows)), rows, fontsize=6 if tall else 8)
    axes.set_xlabel("configuration" if tall else "class")
    axes.set_ylabel("class" if tall else "configuration")
    axes.set_title("Val IoU per class at the best epoch (%, mean over seeds; blank: class absent)")
    figure.colorbar(image, ax=axes, label="IoU (%)", fraction=0.03, pad=0.02)
    return save_figure(figure, path)


def prediction_examples(images: Any, masks: Any, preds: Any, class_names: Sequence[str], path: str | Path,
                        title: str, ids: Sequence[str] = (), palette: Any = None) -> Path:
    """image | ground truth | prediction, one row per image (`segx.inference.visualize.prediction_grid`), with a legend
    of the classes that appear; `palette` uint8 [256, 3], VOC's by default."""
    import torch

    from segx.data.voc_classes import VOC_PALETTE
    from segx.inference.visualize import prediction_grid

    plt = _pyplot()
    from matplotlib.patches import Patch

    palette = VOC_PALETTE if palette is None else palette
    grid = prediction_grid(images.float() / 255, masks, preds, palette).permute(1, 2, 0).numpy()
    size, pad = int(images.shape[-1]), 2
    rows = int(images.shape[0])
    figure, axes = plt.subplots(figsize=(7.5, 1.0 + 7.5 * grid.shape[0] / grid.shape[1]))
    axes.imshow(grid, interpolation="nearest")
    centres = [pad + i * (size + pad) + size / 2 for i in range(3)]
    axes.set_xticks(centres, ["image", "ground truth", "prediction"])
    axes.xaxis.tick_top()
    axes.set_yticks([pad + i * (size + pad) + size / 2 for i in range(rows)],
                    list(ids)[:rows] if ids else [str(i + 1) for i in range(rows)], fontsize=8)
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    present = sorted({int(v) for v in torch.cat([masks.flatten(), preds.flatten()]).unique().tolist()})
    handles = [Patch(color=palette[c] / 255, label=class_names[c] if c < len(class_names) else "void (ignored)")
               for c in present if c < len(class_names) or c == 255]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="classes")
    axes.set_title(title, fontsize=10, pad=24)
    return save_figure(figure, path)


def score_vs_predict_time(configs: Sequence[Configuration], metric: str, path: str | Path) -> Path:
    """The size study's trade-off: mean best-epoch mIoU against mean time to predict the val split, point area by
    parameter count, vertical whiskers the seeds' min–max."""
    plt = _pyplot()
    points = []
    for config in configs:
        seconds = [v for v in (r.value("predict_val_seconds") for r in config.completed) if v is not None]
        scores = [100 * v for v in config.best_values(metric)]
        if seconds and scores:
            params = next((r.parameters for r in config.runs if r.parameters), None)
            points.append((config.label, float(np.mean(seconds)), scores, params))
    images = next((r.record.get("predict_images") for c in configs for r in c.completed
                   if r.record.get("predict_images")), None)
    largest = max((p[3] or 0 for p in points), default=0) or 1
    figure, axes = plt.subplots(figsize=(8, 5.5))
    colours = _colours(len(points))
    for (label, seconds, scores, params), colour in zip(points, colours, strict=True):
        mean = float(np.mean(scores))
        area = 40 + 460 * (params or 0) / largest
        axes.scatter([seconds], [mean], s=area, color=colour, alpha=0.7, edgecolors="black", label=label)
        if len(scores) > 1:
            axes.errorbar(seconds, mean, yerr=[[mean - min(scores)], [max(scores) - mean]], fmt="none",
                          ecolor=colour, capsize=4)
        note = f"  {label}" + (f"\n  {params / 1e6:.2f}M parameters" if params else "")
        axes.annotate(note, (seconds, mean), fontsize=8, va="center")
    axes.set_xlabel(f"time to predict the val split{f' ({images} images)' if images else ''} (s, mean of passes)")
    axes.set_ylabel(f"best-epoch {METRIC_NAMES.get(metric, metric)} (%)")
    axes.set_title(f"{METRIC_NAMES.get(metric, metric)} against prediction time\n(point area ∝ parameters; whiskers: "
                   "seed min–max)")
    axes.grid(alpha=0.3)
    axes.margins(x=0.25, y=0.2)
    axes.legend(fontsize=8, loc="best", markerscale=0.5)
    return save_figure(figure, path)


def normalize_rows(confmat: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Each row (a ground-truth class) divided by its sum; NaN for a class with no ground-truth pixel."""
    counts = np.asarray(confmat, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    return np.where(totals > 0, counts / np.where(totals > 0, totals, 1), np.nan)


def confusion_matrix_figure(confmat: Sequence[Sequence[float]] | np.ndarray, class_names: Sequence[str],
                            path: str | Path, title: str | None = None) -> Path:
    """Confusion matrix (rows: ground truth, columns: prediction) with each row normalised to sum 1, so a cell is
    the fraction of a true class's pixels predicted as each class; rows of absent classes are grey."""
    plt = _pyplot()
    fractions = normalize_rows(confmat)
    names = list(class_names) if len(class_names) == len(fractions) else [f"class {i}" for i in range(len(fractions))]
    side = 2.5 + 0.38 * len(names)
    figure, axes = plt.subplots(figsize=(side + 1.2, side))
    cmap = plt.get_cmap("Blues").with_extremes(bad="0.82")  # grey, told apart from the near-white of 0
    image = axes.imshow(np.ma.masked_invalid(fractions), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for (i, j), value in np.ndenumerate(fractions):
        if np.isfinite(value) and value >= 0.01:
            axes.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                      color="white" if value > 0.6 else "black")
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class (ground truth)")
    axes.set_title(title or "Confusion matrix, rows normalised\n(cell: % of the true class's pixels; grey row: "
                            "class absent from the ground truth)")
    figure.colorbar(image, ax=axes, label="fraction of the true class's pixels", fraction=0.04, pad=0.02)
    return save_figure(figure, path)


def search_curves(trials: Sequence[Any], monitor: str, rungs: Sequence[float], path: str | Path,
                  title: str = "") -> Path:
    """Each search trial's validation score over epochs: trials that ran to the end in colour, stopped ones grey and
    ending early with a cross, ASHA's rungs as dotted verticals."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(9, 5))
    finished = [t for t in trials if t.status == COMPLETED]
    colours = dict(zip((id(t) for t in finished), _colours(len(finished)), strict=True))
    for trial in trials:
        curve = _curve([trial], monitor, 100.0)
        if curve is None:
            continue
        epochs, values = curve[0], curve[1]
        stopped = id(trial) not in colours
        colour = "0.6" if stopped else colours[id(trial)]
        axes.plot(epochs, values, "--" if stopped else "-", color=colour, lw=1.2 if stopped else 1.8,
                  marker="o" if len(epochs) < 3 else None, markersize=3)
        if stopped:
            axes.scatter(epochs[-1:], values[-1:], marker="x", color="0.3", zorder=3)
        else:
            axes.annotate(f" {trial.run_dir.name}", (epochs[-1], values[-1]), fontsize=7, va="center", color=colour)
    for rung in rungs:
        axes.axvline(rung, color="0.4", ls=":", lw=1)
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"{METRIC_NAMES.get(monitor, monitor)} (%)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.set_title(title or f"{METRIC_NAMES.get(monitor, monitor)} of every trial per epoch")
    handles = [Line2D([], [], color="tab:blue", label="trained to the end (job number at its end)"),
               Line2D([], [], color="0.6", ls="--", marker="x", markeredgecolor="0.3", label="stopped early")]
    if rungs:
        handles.append(Line2D([], [], color="0.4", ls=":", label="rung (trials compared)"))
    axes.legend(handles=handles, fontsize=8, loc="lower right")
    return save_figure(figure, path)


def score_against_parameters(panels: Sequence[dict[str, Any]], monitor: str, colour_by: str | None,
                             path: str | Path) -> Path:
    """One panel per parameter: each trial's best score against its value (filled: trained to the end; hollow:
    stopped early), coloured by `colour_by`'s value. A panel is {"key", "log", "points"} (see report.search)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    groups = sorted({str(p["run"].settings.get(colour_by, "")) for panel in panels for p in panel["points"]}) \
        if colour_by else [""]
    colours = dict(zip(groups, _colours(len(groups)), strict=True))
    for ax, panel in zip(axes[0], panels, strict=True):
        for group in groups:
            for completed in (True, False):
                points = [p for p in panel["points"] if p["completed"] == completed
                          and (not colour_by or str(p["run"].settings.get(colour_by, "")) == group)]
                if not points:
                    continue
                colour = colours[group]
                label = (f"{colour_by}={group}" if colour_by else "trial") + ("" if completed else " (stopped)")
                ax.scatter([p["value"] for p in points], [100 * p["score"] for p in points], s=36, label=label,
                           facecolors=colour if completed else "none", edgecolors=colour, linewidths=1.4)
        if panel["log"]:
            ax.set_xscale("log")
        ax.set_xlabel(panel["key"] + (" (log scale)" if panel["log"] else ""))
        ax.set_ylabel(f"best {METRIC_NAMES.get(monitor, monitor)} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    figure.suptitle(f"Best {METRIC_NAMES.get(monitor, monitor)} of each trial against its parameters\n(filled: "
                    "trained to the end; hollow: stopped early, its best so far)")
    figure.tight_layout()
    return save_figure(figure, path)


def what_if(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Two panels per replayed scheduler: the share of the grid's epochs it trains (median, bar to the 90th
    percentile), and how often its pick scores within noise of the grid's best (P(regret ≤ noise) with its 95%
    Wilson interval; a diamond: how often it picks the grid's own winner)."""
    plt = _pyplot()
    figure, (cost, found) = plt.subplots(1, 2, figsize=(9, 0.7 * len(rows) + 1.6), sharey=True)
    names = [str(r["scheduler"]) for r in rows]
    y = np.arange(len(rows))
    medians = np.array([100 * r["fraction_median"] for r in rows])
    cost.barh(y, medians, color="tab:blue", alpha=0.8)
    cost.errorbar(medians, y, xerr=[np.zeros(len(rows)), np.array([100 * r["fraction_p90"] for r in rows]) - medians],
                  fmt="none", ecolor="0.2", capsize=4)
    cost.axvline(100, color="0.4", ls=":", lw=1)
    cost.set_xlim(0, 105)
    cost.set_xlabel("epochs trained (% of the grid's)")
    probabilities = np.array([100 * r["p_regret_le_noise"] for r in rows])
    found.barh(y, probabilities, color="tab:green", alpha=0.8)
    found.errorbar(probabilities, y, xerr=[probabilities - np.array([100 * r["p_low"] for r in rows]),
                                           np.array([100 * r["p_high"] for r in rows]) - probabilities],
                   fmt="none", ecolor="0.2", capsize=4)
    found.scatter([100 * r["p_same_winner"] for r in rows], y, marker="D", color="k", zorder=3,
                  label="the grid's own winner picked")
    found.set_xlim(0, 105)
    found.set_xlabel("P(regret ≤ noise) (%)")
    found.legend(fontsize=8, loc="lower left")
    cost.set_yticks(y, names)
    for axes in (cost, found):
        axes.grid(axis="x", alpha=0.3)
    figure.suptitle("What if a scheduler had run this grid")
    return save_figure(figure, path)
