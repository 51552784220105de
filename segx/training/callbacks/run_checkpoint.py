"""Lightning's ModelCheckpoint, keeping the best of the whole run when it is resumed into another folder."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from segx.core.files import atomic_path

log = logging.getLogger(__name__)



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


# ModelCheckpoint's private methods RunCheckpoint calls, with the parameters it passes (after self); a Lightning
# release that renames one fails tests/test_callbacks.py, not a user's run half-way.
LIGHTNING_PRIVATE_METHODS = {
    "_should_skip_saving_checkpoint": ("trainer",),
    "_should_save_on_train_epoch_end": ("trainer",),
    "_save_last_checkpoint": ("trainer", "monitor_candidates"),
    "_monitor_candidates": ("trainer",),
}


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, keeping the best of the whole run when it is resumed into another folder.

    Lightning drops the best score when the resumed checkpoint was written to another dirpath (a run resumed
    into a new run directory), so the first epoch after the resume would replace best.ckpt even when it is worse,
    while `best` in metrics.json (the whole history) would still name the old epoch. This copies the previous
    run's kept checkpoints (best.ckpt) into this folder, atomically, and restores their scores, so only a better
    epoch replaces them. When the previous best file is gone, the best restarts at the resumed epoch:
    `best_since` records that epoch (in every checkpoint after it) and RunSummary's `best` counts only epochs
    from there on, so `best` and best_checkpoint still name the same epoch. It also writes last.ckpt after every
    validation.
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
        """last.ckpt after every validation (Lightning's ModelCheckpoint writes it only when the best improved), so
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
