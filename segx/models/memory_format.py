"""`run.channels_last`: the memory format a network runs in, and the choice of it per device.

NHWC (channels_last) is faster on tensor-core GPUs; on CPUs it depends on the processor and the network (oneDNN's
NHWC kernels win on some, lose on others). `auto` is NHWC on CUDA and NCHW on a CPU, where a choice by timing
would make two runs of one config differ; `probe` times both formats on the network itself at start.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segx.core.errors import ConfigError, first_line
from segx.models.contract import unwrap

#: channels_last must beat NCHW by this factor to be chosen: NCHW is PyTorch's default, and a margin keeps a
#: network whose two formats run about equally fast from switching between runs on timing noise.
PROBE_MARGIN = 1.05
PROBE_BUDGET_S = 1.0  # the probe's timed passes stop once they have taken this long (at least one per format)
PROBE_ROUNDS = 3      # at most this many timed passes per format; the fastest of each is compared


CHOICES = ("auto", "probe", "true", "false")


def parse_channels_last(value: Any, key: str = "run.channels_last") -> bool | str:
    """`auto`, `probe`, true or false (also as the strings a command line gives); anything else is a ConfigError."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in CHOICES:
        return {"true": True, "false": False}.get(text, text)
    raise ConfigError(f"{key}={value!r} must be auto, probe, true or false (auto: on for CUDA, off on a CPU; "
                      "probe: on for CUDA, timed on a CPU).")


@dataclass(frozen=True)
class MemoryFormat:
    """The chosen format and why (for the log line and metrics.json)."""

    channels_last: bool
    reason: str
    speedup: float | None = None  # the probe's NCHW ÷ channels_last seconds, when it ran

    @property
    def torch_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        """E.g. `channels_last (auto: CUDA)` or `contiguous (probe: on this CPU 0.91x)`."""
        return f"{'channels_last' if self.channels_last else 'contiguous'} ({self.reason})"


def choose_memory_format(
    setting: Any, device: torch.device | str, probe: Callable[[], float] | None = None,
    no_probe: str = "no probe",
) -> MemoryFormat:
    """An explicit true/false wins; `auto` and `probe` are on for CUDA. On a CPU `auto` is off (NCHW, so runs of
    one config repeat bit for bit) and `probe` follows `probe` (the channels_last speedup of this network, see
    `probe_channels_last`), off where there is no probe (`no_probe` says why) or it fails."""
    setting = parse_channels_last(setting)
    if isinstance(setting, bool):
        return MemoryFormat(setting, f"run.channels_last={str(setting).lower()}")
    kind = device.type if isinstance(device, torch.device) else str(device)  # also a Lightning accelerator name
    if kind == "cuda":
        return MemoryFormat(True, f"{setting}: CUDA")
    if kind != "cpu":
        return MemoryFormat(False, f"{setting}: {kind}, not timed")
    if setting == "auto":
        return MemoryFormat(False, "auto: CPU, repeatable; run.channels_last=probe times both formats")
    if probe is None:
        return MemoryFormat(False, f"probe: {no_probe}")
    try:
        speedup = float(probe())
    except Exception as error:  # an operation without an NHWC kernel, out of memory, ...: keep the default
        return MemoryFormat(False, f"probe: the probe on this CPU failed ({first_line(error)})")
    return MemoryFormat(speedup >= PROBE_MARGIN, f"probe: on this CPU {speedup:.2f}x", speedup)


def probe_channels_last(
    net: nn.Module, batch_size: int, image_size: int, training: bool = True, in_channels: int = 3,
    budget_s: float = PROBE_BUDGET_S, rounds: int = PROBE_ROUNDS,
) -> float:
    """NCHW seconds ÷ channels_last seconds (> 1: channels_last is faster) of a forward pass, plus a backward
    one when `training`, of copies of `net` on the CPU. The batch shrinks below `batch_size` where one pass
    would take more than its share of `budget_s`, so a large network costs a few passes of two images. `net`
    and the random number generators are left as they were (the run stays reproducible)."""
    plain = copy.deepcopy(unwrap(net)).cpu().train(training)
    nhwc = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    plain = plain.to(memory_format=torch.contiguous_format)
    generator = torch.Generator().manual_seed(0)

    def images(batch: int) -> torch.Tensor:
        return torch.randn(batch, in_channels, image_size, image_size, generator=generator)

    def seconds(model: nn.Module, x: torch.Tensor) -> float:
        start = time.perf_counter()
        if training:
            model(x).float().mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model(x)
        return time.perf_counter() - start

    with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator
        smallest = min(2, int(batch_size))  # BatchNorm after a global pooling takes no single-image batch in training
        one = seconds(plain, images(smallest)) / smallest  # also the first (slow) call of each kernel
        share = budget_s / (2 * (rounds + 1))
        batch = max(smallest, min(int(batch_size), int(share / max(one, 1e-9))))
        x = images(batch)
        x_nhwc = x.contiguous(memory_format=torch.channels_last)
        seconds(plain, x)  # warm-up at the probe's batch size: kernels are chosen per shape
        seconds(nhwc, x_nhwc)
        timed: dict[bool, list[float]] = {False: [], True: []}
        start = time.perf_counter()
        for _ in range(max(1, int(rounds))):
            timed[False].append(seconds(plain, x))  # alternating: a drift of the machine's speed hits both
            timed[True].append(seconds(nhwc, x_nhwc))
            if time.perf_counter() - start > budget_s:
                break
    return min(timed[False]) / max(min(timed[True]), 1e-12)
