"""A callback that kills its own process, as the kernel's OOM killer or a segfault would: for launcher tests."""

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
