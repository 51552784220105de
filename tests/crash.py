"""Callbacks that end their own process as the world does: SIGKILL (the OOM killer, a segfault) for launcher tests, and
Ctrl-C at a chosen moment."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class KillOwnProcess(pl.Callback):
    """SIGKILLs the process at its first training batch: every time, or only the first time in a run directory
    (so a retried job then completes)."""

    def __init__(self, every_time: bool = False) -> None:
        self.every_time = every_time

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        marker = Path(trainer.default_root_dir) / "killed-once"
        if self.every_time or not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class CtrlCAtEpochStart(pl.Callback):
    """Ctrl-C (a KeyboardInterrupt) as epoch `epoch` (0-based) starts, before its first batch, the first time only."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: object) -> None:
        marker = Path(trainer.default_root_dir) / "interrupted-once"
        if trainer.current_epoch == self.epoch and not marker.exists():
            marker.touch()
            raise KeyboardInterrupt
