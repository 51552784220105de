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
    reports once the run has finished (a stop at that report must not cut the run's own ending short)."""

    def __init__(self, monitor: str = "val/miou") -> None:
        self.monitor = monitor

    def epoch_recorded(self, entry: dict[str, float], trainer: pl.Trainer) -> None:
        epoch = int(entry["epoch"]) + 1
        score = entry.get(self.monitor)
        # An epoch that ran no validation has no score: a report without it would end the whole experiment.
        if score is None or not math.isfinite(score) or (trainer.max_epochs and epoch >= trainer.max_epochs):
            return
        report_to_tune(epoch, float(score))
