"""Faults the tests inject into a run through its config (`+callbacks.<name>={_target_: tests.faults....}`)."""

from __future__ import annotations

import os
import time

import pytorch_lightning as pl

# Set in the environment of one Ray node (tests.ray_nodes.KillableNode): the runs there hold until it is killed.
HOLD_ENV = "SEGX_TEST_HOLD_ON_THIS_NODE"


class HangOnRank(pl.Callback):
    """Rank `rank` stops answering at the end of the first training epoch (it sleeps before the epoch's collectives),
    as a rank that hung or took another path through the hooks would."""

    def __init__(self, rank: int = 1, seconds: float = 600) -> None:
        self.rank, self.seconds = int(rank), float(seconds)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == self.rank:
            time.sleep(self.seconds)


class HoldOnMarkedNode(pl.Callback):
    """A run on the node whose environment has HOLD_ENV waits at the first batch of epoch `epoch` (0-based), after
    the epochs before it were recorded and checkpointed, until that node is killed: the test kills it at a known
    point, whatever the machine's speed. Elsewhere (a retry on another node) the run goes on."""

    def __init__(self, epoch: int = 1, seconds: float = 600) -> None:
        self.epoch, self.seconds = int(epoch), float(seconds)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        # at the epoch's first batch: RunSummary records the epoch before as this one starts
        if os.environ.get(HOLD_ENV) and trainer.current_epoch == self.epoch and batch_idx == 0:
            time.sleep(self.seconds)
