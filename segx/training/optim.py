"""Optimizers and learning-rate schedules: the Keras time decay the study used, and the usual alternatives.

Every schedule steps once per batch and is built from `conf/scheduler/` as a partial function of
`(optimizer, total_steps)`, so one call site serves all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, LRScheduler, PolynomialLR, SequentialLR

from segx.core.errors import ConfigError

KERAS_DECAY = "segx.training.optim.keras_decay_schedule"
# optimizer.keras_epsilon=true: the optimizer that updates as Keras does (SGD's update is the same in both).
KERAS_UPDATES = {"torch.optim.Adam": "segx.training.keras_adam.KerasAdam",
                 "torch.optim.Adamax": "segx.training.keras_adam.KerasAdamax", "torch.optim.SGD": "torch.optim.SGD"}


def keras_decay(decay: float) -> Callable[[int], float]:
    """LambdaLR factor for Keras' legacy `decay`: lr_t = lr / (1 + decay · t), t counted in batches."""
    if decay < 0:
        raise ConfigError(f"optimizer.decay={decay} must be >= 0 (0 disables the decay).")
    return lambda step: 1.0 / (1.0 + decay * step)


def keras_decay_schedule(optimizer: Optimizer, total_steps: int, decay: float = 0.0) -> LRScheduler:
    """`scheduler=keras_decay`: the study's schedule, with `optimizer.decay` as its rate (0: constant lr)."""
    return LambdaLR(optimizer, keras_decay(decay))


def constant_schedule(optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """`scheduler=none`: the learning rate never changes."""
    return LambdaLR(optimizer, lambda step: 1.0)


def _known_steps(total_steps: int, name: str) -> int:
    if total_steps <= 0:
        raise ConfigError(
            f"scheduler={name} decays over the whole run, whose length is unknown: set trainer.max_epochs or "
            "trainer.max_steps, or use scheduler=keras_decay or scheduler=none."
        )
    return total_steps


def poly_schedule(optimizer: Optimizer, total_steps: int, power: float = 0.9) -> LRScheduler:
    """`scheduler=poly`: lr · (1 − t/T)^power over the whole run, the usual segmentation schedule (DeepLab)."""
    if power <= 0:
        raise ConfigError(f"scheduler.power={power} must be positive (0.9 is the usual choice).")
    return PolynomialLR(optimizer, total_iters=_known_steps(total_steps, "poly"), power=power)


def cosine_schedule(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05,
                    min_lr_ratio: float = 0.0) -> LRScheduler:
    """`scheduler=cosine`: a linear warm-up over `warmup_fraction` of the steps, then a cosine decay to
    `min_lr_ratio` · lr at the last step."""
    if not 0 <= warmup_fraction < 1:
        raise ConfigError(f"scheduler.warmup_fraction={warmup_fraction} must be in [0, 1).")
    if not 0 <= min_lr_ratio <= 1:
        raise ConfigError(f"scheduler.min_lr_ratio={min_lr_ratio} must be in [0, 1].")
    total_steps = max(2, _known_steps(total_steps, "cosine"))
    warmup = min(int(round(warmup_fraction * total_steps)), total_steps - 1)
    min_lrs = [group["lr"] * min_lr_ratio for group in optimizer.param_groups]
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup, eta_min=min(min_lrs))
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any], scheduler: Mapping[str, Any] | None = None,
    total_steps: int = 1,
) -> tuple[Optimizer, LRScheduler]:
    """`cfg` is an optimizer config (`_target_`, `lr`, its own options) plus `decay`; `scheduler` a config
    from `conf/scheduler/` (None: `keras_decay`, what checkpoints from before schedulers used)."""
    options = dict(cfg)
    decay = float(options.pop("decay", 0.0))
    if options.pop("keras_epsilon", False):  # Keras' own update where it differs (segx.training.keras_adam)
        target = options.get("_target_")
        if target not in KERAS_UPDATES and target not in KERAS_UPDATES.values():
            raise ConfigError(f"optimizer.keras_epsilon=true gives Adam's and Adamax's Keras update, but the optimizer "
                              f"is {target}; use it with optimizer=adam, adamax or sgd (whose update Keras shares), "
                              "or drop it.")
        options["_target_"] = KERAS_UPDATES.get(target, target)
    if float(options.get("lr", 1.0)) <= 0:
        raise ConfigError(f"optimizer.lr={options.get('lr')} must be positive.")
    schedule = dict(scheduler or {"_target_": KERAS_DECAY, "_partial_": True})
    if schedule.get("_target_") == KERAS_DECAY:
        schedule["decay"] = decay
    elif decay:
        raise ConfigError(
            f"optimizer.decay={decay} is the Keras time decay, which only scheduler=keras_decay applies, but "
            f"the scheduler is {schedule.get('_target_')}. Set optimizer.decay=0 to use that schedule, or "
            "scheduler=keras_decay to keep the decay."
        )
    optimizer = instantiate(options, params=params, _convert_="all")
    return optimizer, instantiate(schedule, _convert_="all")(optimizer, total_steps=int(total_steps))
