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


@torch.inference_mode()
def device_peak(device: torch.device, repeats: int = 3) -> dict[str, float | str]:
    """GFLOP/s of a square matmul and of a 512-channel 3 × 3 convolution (channels_last), and their maximum."""
    dtype = peak_dtype(device)
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul = 2 * n**3 / best_seconds(lambda: a @ b, device, repeats)
    batch, channels, side = (64 if cuda else 8), 512, 32
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    conv_flops = 2 * batch * channels * channels * 9 * side * side
    conv = conv_flops / best_seconds(lambda: F.conv2d(x, w, padding=1), device, repeats)
    return {"dtype": str(dtype).removeprefix("torch."), "matmul_gflops": matmul / 1e9, "conv3x3_gflops": conv / 1e9,
            "peak_gflops": max(matmul, conv) / 1e9}
