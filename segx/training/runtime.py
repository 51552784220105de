"""Where a run executes: the precision `auto` resolves to, the devices a job was given, DDP inside a sweep."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segx.core.errors import ConfigError
from segx.models.memory_format import MemoryFormat, choose_memory_format, probe_channels_last

log = logging.getLogger(__name__)

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
    """`resolve_precision` for the devices of this machine; on a CPU, `16-mixed` is recorded as what Lightning
    runs there instead, `bf16-mixed`."""
    cuda = uses_cuda(accelerator)
    resolved = resolve_precision(precision, cuda, cuda and torch.cuda.is_bf16_supported(including_emulation=False))
    if not cuda and resolved in ("16-mixed", "16"):
        log.warning("trainer.precision=%s needs CUDA; on a CPU Lightning runs bf16-mixed instead, which is what "
                    "this run records", precision)
        return "bf16-mixed"
    return resolved


def visible_devices(accelerator: str, devices: object = "auto") -> str:
    """The devices this run trains on: those `trainer.devices` picks (1 → GPU 0, 2 → 0,1, "1,3" or [1, 3] → those,
    -1 or auto → all) among the ones the launcher gave it (`CUDA_VISIBLE_DEVICES`, which Ray sets even where it
    only simulates GPUs), or `cpu`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible and not uses_cuda(accelerator):
        return "cpu"
    given = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    if isinstance(devices, str) and "," in devices:
        picked = [int(d) for d in devices.split(",") if d.strip()]
    elif isinstance(devices, list | tuple):
        picked = [int(d) for d in devices]
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.strip().lstrip("-").isdigit()):
        count = int(devices)
        picked = list(range(len(given) if count < 0 else min(count, len(given))))
    else:  # auto
        picked = list(range(len(given)))
    return ",".join(given[i] for i in picked if i < len(given)) or ",".join(given)


def strategy_for_sweep_job(strategy: object) -> object:
    """Lightning's `ddp` starts its other ranks by running the command line again: inside `train.py -m`
    that relaunches the whole sweep, and inside a Ray or submitit worker it is not a script at all. A
    sweep job therefore starts its ranks with `spawn`, which needs no command line."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return strategy  # SLURM started one process per rank itself (hydra.launcher.tasks_per_node)
    if isinstance(strategy, str) and strategy in _RELAUNCHING_DDP:
        return _RELAUNCHING_DDP[strategy]
    return strategy


@dataclass
class Runtime:
    """How a run executes once `auto` and the sweep context are resolved (logged and kept in metrics.json)."""

    accelerator: str
    devices: str
    precision: str
    strategy: Any
    sync_batchnorm: bool
    benchmark: bool = False
    collective_timeout_s: float | None = None  # DDP: a rank waiting longer than this in a collective fails the run

    def record(self) -> dict[str, str]:
        strategy = self.strategy if isinstance(self.strategy, str) else type(self.strategy).__name__
        return {"devices": self.devices, "accelerator": self.accelerator, "precision": self.precision,
                "strategy": strategy}


def check_collective_timeout(seconds: Any) -> float:
    """`distributed.collective_timeout_s` as a positive number of seconds."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        raise ConfigError(f"distributed.collective_timeout_s={seconds!r} must be a positive number of seconds (300, "
                          "the default, fails a run whose ranks wait 5 minutes for one another).")
    return value


def resolve_runtime(trainer: Any, in_sweep: bool, collective_timeout_s: Any = 300) -> Runtime:
    """The Trainer settings segx resolves itself, from the `trainer` config node (and the collective timeout)."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"trainer.accelerator={accelerator} (trainer=gpu) asks for a CUDA GPU, but PyTorch sees none here "
            f"(torch.cuda.is_available() is False{f'; CUDA_VISIBLE_DEVICES={visible}' if visible is not None else ''}"
            f", torch {torch.__version__} built for CUDA {torch.version.cuda or 'none'}). Leave out trainer=gpu "
            "(the default trainer.accelerator=auto trains on the CPU here), or run on a machine with a GPU."
        )
    cuda = uses_cuda(accelerator)
    configured = trainer.get("strategy", "auto")
    strategy = strategy_for_sweep_job(configured) if in_sweep else configured
    if strategy != configured:
        log.info("trainer.strategy=%s inside a multirun: starting the ranks with %s (Lightning's %s would re-run "
                 "the command line, i.e. the whole sweep)", configured, strategy, configured)
    sync_batchnorm = bool(trainer.get("sync_batchnorm")) and cuda
    if trainer.get("sync_batchnorm") and not cuda:
        log.info("trainer.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm); off for this CPU run")
    return Runtime(
        accelerator="cuda" if cuda else ("cpu" if accelerator == "auto" else accelerator),
        devices=visible_devices(accelerator, trainer.get("devices", "auto")),
        precision=precision_for(trainer.get("precision", "auto"), accelerator),
        strategy=strategy, sync_batchnorm=sync_batchnorm,
        benchmark=resolve_benchmark(trainer.get("benchmark"), cuda, bool(trainer.get("deterministic"))),
        collective_timeout_s=check_collective_timeout(collective_timeout_s),
    )


def resolve_benchmark(benchmark: bool | None, cuda: bool, deterministic: bool) -> bool:
    """`trainer.benchmark: null` → cudnn autotuning on CUDA: every batch has the same size, so the fastest
    convolution kernels are found once. Off on the CPU (no cudnn) and under `deterministic`, whose kernels
    autotuning could replace; an explicit true/false is kept."""
    if benchmark is not None:
        return bool(benchmark)
    return cuda and not deterministic


def processes_per_run(trainer: Any) -> int:
    """How many processes train this run (devices × nodes, or SLURM's tasks); `auto` devices count one."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, int):
        count = devices
    elif isinstance(devices, str) and devices.strip().isdigit():
        count = int(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    elif devices is not None and not isinstance(devices, str):
        count = len(list(devices))  # a list of device indices
    else:
        count = 1
    count *= int(trainer.get("num_nodes", 1) or 1)
    return max(count, int(os.environ.get("SLURM_NTASKS", "1")))


def choose_run_memory_format(setting: Any, net: nn.Module, runtime: Runtime, trainer: Any, batch_size: int,
                             image_size: int) -> MemoryFormat:
    """`run.channels_last` for this run (`segx.models.memory_format.choose_memory_format`). On a CPU `probe` times
    `net`'s training passes at the run's batch and image size, except under `trainer.deterministic` (a choice by
    timing would not repeat) and with several processes (each would time on its own, and DDP's gradient buckets
    need every rank in one format): then NCHW."""
    device = "cuda" if runtime.accelerator == "cuda" else runtime.accelerator
    if trainer.get("deterministic"):
        return choose_memory_format(setting, device, None, "trainer.deterministic, no timing probe")
    processes = processes_per_run(trainer)
    if processes > 1:
        return choose_memory_format(setting, device, None, f"{processes} processes, no timing probe")
    return choose_memory_format(setting, device, lambda: probe_channels_last(net, batch_size, image_size))
