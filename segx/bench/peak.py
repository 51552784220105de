"""The device's dense peak, measured: the highest FLOP/s of a large matmul and of a large 3 × 3 convolution.

A matmul alone understates a CPU: oneDNN's channels_last convolution can run closer to the vector units'
limit than the BLAS sgemm. Both run in the dtype training uses (fp32 on the CPU, bf16 on a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """The fastest of `repeats` timed calls after `warmup` untimed ones, each ended by a device synchronisation."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def conv3x3_rate(batch: int, channels: int, side: int, device: torch.device, dtype: torch.dtype,
                 repeats: int) -> float:
    """FLOP/s of a `channels` → `channels` 3 × 3 convolution over [batch, channels, side, side], channels_last."""
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    flops = 2 * batch * channels * channels * 9 * side * side
    return flops / best_seconds(lambda: F.conv2d(x, w, padding=1), device, repeats)


@torch.inference_mode()
def device_peak(device: torch.device, repeats: int = 5) -> dict[str, float | str]:
    """GFLOP/s of the best of two square matmuls and of two 512-channel 3 × 3 convolution shapes (channels_last),
    and their maximum: the higher the peak, the more honest every fraction of it."""
    dtype = peak_dtype(device)
    cuda = device.type == "cuda"
    matmul = 0.0
    for n in ((8192, 16384) if cuda else (1024, 2048)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        matmul = max(matmul, 2 * n**3 / best_seconds(lambda a=a, b=b: a @ b, device, repeats))
    shapes = ((64, 512, 32), (256, 512, 16)) if cuda else ((8, 512, 32), (32, 512, 16))
    conv = max(conv3x3_rate(batch, channels, side, device, dtype, repeats) for batch, channels, side in shapes)
    return {"dtype": str(dtype).removeprefix("torch."), "matmul_gflops": matmul / 1e9, "conv3x3_gflops": conv / 1e9,
            "peak_gflops": max(matmul, conv) / 1e9}
