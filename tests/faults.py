"""Faults the tests inject into a run through its config (`+callbacks.<name>={_target_: tests.faults....}`)."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class HangOnRank(pl.Callback):
    """Rank `rank` stops answering at the end of the first training epoch (it sleeps before the epoch's collectives),
    as a rank that hung or took another path through the hooks would."""

    def __init__(self, rank: int = 1, seconds: float = 600) -> None:
        self.rank, self.seconds = int(rank), float(seconds)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == self.rank:
            time.sleep(self.seconds)
