"""Ends the other processes of a DDP run with the job's process, however that one ends."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import pytorch_lightning as pl
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from pytorch_lightning.utilities.exceptions import SIGTERMException

from segx.core.ranks import end_with_parent

log = logging.getLogger(__name__)


class EndWithJob(pl.Callback):
    """Each rank that the job's process started (ddp_spawn's ranks, or `ddp`'s relaunched ranks 1..n) asks the
    kernel to kill it when its parent exits, so a job ended by SIGTERM, Ctrl-C or SIGKILL leaves no rank behind.

    SIGTERM in a multi-process run ends it at once: the job's process kills the ranks it relaunched and raises
    Lightning's `SIGTERMException`. Lightning's own handler would instead start a broadcast inside the signal handler,
    which the other ranks, busy in another collective, never match (the run then hangs until the collective timeout).
    """

    def __init__(self) -> None:
        self.job_pid = os.getpid()  # pickled into ddp_spawn's ranks as it is: there, not their own pid

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size <= 1:
            return
        if os.getpid() != self.job_pid:  # spawned by the job's process
            end_with_parent(self.job_pid)
        elif trainer.local_rank > 0:  # `ddp` ran the command line again: rank 0 (the job's process) is the parent
            end_with_parent()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning registered its SIGTERM handler (at the start of fit), which this one replaces.
        if trainer.world_size <= 1 or threading.current_thread() is not threading.main_thread():
            return
        launcher = trainer.strategy.launcher

        def stop(signum: int, frame: FrameType | None) -> None:
            if isinstance(launcher, _SubprocessScriptLauncher) and trainer.local_rank == 0:
                log.warning("SIGTERM: ending the ranks this run started, then the run")
                launcher.kill(signal.SIGKILL)
            raise SIGTERMException()

        signal.signal(signal.SIGTERM, stop)
