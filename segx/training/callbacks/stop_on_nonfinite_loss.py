"""Stops training at the first batch whose loss is NaN, infinite or exploded far beyond its start, before a
checkpoint of it is written; and a run whose loss is exactly zero from its first steps, which learns nothing."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from segx.core.errors import ConfigError, SegxError

log = logging.getLogger(__name__)



class NonFiniteLossError(SegxError):
    """The training loss became NaN or infinite: the run diverged."""


class ZeroLossError(SegxError):
    """The training loss was exactly zero from the first step on: nothing labelled reaches the loss."""


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

    def __init__(self, check_every_n_steps: int | None = None, max_loss_ratio: float | None = 1e4,
                 zero_loss_steps: int | None = 10) -> None:
        if check_every_n_steps is not None and int(check_every_n_steps) < 1:
            raise ConfigError(f"callbacks.stop_on_nonfinite_loss.check_every_n_steps={check_every_n_steps} must be "
                            "at least 1 (or null for the device's default).")
        if max_loss_ratio is not None and not float(max_loss_ratio) > 1:
            raise ConfigError(f"callbacks.stop_on_nonfinite_loss.max_loss_ratio={max_loss_ratio} must be more than 1 "
                              "(or null: stop on NaN and infinity only).")
        if zero_loss_steps is not None and int(zero_loss_steps) < 1:
            raise ConfigError(f"callbacks.stop_on_nonfinite_loss.zero_loss_steps={zero_loss_steps} must be at least 1 "
                              "(or null: never stop on a zero loss).")
        self.zero_loss_steps = None if zero_loss_steps is None else int(zero_loss_steps)
        self._zeros = 0  # losses of exactly 0 since training began, while no other value was seen
        self._learning = False  # a non-zero loss was seen: the zero check is over
        self.check_every_n_steps = check_every_n_steps
        self.max_loss_ratio = None if max_loss_ratio is None else float(max_loss_ratio)
        self._first: float | None = None  # the first finite loss of this process's training (the ratio's base)
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
        good = torch.isfinite(values)
        if self._first is None and bool(good.any()):
            self._first = max(abs(float(values[good][0])), 1e-12)
        if self.max_loss_ratio is not None and self._first is not None:
            good &= values.abs() <= self._first * self.max_loss_ratio  # finite, yet 8e31: diverged all the same
        diverged_here = not bool(good.all())
        zero_here = self._zero_from_the_start(trainer, values)
        # One decision for both checks: every rank takes part in the same collective at every check.
        if trainer.strategy.reduce_boolean_decision(diverged_here or zero_here, all=False):
            if zero_here and not diverged_here:
                raise ZeroLossError(self.zero_message(*batches[-1]))
            first = int((~good).nonzero()[0, 0]) if diverged_here else len(batches) - 1
            value = float(values[first]) if diverged_here else 0.0
            raise NonFiniteLossError(self.message(trainer, value, *batches[first], local=diverged_here))

    def _zero_from_the_start(self, trainer: pl.Trainer, values: torch.Tensor) -> bool:
        """Whether every loss so far was exactly 0, for `zero_loss_steps` steps or the whole first epoch."""
        if self.zero_loss_steps is None or self._learning:
            return False
        if bool((values != 0).any()):
            self._learning = True
            return False
        self._zeros += len(values)
        epoch = trainer.num_training_batches
        needed = min(self.zero_loss_steps, int(epoch)) if math.isfinite(epoch) and epoch > 0 else self.zero_loss_steps
        return self._zeros >= needed

    def zero_message(self, epoch: int, step: int, lr: float | None, batch_idx: int) -> str:
        """One paragraph: the loss was 0 from the start, the usual reasons, what to check."""
        return (f"The training loss was exactly 0 for each of the first {self._zeros} steps (to epoch {epoch}, step "
                f"{step}), so the network learns nothing, and training was stopped. A loss of 0 from the start means "
                "no labelled pixel reaches it: masks whose second class is stored as 255, the ignore value (0/255 "
                "binary masks: set data.label_map={255: 1}), or a class-weighted loss (loss=weighted_ce) whose only "
                "labelled class weighs 0. Check the label census at the top of train.log against what the masks "
                "should hold, then start a new run; callbacks.stop_on_nonfinite_loss.zero_loss_steps=null turns this "
                "check off.")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._saved = (int(checkpoint.get("epoch", trainer.current_epoch)), int(checkpoint.get("global_step", 0)))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._saved = (int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))

    def message(self, trainer: pl.Trainer, value: float, epoch: int, step: int, lr: float | None,
                batch_idx: int, local: bool = True) -> str:
        """One paragraph: where the loss diverged, what is left of the run, and what to change."""
        if math.isnan(value) or math.isinf(value):
            what = str(value)  # nan, inf or -inf
        elif local:
            what = (f"{value:.3g}, over {self.max_loss_ratio:g} times its first value {self._first:.3g} "
                    "(callbacks.stop_on_nonfinite_loss.max_loss_ratio)")
        else:  # DDP: fine here, not on another process
            what = "nan, infinite or exploded on another process"
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


