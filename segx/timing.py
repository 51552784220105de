"""The study's prediction-timing protocol: predict the whole val split with model and data already loaded.

The study reported the mean of 5 passes over VOC's 1,449 val images (U-Net 11.77 s, medium 9.85 s,
small 9.28 s on a Colab GPU). Here: `warmup` untimed passes (allocator, cudnn autotuning), then `passes`
timed ones, each ending with a CUDA synchronisation, in inference mode and the run's precision.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Lightning's mixed precision as a context: autocast for `*-mixed`, nothing for `32-true`."""
    dtype = AUTOCAST_DTYPES.get(str(precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def time_prediction(
    net: nn.Module, images: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
    precision: str = "32-true", batch_size: int = 64, passes: int = 5, warmup: int = 1,
) -> dict[str, float | int | list[float]]:
    """Seconds to predict (argmax labels of) every image in uint8 `images` [N,3,H,W], mean over `passes`."""
    if passes < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need passes >= 1, warmup >= 0 and batch_size >= 1, got {passes}, {warmup}, {batch_size}")
    net = net.to(device).eval()
    images = images.to(device)  # "data already loaded"

    def one_pass() -> float:
        start = time.perf_counter()
        for begin in range(0, len(images), batch_size):
            with autocast_for(precision, device):
                net(normalize(images[begin:begin + batch_size])).argmax(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        one_pass()
    seconds = [one_pass() for _ in range(passes)]
    mean = statistics.fmean(seconds)
    return {
        "predict_val_seconds": mean,
        "predict_images_per_second": len(images) / mean,
        "predict_images": len(images),
        "predict_pass_seconds": seconds,
    }
