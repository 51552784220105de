"""Keeps `metrics.json` in the run directory: per-epoch history, best and final scores, provenance."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from segx.core.files import write_json_atomic
from segx.core.job_console import ON_CONSOLE
from segx.training.callbacks.run_checkpoint import RunCheckpoint
from segx.training.module import SegmentationModule
from segx.training.tensorboard import write_hparams

log = logging.getLogger(__name__)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if "/" in k and torch.as_tensor(v).numel() == 1}


def _best_of(history: list[dict[str, float]], monitor: str, since: int | None = None) -> dict[str, float]:
    scored = [h for h in history if monitor in h and (since is None or h.get("epoch", 0) >= since)]
    return max(scored, key=lambda h: h[monitor]) if scored else {}


def _segmentation_module(trainer: pl.Trainer) -> SegmentationModule | None:
    module = trainer.lightning_module
    return module if isinstance(module, SegmentationModule) else None


def _val_confusion_matrix(trainer: pl.Trainer) -> list[list[int]] | None:
    module = _segmentation_module(trainer)
    counts = module.val_confusion_matrix if module is not None else None
    return counts.tolist() if counts is not None else None


@runtime_checkable
class EpochListener(Protocol):
    """A callback told of each epoch once RunSummary has written it to metrics.json (rank zero only)."""

    def epoch_recorded(self, entry: dict[str, float], trainer: pl.Trainer) -> None: ...


class RunSummary(pl.Callback):
    """Keeps `metrics.json` in the run directory: per-epoch metrics and wall time, best and final scores.

    The file is rewritten (atomically) after every epoch, so a run killed at epoch 40 of 50 still
    leaves its history. An epoch's train scores are logged in the module's `on_train_epoch_end`,
    which Lightning calls after callbacks' hook of that name, so each epoch is recorded when the next
    one starts (and the last when training ends); `callback_metrics` holds the values until then.
    At the end the run's choices and scores also go to TensorBoard's hparams tab. `provenance` (the job's
    status, host, devices, ...; see `segx.runs.record.JobRecord`) leads every write, so no write loses it.
    """

    def __init__(self, path: str | Path, parameters: dict[str, int], hparams: dict[str, Any] | None = None,
                 monitor: str = "val/miou", provenance: dict[str, Any] | None = None,
                 listeners: Sequence[EpochListener] = (), hparams_shown: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.listeners = list(listeners)
        self.provenance = provenance if provenance is not None else {}
        self.parameters = parameters
        self.hparams = hparams or {}
        self.hparams_shown = list(hparams_shown)  # ticked in TensorBoard's HParams table when it opens
        self.monitor = monitor
        self.history: list[dict[str, float]] = []
        self.best_confusion_matrix: list[list[int]] | None = None  # the best epoch's, rows: ground truth
        self.epoch_seconds: list[float] = []
        self.total_seconds = 0.0
        self._fit_start = 0.0
        self._epoch_start: float | None = None
        self._epoch = 0
        self._batches = 0  # training batches of the open epoch (its batch index + 1, also after a resume)
        self._trainer: pl.Trainer | None = None

    def best(self) -> dict[str, float]:
        """The first epoch with the highest monitored score (the one ModelCheckpoint keeps).

        Only epochs from `RunCheckpoint.best_since` on count when the best restarted there (a resume whose
        previous best checkpoint was gone), so `best` always names the epoch whose weights are in best_checkpoint.
        """
        return _best_of(self.history, self.monitor, self._best_since())

    def _best_since(self) -> int | None:
        checkpoint = self._trainer.checkpoint_callback if self._trainer is not None else None
        return checkpoint.best_since if isinstance(checkpoint, RunCheckpoint) else None

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        checkpoint = trainer.checkpoint_callback
        # A partial epoch (trainer.max_time, Ctrl-C) would pull the mean down: the speed is of whole epochs.
        whole = [t for t, h in zip(self.epoch_seconds, self.history, strict=False) if not h.get("partial")]
        seconds = whole or self.epoch_seconds
        return {
            **self.provenance,
            "final": self.history[-1] if self.history else {},
            "monitor": self.monitor,
            "best": self.best(),
            **({"best_since_epoch": self._best_since()} if self._best_since() is not None else {}),
            "class_names": list(module.class_names) if (module := _segmentation_module(trainer)) else [],
            # as the process that trained it saw it (a spawned DDP rank's, not the launching process')
            **({"compiled": module.compiled} if module is not None else {}),
            "best_confusion_matrix": self.best_confusion_matrix,
            "best_checkpoint": checkpoint.best_model_path or None if isinstance(checkpoint, ModelCheckpoint) else None,
            "last_checkpoint": str(Path(checkpoint.dirpath) / "last.ckpt")
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last and checkpoint.dirpath else None,
            "parameters": self.parameters,
            "epochs": len(self.history),
            "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else None,
            "epoch_seconds": self.epoch_seconds,
            "total_seconds": self.total_seconds or time.perf_counter() - self._fit_start,
            "history": self.history,
        }

    def _pending(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The open epoch's entry: its number, scores and training batches; `partial` when it ran fewer batches
        than an epoch has (stopped by trainer.max_time or an interrupt)."""
        entry: dict[str, Any] = {"epoch": float(self._epoch), **_scalars(trainer.callback_metrics),
                                 "train_batches": self._batches}
        expected = trainer.num_training_batches
        if isinstance(expected, int) and 0 < self._batches < expected:
            entry["partial"] = True
        return entry

    def _close_epoch(self, trainer: pl.Trainer) -> None:
        if self._epoch_start is None:
            return
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)
        self.history.append(self._pending(trainer))
        if self.best() is self.history[-1]:
            self.best_confusion_matrix = _val_confusion_matrix(trainer)
        self._epoch_start = None
        if trainer.is_global_zero:
            write_json_atomic(self.path, self.summary(trainer))
            self._log_epoch(trainer)
            self._log_best(trainer)
            for listener in self.listeners:  # after the write: a listener may end the run (a search's stop)
                listener.epoch_recorded(self.history[-1], trainer)

    def _log_epoch(self, trainer: pl.Trainer) -> None:
        """One line per epoch: the progress a sweep job shows where no progress bar is drawn."""
        entry = self.history[-1]
        scores = " · ".join(f"{k} {entry[k]:.4f}" for k in ("train/loss", "val/loss", "val/miou") if k in entry)
        partial = (f" (partial: {entry['train_batches']} of {trainer.num_training_batches} batches)"
                   if entry.get("partial") else "")
        log.info("Epoch %d/%s%s · %s · %.1fs", int(entry["epoch"]) + 1, trainer.max_epochs, partial, scores,
                 self.epoch_seconds[-1], extra=ON_CONSOLE)

    def _best_keys(self) -> list[str]:
        return list(dict.fromkeys(("val/miou", "val/miou_no_bg", self.monitor)))

    def _log_best(self, trainer: pl.Trainer) -> None:
        """`val/best_<score>`: the score at the best epoch so far, a curve beside the per-epoch ones; its last value
        is the run's best, which the HParams table shows."""
        best = self.best()
        scores = {f"val/best_{key.removeprefix('val/')}": best[key] for key in self._best_keys() if key in best}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and scores:
                logger.log_metrics(scores, step=trainer.global_step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint, so a resumed run's metrics.json keeps the epochs before the resume.

        Checkpoints are written at the end of an epoch, before this callback records it, so the open
        epoch is included as it stands (its metrics are final by then).
        """
        history, seconds = list(self.history), list(self.epoch_seconds)
        confusion = self.best_confusion_matrix
        # The open epoch counts once its last batch ran (an interrupt's checkpoint mid-epoch leaves it out).
        if self._epoch_start is not None and self._trainer is not None and self._epoch_trained(self._trainer):
            pending = self._pending(self._trainer)
            history.append(pending)
            seconds.append(time.perf_counter() - self._epoch_start)
            if _best_of(history, self.monitor, self._best_since()) is pending:
                confusion = _val_confusion_matrix(self._trainer)
        return {"history": history, "epoch_seconds": seconds, "best_confusion_matrix": confusion}

    @staticmethod
    def _epoch_trained(trainer: pl.Trainer) -> bool:
        return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.epoch_seconds = list(state_dict.get("epoch_seconds", []))
        self.best_confusion_matrix = state_dict.get("best_confusion_matrix")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        # A run resumed from a mid-epoch checkpoint (Ctrl-C, SIGTERM) continues that epoch without a new start.
        self._epoch, self._epoch_start = trainer.current_epoch, self._fit_start

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start is not None and trainer.current_epoch == self._epoch:
            return  # the epoch opened by on_train_start
        self._close_epoch(trainer)
        self._epoch = trainer.current_epoch
        self._epoch_start = time.perf_counter()
        self._batches = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches = batch_idx + 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total_seconds = time.perf_counter() - self._fit_start
        self._close_epoch(trainer)
        if not trainer.is_global_zero:
            return
        write_json_atomic(self.path, self.summary(trainer))
        # The HParams table's columns: the last value of each tag, i.e. the final epoch's and the best so far.
        columns = {**{f"val/best_{k.removeprefix('val/')}": f"best {k}" for k in self._best_keys()},
                   **{k: f"final {k}" for k in ("val/miou", "val/acc", "val/loss")}}
        for logger in trainer.loggers:  # written before Lightning closes the loggers
            if isinstance(logger, TensorBoardLogger):
                write_hparams(logger, self.hparams, self.hparams_shown, columns, step=trainer.global_step)


