"""A run resumed at an epoch boundary carries on as if it had never stopped: the global random generators (Python,
NumPy, torch and CUDA: dropout, anything else drawing from them) travel in the checkpoint and are set again as the
first epoch after the resume starts. The batch order and the augmentation follow (seed, epoch) by themselves."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

KEY = "segx_rng_states"  # in the checkpoint: the generators' states when it was written


class ExactResume(pl.Callback):
    """Saves the global generators' states with every checkpoint and restores them when a resumed run's first
    epoch starts (after the model was built and the sanity check ran, which draw from them too)."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[KEY] = collect_rng_states()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.pending = checkpoint.get(KEY)  # None from a checkpoint of an older segx: the resume is not exact

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pending is None:
            return
        states, self.pending = self.pending, None
        if "torch.cuda" in states and len(states["torch.cuda"]) != torch.cuda.device_count():
            # written on a machine with another number of GPUs: the CPU streams are restored, the GPUs' are not
            log.warning("The checkpoint holds the random state of %d GPU(s), this machine has %d: the GPUs' random "
                        "streams restart from the seed", len(states["torch.cuda"]), torch.cuda.device_count())
            states = {k: v for k, v in states.items() if k != "torch.cuda"}
        set_rng_states(states)


def collect_rng_states() -> dict[str, Any]:
    """The global generators' states as tensors, numbers and strings only (a checkpoint loads with weights_only)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss),
                  float(gauss)],
        "python": [int(version), list(python_state), python_gauss],
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Set the global generators to `collect_rng_states`' states."""
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states:
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, python_state, python_gauss = states["python"]
    random.setstate((version, tuple(python_state), python_gauss))
