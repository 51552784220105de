"""Bounds how long a rank of a DDP run waits for the others in a collective (`distributed.collective_timeout_s`)."""

from __future__ import annotations

from datetime import timedelta

import pytorch_lightning as pl
import torch


class CollectiveTimeout(pl.Callback):
    """Once the ranks have joined (under PyTorch's start-up timeout, 30 minutes: a rank may take long to import and
    load its data), every later collective of the run waits at most `seconds`; past that it raises, and train()
    turns the error into one paragraph (`segx.training.collectives`)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.seconds is not None and distributed and trainer.world_size > 1:
            torch.distributed.set_timeout(timedelta(seconds=self.seconds))
