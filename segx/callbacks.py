"""Lightning callbacks: the prediction picture for TensorBoard, the run summary (`metrics.json`), the stop on a
diverged (NaN or infinite) training loss, and the checkpoint callback that keeps the best of a resumed run."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from segx.errors import SegxError
from segx.runfiles import atomic_path, write_json_atomic
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
    """Stops training with a `NonFiniteLossError` (a `SegxError`) when a batch's loss is NaN or infinite.

    A diverged network only ever produces NaN after that, so the run stops rather than spending the
    remaining epochs. Losses are checked every `check_every_n_steps` batches (null: every batch on the
    CPU, every 32 on a GPU, where reading a loss back each batch would stall the queue of GPU work) and
    always at an epoch's last batch and before a validation, i.e. before any checkpoint of that state
    could be written (Lightning runs checkpoint callbacks after the others; ModelCheckpoint saves on an
    exception only with `save_on_exception=true`), so `last.ckpt` keeps the last finite state. The error
    names the epoch, the step and the learning rate of the first non-finite batch; `metrics.json` records
    it with status `failed` and train.py exits with status 2. Under DDP every rank stops when any rank's
    loss is not finite (one boolean all-reduce per check), so no rank waits for the others forever.
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        if check_every_n_steps is not None and int(check_every_n_steps) < 1:
            raise SegxError(f"callbacks.stop_on_nonfinite_loss.check_every_n_steps={check_every_n_steps} must be "
                            "at least 1 (or null for the device's default).")
        self.check_every_n_steps = check_every_n_steps
        self._step = 0
        self._lr: float | None = None
        self._losses: list[torch.Tensor] = []  # unchecked losses, still on the device
        self._batches: list[tuple[int, int, float | None, int]] = []  # their (epoch, step, lr, batch index)
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
        if loss is None:
            return
        self._losses.append(loss.detach().float().reshape(()))
        self._batches.append((trainer.current_epoch, self._step, self._lr, batch_idx))
        every = self.check_every_n_steps or (1 if pl_module.device.type == "cpu" else 32)
        if len(self._losses) >= every or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.check(trainer)

    def check(self, trainer: pl.Trainer) -> None:
        """Read the unchecked losses back (one synchronisation) and stop at the first non-finite one."""
        if not self._losses:
            return
        values = torch.stack(self._losses).cpu()
        batches = self._batches
        self._losses, self._batches = [], []
        finite = torch.isfinite(values)
        diverged_here = not bool(finite.all())
        if trainer.strategy.reduce_boolean_decision(diverged_here, all=False):
            first = int((~finite).nonzero()[0, 0]) if diverged_here else len(batches) - 1
            value = float(values[first]) if diverged_here else 0.0
            raise NonFiniteLossError(self.message(trainer, value, *batches[first]))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._saved = (int(checkpoint.get("epoch", trainer.current_epoch)), int(checkpoint.get("global_step", 0)))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._saved = (int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))

    def message(self, trainer: pl.Trainer, value: float, epoch: int, step: int, lr: float | None,
                batch_idx: int) -> str:
        """One paragraph: where the loss diverged, what is left of the run, and what to change."""
        if math.isnan(value) or math.isinf(value):
            what = str(value)  # nan, inf or -inf
        else:  # DDP: finite here, not on another process
            what = "nan or infinite on another process"
        lr = "unknown" if lr is None else f"{lr:.3g}"
        head = (f"The training loss became {what} at epoch {epoch}, step {step} (learning "
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


def _best_of(history: list[dict[str, float]], monitor: str, since: int | None = None) -> dict[str, float]:
    scored = [h for h in history if monitor in h and (since is None or h.get("epoch", 0) >= since)]
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
        """The first epoch with the highest monitored score (the one ModelCheckpoint keeps).

        Only epochs from `RunCheckpoint.best_since` on count when the best restarted there (a resume whose
        previous best checkpoint was gone), so `best` always names the epoch whose weights are in best_checkpoint.
        """
        return _best_of(self.history, self.monitor, self._best_since())

    def _best_since(self) -> int | None:
        checkpoint = self._trainer.checkpoint_callback if self._trainer is not None else None
        return getattr(checkpoint, "best_since", None)

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        checkpoint = trainer.checkpoint_callback
        seconds = self.epoch_seconds
        return {
            **self.provenance,
            "final": self.history[-1] if self.history else {},
            "monitor": self.monitor,
            "best": self.best(),
            **({"best_since_epoch": self._best_since()} if self._best_since() is not None else {}),
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


def _kept_scores(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoints a ModelCheckpoint state kept, with their scores (its best alone if the map is missing)."""
    scores = dict(state.get("best_k_models") or {})
    best, score = state.get("best_model_path"), state.get("best_model_score")
    if not scores and best and score is not None:
        scores = {best: score}
    return {path: torch.as_tensor(value).detach().cpu() for path, value in scores.items()}  # broadcast-safe


def _copy_atomic(source: str, target: str) -> None:
    """A crash mid-copy must not leave half a best.ckpt that a later resume or evaluate.py would read."""
    if os.path.exists(target) and os.path.samefile(source, target):
        return  # the same file under another spelling of the folder (a symlink, a run resumed where it was moved)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, keeping the best of the whole run when it is resumed into another folder.

    Lightning drops the best score when the resumed checkpoint was written to another dirpath (a run resumed
    into a new run directory), so the first epoch after the resume would replace best.ckpt even when it is worse,
    while `best` in metrics.json (the whole history) would still name the old epoch. This copies the previous
    run's kept checkpoints (best.ckpt) into this folder, atomically, and restores their scores, so only a better
    epoch replaces them. When the previous best file is gone, the best restarts at the resumed epoch:
    `best_since` records that epoch (in every checkpoint after it) and RunSummary's `best` counts only epochs
    from there on, so `best` and best_checkpoint still name the same epoch. It also writes last.ckpt after every
    validation, as Lightning did before 2.6.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.best_since: int | None = None
        self._previous: dict[str, Any] | None = None  # a state from another dirpath, carried over at train start

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key, so checkpoints written before this class existed resume into it (and back)."""
        key = super().state_key
        return ModelCheckpoint.__qualname__ + key[len(type(self).__qualname__):]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_since": self.best_since}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_since = state_dict.get("best_since")
        previous = state_dict.get("dirpath", self.dirpath)
        if previous == self.dirpath or self.dirpath is None or not self.monitor or self.save_top_k == 0:
            super().load_state_dict(state_dict)
            return
        # Files are copied in on_train_start, where the trainer says which process writes; until then, as Lightning.
        self.best_model_path = state_dict["best_model_path"]
        last = state_dict.get("last_model_path")
        # last.ckpt here is this run's own: overwrite it rather than start a last-v1.ckpt beside it.
        self.last_model_path = os.path.join(self.dirpath, os.path.basename(last)) if last else ""
        self._previous = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._previous is not None:
            self._carry_over(trainer, self._previous)
            self._previous = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_anyway(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_anyway(trainer, at_train_epoch_end=False)

    def _save_last_anyway(self, trainer: pl.Trainer, at_train_epoch_end: bool) -> None:
        """last.ckpt after every validation, as before Lightning 2.6, which writes it only when the best improved:
        a run killed with SIGKILL resumes (ckpt_path=last) from its last epoch, not its last better one."""
        if (self.save_last is True and not self._should_skip_saving_checkpoint(trainer)
                and bool(self._should_save_on_train_epoch_end(trainer)) == at_train_epoch_end):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _carry_over(self, trainer: pl.Trainer, state: dict[str, Any]) -> None:
        scores = _kept_scores(state)
        if not scores:
            return  # nothing was kept before the resume
        kept = self._copy_kept(trainer, scores) if trainer.is_global_zero else None
        kept = trainer.strategy.broadcast(kept)  # every process keeps the same bookkeeping
        if kept is None:
            self._restart_best(trainer, state["best_model_path"])
            return
        self._restore_top_k(kept)
        if trainer.is_global_zero:
            log.info("Resumed from %s in a new checkpoint folder: carried the best checkpoint (%s %.4f) over to %s",
                     trainer.ckpt_path, self.monitor, float(self.best_model_score), self.best_model_path)

    def _source(self, trainer: pl.Trainer, path: str) -> str | None:
        """Where a kept checkpoint is now: where it was written, or beside the resumed one (a moved run)."""
        candidates = [path]
        if trainer.ckpt_path:
            candidates.append(os.path.join(os.path.dirname(str(trainer.ckpt_path)), os.path.basename(path)))
        return next((p for p in candidates if os.path.isfile(p)), None)

    def _copy_kept(self, trainer: pl.Trainer, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Copies the kept checkpoints into this folder: their new paths and scores; None when the best is gone."""
        best = (max if self.mode == "max" else min)(scores, key=lambda p: float(scores[p]))
        sources = {path: self._source(trainer, path) for path in scores}
        if sources[best] is None:
            return None
        kept = {}
        for path, source in sources.items():
            if source is None:
                log.warning("%s (kept by the run resumed from) is gone; it is not carried over", path)
                continue
            target = os.path.join(str(self.dirpath), os.path.basename(path))
            _copy_atomic(source, target)
            kept[target] = scores[path]
        return kept

    def _restore_top_k(self, scores: dict[str, torch.Tensor]) -> None:
        """Lightning's top-k bookkeeping (as `_update_best_and_save` leaves it) for checkpoints already saved."""
        pick_best, pick_worst = (max, min) if self.mode == "max" else (min, max)
        self.best_k_models = scores
        self.best_model_path = pick_best(scores, key=lambda p: float(scores[p]))
        self.best_model_score = scores[self.best_model_path]
        if self.save_top_k == -1 or len(scores) == self.save_top_k:
            self.kth_best_model_path = pick_worst(scores, key=lambda p: float(scores[p]))
            self.kth_value = scores[self.kth_best_model_path]

    def _restart_best(self, trainer: pl.Trainer, previous_best: str) -> None:
        self.best_since = trainer.current_epoch
        self.best_model_path = ""
        if trainer.is_global_zero:
            log.warning("The best checkpoint of the run resumed from, %s, is gone: best.ckpt and `best` in "
                        "metrics.json start afresh from epoch %d (counted from 0 as in metrics.json, whose history "
                        "keeps every epoch)", previous_best, self.best_since)
