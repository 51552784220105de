"""Where a run executes: the precision `auto` resolves to, the devices a job was given, DDP inside a sweep."""

from __future__ import annotations

import os

import torch

CUDA_ACCELERATORS = ("auto", "gpu", "cuda")
# Lightning strategies that re-run `sys.argv` in child processes; inside a multirun that is the whole sweep.
_RELAUNCHING_DDP = {
    "ddp": "ddp_spawn",
    "ddp_find_unused_parameters_true": "ddp_spawn_find_unused_parameters_true",
    "ddp_find_unused_parameters_false": "ddp_spawn_find_unused_parameters_false",
}


def uses_cuda(accelerator: str) -> bool:
    """True when Lightning will train on a CUDA device for this `trainer.accelerator`."""
    return str(accelerator) in CUDA_ACCELERATORS and torch.cuda.is_available()


def resolve_precision(precision: str | int, cuda: bool, bf16_supported: bool) -> str:
    """`auto` → `bf16-mixed` on CUDA devices with bf16 (Ampere and newer), `16-mixed` on older ones,
    `32-true` on the CPU (CPU autocast is slower than fp32 for these networks); any other value is kept."""
    if str(precision) != "auto":
        return str(precision)
    if not cuda:
        return "32-true"
    return "bf16-mixed" if bf16_supported else "16-mixed"


def precision_for(precision: str | int, accelerator: str) -> str:
    """`resolve_precision` for the devices of this machine."""
    cuda = uses_cuda(accelerator)
    return resolve_precision(precision, cuda, cuda and torch.cuda.is_bf16_supported(including_emulation=False))


def visible_devices(accelerator: str) -> str:
    """The devices this job was given: `CUDA_VISIBLE_DEVICES` as the launcher set it, else every CUDA
    device when training on CUDA, else `cpu`. Ray sets the variable even where it only simulates GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return visible
    if uses_cuda(accelerator):
        return ",".join(str(i) for i in range(torch.cuda.device_count()))
    return "cpu"


def strategy_for_sweep_job(strategy: object) -> object:
    """Lightning's `ddp` starts its other ranks by running the command line again: inside `train.py -m`
    that relaunches the whole sweep, and inside a Ray or submitit worker it is not a script at all. A
    sweep job therefore starts its ranks with `spawn`, which needs no command line."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return strategy  # SLURM started one process per rank itself (hydra.launcher.tasks_per_node)
    if isinstance(strategy, str) and strategy in _RELAUNCHING_DDP:
        return _RELAUNCHING_DDP[strategy]
    return strategy
