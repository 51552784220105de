"""Lightning callbacks: the prediction picture for TensorBoard, the run summary (`metrics.json`) and the stop on a
diverged (NaN or infinite) training loss."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from segx.errors import SegxError
from segx.runfiles import write_json_atomic
from segx.visualize import prediction_grid

log = logging.getLogger(__name__)


class PredictionGridLogger(pl.Callback):
    """Each validation epoch, logs image | ground truth | prediction for the first `num_images` val images.

    The same images every epoch, so the TensorBoard slider shows the network learning them.
    """

    def __init__(self, num_images: int = 4, tag: str = "val/predictions") -> None:
        self.num_images = int(num_images)
        self.tag = tag

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.num_images <= 0 or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        datamodule = trainer.datamodule
        if not loggers or datamodule is None:
            return
        split = datamodule.load_split(datamodule.val_split)
        images = split.images[: self.num_images].to(pl_module.device)
        masks = split.masks[: self.num_images]
        dtype = next(pl_module.parameters()).dtype  # bf16-true precision keeps bf16 weights
        with torch.no_grad():
            preds = pl_module(datamodule.normalize(images).to(dtype)).argmax(1)
        grid = prediction_grid(images.float() / 255, masks, preds)
        for logger in loggers:
            logger.experiment.add_image(self.tag, grid, global_step=trainer.global_step)


class NonFiniteLossError(SegxError):
    """The training loss became NaN or infinite: the run diverged."""


def _loss_of(outputs: Any) -> torch.Tensor | None:
    """The training step's loss as Lightning hands it to `on_train_batch_end` (a dict with "loss", or the tensor)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss if isinstance(loss, torch.Tensor) else None


class StopOnNonFiniteLoss(pl.Callback):
    """Stops training with a `NonFiniteLossError` (a `SegxError`) the first batch whose loss is NaN or infinite.

    A diverged network only ever produces NaN after that, so the run stops at once rather than
    spending the remaining epochs (and overwriting `last.ckpt` with NaN weights at the next epoch end).
    It raises in `on_train_batch_end`, before any checkpoint of that state could be written
    (Lightning runs checkpoint callbacks after the others, and ModelCheckpoint saves on an exception
    only with `save_on_exception=true`), so `last.ckpt` keeps the last finite state. The error names
    the epoch, the step and the learning rate of the batch; the run's `metrics.json` records it with
    status `failed` and train.py exits with status 2. Under DDP every rank stops when any rank's loss
    is not finite (one boolean all-reduce per batch), so no rank waits for the others forever.
    """

    def __init__(self) -> None:
        self._step = 0
        self._lr: float | None = None
        self._saved: tuple[int, int] | None = None  # (epoch, step) of the newest checkpoint written or loaded

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Recorded before the step: Lightning steps the schedulers before `on_train_batch_end`.
        self._step = trainer.global_step
        optimizers = trainer.optimizers
        self._lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss_of(outputs)
        value = float(loss.detach().float().cpu()) if loss is not None else 0.0
        if trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False):
            raise NonFiniteLossError(self.message(trainer, value, batch_idx))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._saved = (int(checkpoint.get("epoch", trainer.current_epoch)), int(checkpoint.get("global_step", 0)))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._saved = (int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))

    def message(self, trainer: pl.Trainer, value: float, batch_idx: int) -> str:
        """One paragraph: where the loss diverged, what is left of the run, and what to change."""
        if math.isnan(value) or math.isinf(value):
            what = str(value)  # nan, inf or -inf
        else:  # DDP: finite here, not on another process
            what = "nan or infinite on another process"
        lr = "unknown" if self._lr is None else f"{self._lr:.3g}"
        head = (f"The training loss became {what} at epoch {trainer.current_epoch}, step {self._step} (learning "
                f"rate {lr}; batch {batch_idx} of the epoch, all counted from 0 as in metrics.json): training "
                "diverged and was stopped.")
        checkpoint = trainer.checkpoint_callback
        last = Path(checkpoint.dirpath) / "last.ckpt" if isinstance(checkpoint, ModelCheckpoint) \
            and checkpoint.dirpath else None
        if last is not None and last.is_file():
            when = f" (epoch {self._saved[0]}, step {self._saved[1]})" if self._saved is not None else ""
            kept = f"{last} keeps the last good state{when}, written before the loss diverged."
        else:
            kept = "No checkpoint was written before it diverged."
        return (f"{head} {kept} Lower optimizer.lr (e.g. by 10x), add a decay (optimizer.decay) or a warm-up "
                "(scheduler=cosine), or clip gradients (trainer.gradient_clip_val=1.0), and start a new run: one "
                "resumed from last.ckpt keeps the learning rate stored in it.")


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if "/" in k and torch.as_tensor(v).numel() == 1}


def _best_of(history: list[dict[str, float]], monitor: str) -> dict[str, float]:
    scored = [h for h in history if monitor in h]
    return max(scored, key=lambda h: h[monitor]) if scored else {}


def _val_confusion_matrix(trainer: pl.Trainer) -> list[list[int]] | None:
    counts = getattr(trainer.lightning_module, "val_confusion_matrix", None)
    return counts.tolist() if counts is not None else None


class RunSummary(pl.Callback):
    """Keeps `metrics.json` in the run directory: per-epoch metrics and wall time, best and final scores.

    The file is rewritten (atomically) after every epoch, so a run killed at epoch 40 of 50 still
    leaves its history. An epoch's train scores are logged in the module's `on_train_epoch_end`,
    which Lightning calls after callbacks' hook of that name, so each epoch is recorded when the next
    one starts (and the last when training ends); `callback_metrics` holds the values until then.
    At the end the run's choices and scores also go to TensorBoard's hparams tab. `provenance` (the job's
    status, host, devices, ...; see `segx.sweep.JobRecord`) leads every write, so no write loses it.
    """

    def __init__(self, path: str | Path, parameters: dict[str, int], hparams: dict[str, Any] | None = None,
                 monitor: str = "val/miou", provenance: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.provenance = provenance if provenance is not None else {}
        self.parameters = parameters
        self.hparams = hparams or {}
        self.monitor = monitor
        self.history: list[dict[str, float]] = []
        self.best_confusion_matrix: list[list[int]] | None = None  # the best epoch's, rows: ground truth
        self.epoch_seconds: list[float] = []
        self.total_seconds = 0.0
        self._fit_start = 0.0
        self._epoch_start: float | None = None
        self._epoch = 0
        self._trainer: pl.Trainer | None = None

    def best(self) -> dict[str, float]:
        """The first epoch with the highest monitored score (the one ModelCheckpoint keeps)."""
        return _best_of(self.history, self.monitor)

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        checkpoint = trainer.checkpoint_callback
        seconds = self.epoch_seconds
        return {
            **self.provenance,
            "final": self.history[-1] if self.history else {},
            "monitor": self.monitor,
            "best": self.best(),
            "class_names": list(getattr(trainer.lightning_module, "class_names", []) or []),
            "best_confusion_matrix": self.best_confusion_matrix,
            "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
            "last_checkpoint": str(Path(checkpoint.dirpath) / "last.ckpt")
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last and checkpoint.dirpath else None,
            "parameters": self.parameters,
            "epochs": len(self.history),
            "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else None,
            "epoch_seconds": seconds,
            "total_seconds": self.total_seconds or time.perf_counter() - self._fit_start,
            "history": self.history,
        }

    def _pending(self, trainer: pl.Trainer) -> dict[str, float]:
        return {"epoch": float(self._epoch), **_scalars(trainer.callback_metrics)}

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

    def _log_epoch(self, trainer: pl.Trainer) -> None:
        """One line per epoch: the progress a sweep job shows where no progress bar is drawn."""
        entry = self.history[-1]
        scores = " · ".join(f"{k} {entry[k]:.4f}" for k in ("train/loss", "val/loss", "val/miou") if k in entry)
        log.info("Epoch %d/%s · %s · %.1fs", int(entry["epoch"]) + 1, trainer.max_epochs, scores,
                 self.epoch_seconds[-1])

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
            if _best_of(history, self.monitor) is pending:
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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total_seconds = time.perf_counter() - self._fit_start
        self._close_epoch(trainer)
        if not trainer.is_global_zero:
            return
        write_json_atomic(self.path, self.summary(trainer))
        final = self.history[-1] if self.history else {}
        scores = {f"hp/final_{k.replace('/', '_')}": v for k, v in final.items()
                  if k.startswith("val/") and not k.startswith("val/iou/")}
        best = self.best()
        for key in ("val/miou", "val/miou_no_bg"):  # of the best epoch by the monitored metric
            if key in best:
                scores[f"hp/best_{key.replace('/', '_')}"] = best[key]
        for logger in trainer.loggers:  # written before Lightning closes the loggers
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.hparams, metrics=scores)
