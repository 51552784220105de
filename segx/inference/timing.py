"""The study's prediction-timing protocol: predict the whole val split with model and data already loaded.

The study reported the mean of 5 passes over VOC's 1,449 val images (U-Net 11.77 s, medium 9.85 s,
small 9.28 s on a Colab GPU). Here: `warmup` untimed passes (allocator, cudnn autotuning), then `passes`
timed ones, each ending with a CUDA synchronisation, through `segx.inference.predictor.Predictor` (inference mode,
the run's precision and memory format, large batches).
"""

from __future__ import annotations

import statistics
import time

import torch

from segx.inference.predictor import Predictor, autocast_for

__all__ = ["autocast_for", "time_prediction"]


def time_prediction(
    predictor: Predictor, images: torch.Tensor, passes: int = 5, warmup: int = 1,
) -> dict[str, float | int | list[float]]:
    """Seconds to predict (argmax labels of) every image in uint8 `images` [N,3,H,W], mean over `passes`."""
    if passes < 1 or warmup < 0:
        raise ValueError(f"need passes >= 1 and warmup >= 0, got {passes}, {warmup}")
    images = images.to(predictor.device)  # "data already loaded"

    def one_pass() -> float:
        start = time.perf_counter()
        for _ in predictor.labels(images):
            pass
        predictor.synchronize()
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
