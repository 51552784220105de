"""Ctrl-C and SIGTERM (a scheduler's pre-emption, `kill`) save `last.ckpt` before the run exits."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from segx.runs.status import interruption

log = logging.getLogger(__name__)


class CheckpointOnInterrupt(pl.Callback):
    """Writes the current state to `<checkpoints>/last.ckpt` (atomically) when a signal interrupts the run, so
    `ckpt_path=last` loses at most the batch in flight instead of the whole epoch. A scheduler's stop and the
    code's own `sys.exit()` are not interruptions: they save nothing beyond the per-epoch `last.ckpt`."""

    def __init__(self) -> None:
        self._epoch_of_last_batch: int | None = None  # the epoch of the last training batch this process finished

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self._epoch_of_last_batch = trainer.current_epoch

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        signal_name = interruption(exception)
        checkpoint = trainer.checkpoint_callback
        if signal_name is None or not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.dirpath:
            return
        path = Path(checkpoint.dirpath) / "last.ckpt"
        if trainer.world_size > 1:
            # A signal reaches the ranks at different points, and a checkpoint needs every rank in it: saving would
            # wait on ranks that are elsewhere (or already gone). The last epoch's last.ckpt is the resume point.
            if trainer.is_global_zero:
                log.warning("%s in a %d-process run: no checkpoint is saved mid-epoch (it needs every rank); resume "
                            "with ckpt_path=last from the last epoch's last.ckpt (hydra.run.dir=%s)", signal_name,
                            trainer.world_size, path.parent.parent)
            return
        if self._epoch_of_last_batch != trainer.current_epoch:
            # Before the epoch's first batch: Lightning would resume such a state as an epoch already run (no
            # training, no validation). The last.ckpt of the epoch before holds the same weights and step.
            kept = "keeps the last.ckpt of the epoch before" if path.is_file() else "saved nothing (nothing trained)"
            if trainer.is_global_zero:
                log.warning("%s before the first batch of epoch %d: %s; resume with ckpt_path=last (hydra.run.dir="
                            "%s)", signal_name, trainer.current_epoch + 1, kept, path.parent.parent)
            return
        tmp = path.with_name(f".last.ckpt.{os.getpid()}.tmp")
        trainer.save_checkpoint(tmp)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, path)
            log.warning("%s: saved epoch %d, step %d to %s; resume with ckpt_path=last (hydra.run.dir=%s)",
                        signal_name, trainer.current_epoch, trainer.global_step, path, path.parent.parent)
