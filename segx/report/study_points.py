"""The study's points: what its "3 independent runs" were, recomputed from runs trained as chained trials.

The study built each model and its optimizer once and called `fit` three times for 25 epochs: its trials are the
25-epoch windows of one 75-epoch run (the optimizer's state and decay carrying on), and each window reported the
maximum over its epochs of val accuracy and of its Keras MeanIoU, each metric on its own. For every run whose
metrics.json has `chained_trials` this module takes those window maxima (and segx's val mIoU over the same window),
puts them beside the best val mIoU of ordinary runs (independent seeds) of the same configuration, and writes them
as `study_points.csv`, `plots/study_points.png` and a section of report.md.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segx.core.files import write_text_atomic
from segx.report.figures import PLOT_DIR, Figure, _draw
from segx.report.runs import Run, _number, varying_keys
from segx.report.tables import STUDY_FOOTNOTE

CSV_FILE = "study_points.csv"
PLOT_FILE = "study_points.png"
SECTION = "The study's points (chained trials)"
# each window's maxima: csv name → history key
WINDOW_METRICS = {"val_acc": "val/acc", "val_study_meaniou": "val/study_meaniou", "val_miou": "val/miou"}
# Keras MeanIoU on one-hot labels against a softmax that never reaches 1: a 2-class confusion matrix, (20/21) / 2
UNSATURATED_STUDY_MEANIOU = 10 / 21
CSV_COLUMNS = ["configuration", "kind", "job", "seed", "trial", "epochs", "epochs_recorded", "complete",
               *(f"{name}_{part}" for name in WINDOW_METRICS for part in ("max", "epoch"))]


@dataclass
class Window:
    """One chained trial: epochs [first, first + length) of a chained run (0-based) and each metric's maximum
    there, as (value, 0-based epoch), None where no epoch of the window recorded it."""

    label: str
    run: Run
    trial: int
    first: int
    length: int
    recorded: int
    maxima: dict[str, tuple[float, int] | None]

    @property
    def complete(self) -> bool:
        return self.recorded == self.length

    @property
    def epochs(self) -> str:
        """The window's epochs, counted from 1: `26-50`."""
        return f"{self.first + 1}-{self.first + self.length}"


@dataclass
class Seed:
    """An ordinary (non-chained) completed run: its best epoch's val mIoU, picked by its monitor."""

    label: str
    run: Run
    miou: float | None
    epoch: int | None


@dataclass
class StudyPoints:
    """Every chained run's windows and the independent seeds beside them, under configuration labels that match
    a chained configuration with the ordinary one it reproduces."""

    windows: list[Window]
    seeds: list[Seed]  # the ordinary runs matched to a chained configuration
    labels: list[str] = field(default_factory=list)  # the chained configurations', in order of first appearance
    unmatched: int = 0  # completed ordinary runs that match no chained configuration (not shown here)


def match_keys(runs: Sequence[Run], over: str = "seed") -> list[str]:
    """The settings that name a configuration across chained and ordinary runs: `model`, then the keys that vary
    among the chained runs or among the ordinary ones; keys that only tell the two kinds apart (`chained_trials`,
    or a `trainer.max_epochs` of 75 against 25) are left out."""
    chained = [r for r in runs if r.chained_trials]
    ordinary = [r for r in runs if not r.chained_trials]
    keys = ["model"] if any("model" in r.settings for r in runs) else []
    for group in (chained, ordinary):
        keys += [k for k in varying_keys(group, over) if k not in keys]
    return [k for k in keys if "chained" not in k]


def _normal(value: str) -> str:
    """A number in one spelling (`1e-4` and `0.0001` → `0.0001`), anything else as it is."""
    try:
        return f"{float(value):g}"
    except ValueError:
        return value


def configuration(run: Run, keys: Sequence[str]) -> dict[str, str]:
    """`keys`' values for `run` (its override, else Hydra's choice, else its config's value), numbers in one
    spelling; keys no source knows are left out."""
    values = {key: run.setting(key) for key in keys}
    return {key: _normal(value) for key, value in values.items() if value is not None}


def _label(values: dict[str, str], fallback: str) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or fallback


def _matching(values: dict[str, str], chained: list[tuple[dict[str, str], str]]) -> str | None:
    """The label of the first chained configuration whose every known value `values` shares, None if none."""
    return next((label for known, label in chained if all(values.get(k) == v for k, v in known.items())), None)


def _epochs(run: Run) -> dict[int, dict[str, Any]]:
    """History entries by 0-based epoch (a repeated epoch keeps its last entry)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for index, entry in enumerate(run.history):
        epoch = _number(entry.get("epoch"))
        by_epoch[int(epoch) if epoch is not None else index] = entry
    return by_epoch


def _maximum(entries: dict[int, dict[str, Any]], metric: str) -> tuple[float, int] | None:
    """The highest `metric` over `entries` and its epoch (the first, on a tie); None when none has it."""
    values = [(value, epoch) for epoch, entry in sorted(entries.items())
              if (value := _number(entry.get(metric))) is not None]
    return max(values, key=lambda pair: pair[0]) if values else None


def windows(run: Run, label: str) -> list[Window]:
    """The study's trials of one chained run: every window, those the run did not finish included."""
    chained = run.chained_trials
    if chained is None:
        return []
    trials, length = chained
    by_epoch = _epochs(run)
    result = []
    for trial in range(1, trials + 1):
        first = (trial - 1) * length
        inside = {e: entry for e, entry in by_epoch.items() if first <= e < first + length}
        maxima = {name: _maximum(inside, metric) for name, metric in WINDOW_METRICS.items()}
        result.append(Window(label, run, trial, first, length, len(inside), maxima))
    return result


def _seed(run: Run, label: str) -> Seed:
    epoch = _number(run.best.get("epoch"))
    return Seed(label, run, run.best_value("val/miou"), int(epoch) if epoch is not None else None)


def collect(runs: Sequence[Run], over: str = "seed") -> StudyPoints | None:
    """The study's points of `runs`, or None when none was trained as chained trials. An ordinary run joins the
    first chained configuration whose every known `match_keys` value it shares (`model=unet` with
    `model=unet optimizer.lr=1e-4` when the chained runs' lr is unknown); the others are only counted."""
    if not any(r.chained_trials for r in runs):
        return None
    keys = match_keys(runs, over)
    fallback = runs[0].run_dir.name if len(runs) == 1 else "(all runs)"
    chained = [(values, _label(values, fallback), run) for run in runs if run.chained_trials
               for values in [configuration(run, keys)]]
    named = [(values, label) for values, label, _ in chained]
    found = [window for _, label, run in chained for window in windows(run, label)]
    ordinary = [r for r in runs if not r.chained_trials and r.completed]
    matched = [(_matching(configuration(r, keys), named), r) for r in ordinary]
    seeds = [_seed(run, label) for label, run in matched if label is not None]
    labels = list(dict.fromkeys(label for _, label in named))
    return StudyPoints(found, seeds, labels, unmatched=len(ordinary) - len(seeds))


def job_names(roots: Sequence[Path]) -> Callable[[Run], str]:
    """A run's name in the report: its path under the root it was found in, with that root's name in front when
    the report has several roots (`chained/0`, `fair/0`); a root that is the run itself gives the run's name."""
    def name(run: Run) -> str:
        for root in roots:
            base = root.resolve().parent if len(roots) > 1 else root.resolve()
            try:
                relative = run.run_dir.resolve().relative_to(base).as_posix()
            except ValueError:
                continue
            return run.run_dir.name if relative == "." else relative
        return run.run_dir.name
    return name


# -- study_points.csv -------------------------------------------------------------------------------------------

def _csv_row(point: Window | Seed, job: str) -> dict[str, Any]:
    if isinstance(point, Window):
        row: dict[str, Any] = {"kind": "chained", "trial": point.trial, "epochs": point.epochs,
                               "epochs_recorded": point.recorded, "complete": point.complete}
        for name, best in point.maxima.items():
            row[f"{name}_max"], row[f"{name}_epoch"] = (best[0], best[1] + 1) if best else (None, None)
    else:
        row = {"kind": "independent", "epochs_recorded": len(point.run.history) or None, "complete": True,
               "val_miou_max": point.miou, "val_miou_epoch": None if point.epoch is None else point.epoch + 1}
    return {"configuration": point.label, "job": job, "seed": point.run.settings.get("seed"), **row}


def to_csv(points: StudyPoints, job: Callable[[Run], str]) -> str:
    """study_points.csv: one row per chained run and window, then one per independent seed; fractions, epochs
    from 1, a missing value an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for point in [*points.windows, *points.seeds]:
        row = _csv_row(point, job(point.run))
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in CSV_COLUMNS})
    return buffer.getvalue()


# -- plots/study_points.png -------------------------------------------------------------------------------------

SERIES = (("val_study_meaniou", "study MeanIoU* (window max)", "o", "tab:red", -0.24),
          ("val_acc", "val acc (window max)", "s", "tab:blue", -0.12),
          ("val_miou", "val mIoU (window max)", "^", "tab:green", 0.0))


def _scatter_windows(axes: Any, points: StudyPoints) -> list[Any]:
    """The chained windows, one marker per metric, trials left to right within a metric; hollow if incomplete."""
    from matplotlib.lines import Line2D

    handles = []
    for name, text, marker, colour, dx in SERIES:
        drawn = False
        for window in points.windows:
            best = window.maxima[name]
            if best is None:
                continue
            x = points.labels.index(window.label) + dx + 0.025 * (window.trial - 2)
            axes.scatter([x], [100 * best[0]], marker=marker, s=38, edgecolors=colour, linewidths=1.3,
                         facecolors=colour if window.complete else "none", zorder=3)
            drawn = True
        if drawn:
            handles.append(Line2D([], [], ls="", marker=marker, color=colour, label=text))
    return handles


def _scatter_seeds(axes: Any, points: StudyPoints) -> list[Any]:
    from matplotlib.lines import Line2D

    seeds = [s for s in points.seeds if s.miou is not None]
    if not seeds:
        return []
    axes.scatter([points.labels.index(s.label) + 0.2 for s in seeds], [100 * s.miou for s in seeds], marker="D",
                 s=34, color="black", zorder=3)
    return [Line2D([], [], ls="", marker="D", color="black", label="independent seed: best-epoch val mIoU")]


def figure(points: StudyPoints, path: str | Path) -> Path:
    """The study's scatter of its trials' points per configuration, with segx's independent seeds beside them."""
    from matplotlib.lines import Line2D

    from segx.report.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(figsize=(max(7.0, 3.0 + 1.8 * len(points.labels)), 5.5))
    handles = _scatter_windows(axes, points) + _scatter_seeds(axes, points)
    if any(w.maxima["val_study_meaniou"] for w in points.windows):
        axes.axhline(100 * UNSATURATED_STUDY_MEANIOU, color="0.5", ls=":", lw=1)
        handles.append(Line2D([], [], color="0.5", ls=":", label="study MeanIoU* of any unsaturated softmax "
                              f"({100 * UNSATURATED_STUDY_MEANIOU:.2f})"))
    if any(not w.complete for w in points.windows):
        handles.append(Line2D([], [], ls="", marker="o", color="0.3", markerfacecolor="none",
                              label="hollow: window not finished"))
    axes.set_xticks(range(len(points.labels)), points.labels, rotation=30, ha="right", fontsize=8)
    axes.set_xlim(-0.6, len(points.labels) - 0.4)
    axes.set_ylabel("Percentage")
    axes.grid(axis="y", alpha=0.3)
    axes.set_title("The study's points: each metric's max over each window of a chained run (trials left to right)"
                   "\n* the study's Keras metric, not a segmentation score", fontsize=10)
    axes.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path)


# -- report.md --------------------------------------------------------------------------------------------------

def _pct(best: tuple[float, int] | None) -> str:
    return "—" if best is None else f"{100 * best[0]:.2f} ({best[1] + 1})"


def _window_lines(points: StudyPoints, job: Callable[[Run], str]) -> list[str]:
    lines = ["| configuration | job | trial | epochs | max val acc % (epoch) | max study MeanIoU* % (epoch) "
             "| max val mIoU % (epoch) |", "|---|---|---:|---|---:|---:|---:|"]
    for w in points.windows:
        epochs = w.epochs if w.complete else f"{w.epochs} **incomplete** ({w.recorded} of {w.length} epochs recorded)"
        cells = [w.label, job(w.run), str(w.trial), epochs, *(_pct(w.maxima[name]) for name in WINDOW_METRICS)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return [*lines, "", STUDY_FOOTNOTE, ""]


def _seed_lines(points: StudyPoints) -> list[str]:
    """Per configuration: the independent seeds' best val mIoU beside the chained windows' max val mIoU."""
    several = points.unmatched > 1
    unmatched = (f"{points.unmatched} completed ordinary run{'s' if several else ''} of other configurations "
                 f"({'are' if several else 'is'} in the ranked table only) {'are' if several else 'is'} not shown "
                 "here." if points.unmatched else "")
    if not points.seeds:
        return [unmatched, ""] if unmatched else []
    lines = ["### Independent seeds beside them", "",
             "Ordinary runs of the same configurations (each seed a fresh model and optimizer, segx's comparison): "
             "each seed's best-epoch val mIoU (the epoch its monitor picked), beside the chained windows' max val "
             f"mIoU.{' ' + unmatched if unmatched else ''}", "",
             "| configuration | seeds | best val mIoU % per seed | mean % | chained windows' max val mIoU % |",
             "|---|---:|---:|---:|---:|"]
    for label in points.labels:
        seeds = [s.miou for s in points.seeds if s.label == label and s.miou is not None]
        chained = [w.maxima["val_miou"][0] for w in points.windows if w.label == label and w.maxima["val_miou"]]
        lines.append("| " + " | ".join([label.replace("|", "\\|"), str(len(seeds)), _list(seeds),
                                        _list([sum(seeds) / len(seeds)] if seeds else []), _list(chained)]) + " |")
    return [*lines, ""]


def _list(values: Sequence[float]) -> str:
    return ", ".join(f"{100 * v:.2f}" for v in values) or "—"


def _figure_lines(drawn: Figure | None, out_dir: Path) -> list[str]:
    if drawn is None:
        return []
    if drawn.path is None:
        return [f"Not drawn: {drawn.skipped}.", ""]
    return [f"![{drawn.title}]({drawn.path.relative_to(out_dir).as_posix()})", "", drawn.caption, ""]


def section(points: StudyPoints, job: Callable[[Run], str], drawn: Figure | None, out_dir: Path) -> list[str]:
    """report.md's section: what the windows are, their maxima, the independent seeds, the figure and the csv."""
    runs = {id(w.run): w.run for w in points.windows}.values()
    kinds = dict.fromkeys(r.chained_trials for r in runs if r.chained_trials)
    shapes = " or ".join(f"{trials} trials of {length} epoch{'s' if length != 1 else ''}" for trials, length in kinds)
    lines = [f"## {SECTION}", "",
             f"{len(runs)} run{' was' if len(runs) == 1 else 's were'} trained here as the study's chained trials "
             f"({shapes}): one model and one optimizer trained once for all the trials' epochs (the optimizer's "
             "state and decay carrying on), each window of epochs one of the study's \"independent runs\". As the "
             "study did, "
             "each window's maximum of each metric is taken on its own, so a trial's max val acc and max study "
             "MeanIoU may come from different epochs (in brackets, counted from 1); max val mIoU is segx's score "
             "over the same window. A window the run did not finish is marked incomplete: its maxima are over the "
             "epochs recorded.", "", *_window_lines(points, job), *_seed_lines(points), *_figure_lines(drawn, out_dir),
             f"`{CSV_FILE}` holds these points as fractions: one row per chained run and window (`kind` chained; "
             "`trial`, `epochs` counted from 1, `epochs_recorded`, `complete`, and for val_acc, val_study_meaniou "
             "and val_miou the window's `_max` and the epoch it came from, `_epoch`), then one row per independent "
             "seed (`kind` independent; its best epoch's val mIoU in `val_miou_max`, that epoch in "
             "`val_miou_epoch`).", ""]
    return lines


# -- writing ----------------------------------------------------------------------------------------------------

def write(runs: Sequence[Run], out_dir: Path, roots: Sequence[Path], over: str = "seed"
          ) -> tuple[list[str], Figure | None]:
    """Write study_points.csv and plots/study_points.png for the chained runs among `runs`, and return report.md's
    section and the figure; none of them (and an earlier report's files removed) when there is no chained run."""
    points = collect(runs, over)
    if points is None:
        (out_dir / CSV_FILE).unlink(missing_ok=True)
        (out_dir / PLOT_DIR / PLOT_FILE).unlink(missing_ok=True)
        return [], None
    job = job_names(roots)
    write_text_atomic(out_dir / CSV_FILE, to_csv(points, job))
    caption = ("Each chained run's window maxima per configuration, one marker per metric (the study's scatter)"
               + ("; black diamonds: the independent seeds' best-epoch val mIoU" if points.seeds else "")
               + ("; dotted line: the study MeanIoU of any prediction whose softmax never saturates"
                  if any(w.maxima["val_study_meaniou"] for w in points.windows) else "") + ".")
    drawn = _draw(Figure(PLOT_FILE, "The study's points", caption), out_dir, lambda p: figure(points, p))
    return section(points, job, drawn, out_dir), drawn
