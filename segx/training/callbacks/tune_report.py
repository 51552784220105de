"""Hands each epoch's score, as RunSummary recorded it, to Ray Tune, whose scheduler (ASHA, Hyperband) decides
whether the trial goes on; the tune sweeper adds it to every trial."""

from __future__ import annotations

import math

import pytorch_lightning as pl

from segx.runs.status import StopRequested


def report_to_tune(epoch: int, score: float) -> None:
    """`ray.tune.report` of one epoch. Tune's way of ending a trial (its scheduler dropped it, or the search was
    interrupted) becomes a StopRequested the search's driver records."""
    from ray import tune

    try:
        tune.report({"epoch": epoch, "score": score})
    except SystemExit as stop:
        raise StopRequested(epoch, "Ray Tune", recorded_elsewhere=True) from stop


class TuneReport(pl.Callback):
    """Reports `{"epoch": n, "score": <monitor>}` for every recorded epoch but the run's last, which the trial
    reports once the run has finished (a stop at that report must not cut the run's own ending short).

    A resumed run (a trial paused at a rung, or a search resumed after Ctrl-C) first reports its last recorded
    epoch again: the scheduler may not have seen it before the trial stopped, and a repeat changes nothing."""

    def __init__(self, monitor: str = "val/miou") -> None:
        self.monitor = monitor

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from segx.training.callbacks.run_summary import RunSummary

        summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)  # type: ignore[attr-defined]
        if summary is not None and summary.history and trainer.is_global_zero:
            self.epoch_recorded(summary.history[-1], trainer)

    def epoch_recorded(self, entry: dict[str, float], trainer: pl.Trainer) -> None:
        epoch = int(entry["epoch"]) + 1
        score = entry.get(self.monitor)
        # An epoch that ran no validation has no score: a report without it would end the whole experiment.
        if score is None or not math.isfinite(score) or entry.get("partial") or \
                (trainer.max_epochs and epoch >= trainer.max_epochs):
            return
        report_to_tune(epoch, float(score))
