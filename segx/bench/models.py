"""Per-model figures: parameters, forward GFLOPs per image, training and prediction images/s; and the study's
prediction protocol (`predict_val_seconds`) for its three U-Nets."""

from __future__ import annotations

from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from segx.bench.loop import CONF_DIR, training_step
from segx.bench.peak import best_seconds
from segx.inference.predictor import Predictor
from segx.inference.timing import time_prediction
from segx.models import build_network, forward_flops, parameter_counts

STUDY_VAL_IMAGES = 1449  # VOC 2012 val, which the study predicted (mean of 5 passes)


def model_names() -> list[str]:
    """Every model config shipped in conf/model/."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def model_config(name: str) -> DictConfig:
    """conf/model/<name>.yaml as training composes it; pretrained weights off (nothing is downloaded)."""
    overrides = [f"model={name}"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if "encoder_weights" in cfg.model:
        cfg.model.encoder_weights = None
    return cfg.model


def train_step_seconds(net: torch.nn.Module, batch: int, size: int, device: torch.device, precision: str,
                       channels_last: bool, repeats: int) -> float:
    """Fastest forward + cross-entropy + backward + Adam step on a random batch."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 21, (batch, size, size), device=device)
    step = training_step(net, precision, lr=1e-4)
    return best_seconds(lambda: step(x, y), device, repeats)


def model_row(name: str, batch: int, size: int, device: torch.device, precision: str, repeats: int) -> dict[str, Any]:
    """One row of the `models` table."""
    cfg = model_config(name)
    torch.manual_seed(0)
    net = build_network(cfg, {"channels_last": True}).to(device)
    counts = parameter_counts(net)
    flops = forward_flops(build_network(cfg), size)
    step = train_step_seconds(net, batch, size, device, precision, True, repeats)
    predictor = Predictor(net, device, precision, channels_last=True, batch_size=batch)
    images = torch.randint(0, 256, (2 * batch, 3, size, size), dtype=torch.uint8, device=device)
    predict = time_prediction(predictor, images, passes=repeats, warmup=1)
    return {"model": name, "parameters": counts["total"], "trainable": counts["trainable"],
            "forward_gflops_per_image": flops / 1e9, "train_images_per_second": batch / step,
            "predict_images_per_second": predict["predict_images_per_second"]}


def channels_last_speedup(name: str, batch: int, size: int, device: torch.device, precision: str,
                          repeats: int) -> dict[str, float]:
    """channels_last ÷ NCHW speed of a forward pass and of a training step, side by side."""
    result: dict[str, float] = {}
    seconds: dict[bool, dict[str, float]] = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        net = build_network(model_config(name), {"channels_last": channels_last}).to(device)
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        predictor = Predictor(net, device, precision, channels_last=channels_last, batch_size=batch)
        forward = best_seconds(lambda p=predictor, x=images: p.logits(x), device, repeats)
        step = train_step_seconds(net, batch, size, device, precision, channels_last, repeats)
        seconds[channels_last] = {"forward": forward, "train_step": step}
    for key in ("forward", "train_step"):
        result[f"{key}_speedup"] = seconds[False][key] / seconds[True][key]
        result[f"{key}_seconds_nchw"], result[f"{key}_seconds_channels_last"] = seconds[False][key], seconds[True][key]
    result["model"], result["batch_size"] = name, batch  # type: ignore[assignment]
    return result


def predict_val_seconds(names: list[str], images: torch.Tensor, device: torch.device, precision: str,
                        batch_size: int, passes: int = 5) -> dict[str, Any]:
    """The study's protocol per model on `images` (uint8, data already loaded): warm-up, mean of `passes`,
    scaled to VOC val's 1,449 images when fewer were timed."""
    seconds, timed = {}, {}
    for name in names:
        torch.manual_seed(0)
        predictor = Predictor(build_network(model_config(name)), device, precision, batch_size=batch_size)
        result = time_prediction(predictor, images, passes=passes, warmup=1)
        timed[name] = result["predict_val_seconds"]
        seconds[name] = result["predict_val_seconds"] * STUDY_VAL_IMAGES / len(images)
    return {"seconds": seconds, "images_timed": len(images), "scaled_to": STUDY_VAL_IMAGES,
            "timed_seconds": timed, "passes": passes, "batch_size": batch_size}
