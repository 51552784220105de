"""Which figures a report gets, drawn into plots/: a figure that cannot be drawn (no checkpoint, data not on this
machine, no confusion matrix recorded) is skipped with its reason, never failing the report."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segx.core.errors import find_user_error
from segx.report import plots
from segx.report.runs import Configuration, Run

if TYPE_CHECKING:
    from segx.report.search import Search

log = logging.getLogger(__name__)

PLOT_DIR = "plots"
MAX_CURVES = 10  # configurations drawn in the curves figure (the best ones): more is unreadable
PLOT_FILES = ("scores.png", "curves.png", "per_class_iou.png", "predictions.png", "score_vs_predict_time.png",
              "confusion_matrix.png", "search_curves.png", "score_vs_parameters.png")


class Skip(Exception):
    """A figure this report cannot draw; the message says why, in report.md."""


@dataclass
class Figure:
    """One figure of the report: drawn (`path`) or not, and why not (`skipped`)."""

    name: str
    title: str
    caption: str
    path: Path | None = None
    skipped: str | None = None


def why(error: BaseException) -> str:
    """The first line of a user error's message, else the exception's type and message."""
    user_error = find_user_error(error)
    if isinstance(error, Skip) or user_error is not None:
        text = str(user_error or error)
    else:
        text = f"{type(error).__name__}: {error}"
    return (text.strip().splitlines() or [type(error).__name__])[0].rstrip(".")


def _draw(figure: Figure, out_dir: Path, draw: Callable[[Path], Any]) -> Figure:
    path = out_dir / PLOT_DIR / figure.name
    try:
        draw(path)
    except Exception as error:  # a figure that cannot be drawn must not cost the tables
        figure.skipped = why(error)
        log.warning("Plot %s not drawn: %s", figure.name, figure.skipped)
        return figure
    figure.path = path
    return figure


def _predictions(config: Configuration, images: int, single: bool) -> Callable[[Path], Any]:
    def draw(path: Path) -> Any:
        from segx.report.predictions import predict_examples

        run = config.best_run()
        if run is None:
            raise Skip("no completed run")
        examples = predict_examples(run.checkpoint, images)
        epoch = f"epoch {examples.epoch + 1}, " if examples.epoch is not None else ""
        score = run.best_value(config.monitor)
        score_text = "" if score is None else f" {100 * score:.1f}%"
        name = run.run_dir.name if single else config.label
        title = (f"{name}: best checkpoint ({epoch}{config.monitor}{score_text}) on the first {len(examples.ids)} "
                 f"val images\n{run.checkpoint}")
        return plots.prediction_examples(examples.images, examples.masks, examples.preds, examples.class_names,
                                         path, title, examples.ids, examples.palette)
    return draw


def _confusion(run: Run) -> Callable[[Path], Any]:
    def draw(path: Path) -> Any:
        confmat = run.record.get("best_confusion_matrix")
        if not confmat:
            raise Skip("metrics.json has no best_confusion_matrix (a run from an older version, or one "
                               "without a validation epoch yet)")
        epoch = run.best.get("epoch")
        when = f"best epoch ({int(epoch) + 1})" if isinstance(epoch, int | float) else "best epoch"
        title = (f"{run.run_dir.name}: val confusion matrix at the {when}, rows normalised\n(cell: % of the true "
                 "class's pixels; grey row: class absent from the ground truth)")
        return plots.confusion_matrix_figure(confmat, run.class_names, path, title=title)
    return draw


def _curves(configs: list[Configuration], single: bool) -> Callable[[Path], Any]:
    with_history = [c for c in configs if plots.curve_runs(c)]

    def draw(path: Path) -> Any:
        if not with_history:
            raise Skip("no run has a per-epoch history yet")
        title = f"Training curves of {configs[0].runs[0].run_dir.name}" if single else None
        return plots.training_curves(with_history[:MAX_CURVES], path, total=len(with_history), title=title)
    return draw


def _search_figures(search: Search, keys: list[str], metric: str) -> list[tuple[Figure, Callable[[Path], Any]]]:
    """A search's two figures: every trial's curve to where it stopped, and score against each numeric parameter."""
    from segx.report import search as searches

    name = plots.METRIC_NAMES.get(metric, metric)
    rungs = search.plan.rungs
    at = f" (rungs after epochs {', '.join(f'{r:g}' for r in rungs)})." if rungs else "."
    figures: list[tuple[Figure, Callable[[Path], Any]]] = [(
        Figure("search_curves.png", "Search: every trial's curve",
               f"Val {name} per epoch of each of the {len(search.trials)} search trials; stopped trials grey, "
               f"ending where the scheduler stopped them{at}"),
        lambda p: plots.search_curves(search.trials, metric, rungs, p))]
    numeric = searches.continuous_keys(search, keys)
    colour_by = searches.colour_key(search, keys)
    if not numeric:
        figures.append((Figure("score_vs_parameters.png", "Search: score against parameters", "",
                               skipped="no numeric parameter varies in this search"), lambda p: None))
        return figures
    panels = [{"key": key, "log": searches.log_scaled(search, key), "points": searches.trial_points(search, key)}
              for key in numeric]

    def draw(path: Path) -> Any:
        if not any(panel["points"] for panel in panels):
            raise Skip("no trial has a score yet")
        return plots.score_against_parameters(panels, metric, colour_by, path)

    figures.append((Figure("score_vs_parameters.png", "Search: score against parameters",
                           f"Each trial's best val {name} against {', '.join(f'`{k}`' for k in numeric)}"
                           + (f", coloured by `{colour_by}`" if colour_by else "") + "; hollow: stopped early."),
                    draw))
    return figures


def draw_figures(configs: list[Configuration], out_dir: Path, single: bool, images: int = 4,
                 search: Search | None = None, keys: list[str] | None = None) -> list[Figure]:
    """The figures for ranked `configs`: a sweep gets scores, curves, per-class IoU, predictions and (where timed)
    score against prediction time; a search also its trials' curves and score against parameters; a single run
    its curves, confusion matrix and predictions."""
    metric = plots.headline_metric(configs)
    name = plots.METRIC_NAMES.get(metric, metric)
    best = next((c for c in configs if c.best_run() is not None), None)
    drawn_curves = len([c for c in configs if plots.curve_runs(c)])
    figures: list[tuple[Figure, Callable[[Path], Any]]] = []
    if not single:
        figures.append((Figure("scores.png", f"Best {name} per configuration",
                               f"Bars: mean over seeds of each job's best-epoch {name}; whiskers: min–max; dots: "
                               "seeds."), lambda p: plots.score_bars(configs, metric, p)))
    figures.append((Figure("curves.png", "Training curves",
                           "Loss, pixel accuracy and mIoU per epoch, train dashed and val solid"
                           + ("." if single else "; mean over seeds with a min–max band.")
                           + (f" The best {MAX_CURVES} configurations only." if drawn_curves > MAX_CURVES else "")),
                    _curves(configs, single)))
    if single:
        figures.append((Figure("confusion_matrix.png", "Confusion matrix",
                               "Val confusion matrix of the best epoch, each true class's row normalised to 1."),
                        _confusion(configs[0].runs[0])))
    else:
        class_names = next((r.class_names for c in configs for r in c.completed), configs[0].runs[0].class_names)
        figures.append((Figure("per_class_iou.png", "IoU per class",
                               "Best-epoch val IoU per class (%), mean over seeds; blank where a class was absent."),
                        lambda p: plots.per_class_iou(configs, class_names, p)))
    title = "Predictions" if single else "Predictions of the best configuration"
    if best is None or images < 1:
        reason = "no completed run" if best is None else f"{images} images asked for"
        figures.append((Figure("predictions.png", title, "", skipped=reason), lambda p: None))
    else:
        whose = "the run's" if single else f"`{best.label}`'s (its best seed's)"
        figures.append((Figure("predictions.png", title, f"Image, ground truth and prediction of {whose} best "
                               f"checkpoint on the first {images} val images."), _predictions(best, images, single)))
    if any(r.value("predict_val_seconds") is not None for c in configs for r in c.completed):
        figures.append((Figure("score_vs_predict_time.png", f"{name} against prediction time",
                               "Mean time to predict the val split (model and data loaded) against mean best-epoch "
                               f"{name}; point area ∝ parameters."),
                        lambda p: plots.score_vs_predict_time(configs, metric, p)))
    if search is not None and not single:
        figures += _search_figures(search, keys or [], metric)
    done = [figure if figure.skipped else _draw(figure, out_dir, draw) for figure, draw in figures]
    written = {f.name for f in done if f.path is not None}
    for stale in PLOT_FILES:  # a figure not drawn this time must not linger from an earlier report
        if stale not in written:
            (out_dir / PLOT_DIR / stale).unlink(missing_ok=True)
    return done
