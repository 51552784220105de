"""What bf16 inference changes on a CPU: a trained network's val labels and mIoU in bf16 against fp32, and the time.

`inference.precision=auto` predicts in bf16 on CPUs with bf16 units; this measures, on a network trained for the
purpose (the demo's U-Net on generated shapes), whether its labels agree with fp32's and how much faster they come.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from segx.inference.checkpoint import load_checkpoint, network_from_checkpoint, run_config
from segx.inference.predictor import Predictor, cpu_has_bf16_units
from segx.inference.timing import time_prediction
from segx.metrics import confusion_matrix_metric, segmentation_scores


def train_reference(workdir: Path, epochs: int, size: int) -> Path:
    """The demo's network trained on shapes (`train.py experiment=demo`) in a process of its own; its best.ckpt."""
    run_dir = workdir / f"precision-run-{size}px-{epochs}ep"
    best = run_dir / "checkpoints" / "best.ckpt"
    if best.is_file():  # trained by an earlier benchmark with the same settings
        return best
    command = [sys.executable, "-m", "segx.cli.train", "experiment=demo", f"data.root={workdir / 'precision-shapes'}",
               f"data.image_size={size}", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
               "logger=none", "callbacks.prediction_grid=null", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not best.is_file():
        raise RuntimeError(f"training the reference network failed ({done.returncode}):\n{done.stdout[-2000:]}"
                           f"\n{done.stderr[-2000:]}")
    return best


def _labels_and_scores(predictor: Predictor, images: torch.Tensor, masks: torch.Tensor, datamodule: Any
                       ) -> tuple[torch.Tensor, float]:
    confmat = confusion_matrix_metric(datamodule.num_classes, datamodule.ignore_index)
    labels = torch.cat([batch.cpu() for _, batch in predictor.labels(images)])
    confmat.update(labels, masks.long())
    scores = segmentation_scores(confmat.compute(), datamodule.class_names, datamodule.background_index)
    return labels, float(scores["miou"])


def bf16_agreement(ckpt: Path, passes: int = 3) -> dict[str, Any]:
    """For the trained network of `ckpt`, on its val split: `bf16_label_agreement` (the fraction of pixels labelled
    as fp32 labels them), `bf16_miou_difference` (|mIoU bf16 − mIoU fp32|) and `bf16_predict_speedup` (the timing
    protocol's fp32 seconds ÷ bf16's), both in channels_last."""
    checkpoint = load_checkpoint(ckpt)
    config = run_config(checkpoint)
    datamodule = instantiate(config.data)
    split = datamodule.load_split("val")
    net = network_from_checkpoint(checkpoint)
    device = torch.device("cpu")
    results: dict[str, Any] = {}
    labels: dict[str, torch.Tensor] = {}
    for precision in ("32-true", "bf16-mixed"):
        predictor = Predictor(net, device, precision, channels_last=True, normalize=datamodule.normalizer,
                              batch_size=64)
        labels[precision], results[f"miou_{precision}"] = _labels_and_scores(predictor, split.images, split.masks,
                                                                             datamodule)
        results[f"seconds_{precision}"] = time_prediction(predictor, split.images, passes=passes)["predict_val_seconds"]
    return {
        "bf16_label_agreement": float((labels["32-true"] == labels["bf16-mixed"]).float().mean()),
        "bf16_miou_difference": abs(results["miou_bf16-mixed"] - results["miou_32-true"]),
        "bf16_predict_speedup": results["seconds_32-true"] / results["seconds_bf16-mixed"],
        "cpu_bf16_units": cpu_has_bf16_units(), "images": len(split), "image_size": int(config.data.image_size),
        "network": config.model._target_, "checkpoint": str(ckpt), **results,
    }
