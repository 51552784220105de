"""Pictures of predictions: label maps in the VOC palette, and image | ground truth | prediction grids."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import make_grid

from segx.data.cache import resized_shape
from segx.data.voc_classes import VOC_PALETTE


def example_indices(count: int, total: int) -> torch.Tensor:
    """`count` image indices spread evenly over a split of `total`, the first and the last included: the first few
    of a video dataset are near-identical consecutive frames."""
    if count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, max(count, 1)).round().long()


def blank_padding(preds: torch.Tensor, original_sizes: torch.Tensor, resize: str, fill: int) -> torch.Tensor:
    """Predictions [N,S,S] with `fill` (the ignore index) where `data.resize=keep_ratio` padded the image: that band
    is never scored, and what a network predicts there means nothing."""
    if resize != "keep_ratio":
        return preds
    preds = preds.clone()
    size = int(preds.shape[-1])
    for pred, (height, width) in zip(preds, original_sizes.tolist(), strict=True):
        covered_h, covered_w = resized_shape(int(height), int(width), size, resize)
        pred[covered_h:, :] = fill
        pred[:, covered_w:] = fill
    return preds


def colorize(labels: torch.Tensor, palette: np.ndarray | None = None) -> torch.Tensor:
    """Integer labels [N,H,W] (0..255) → float RGB [N,3,H,W] in [0,1] in `palette`'s colours (uint8 [256, 3];
    default VOC's, where 255 is the cream void)."""
    colours = torch.as_tensor(VOC_PALETTE if palette is None else palette, device=labels.device,
                              dtype=torch.float32) / 255.0
    return colours[labels.long().clamp(0, 255)].permute(0, 3, 1, 2)


def prediction_grid(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor,
                    palette: np.ndarray | None = None) -> torch.Tensor:
    """One row per image: the image ([0,1] floats), its ground truth, the prediction. Returns [3,H',W']."""
    rows = torch.stack([images.float().cpu(), colorize(masks, palette).cpu(), colorize(preds, palette).cpu()], dim=1)
    return make_grid(rows.flatten(0, 1), nrow=3, padding=2, pad_value=1.0)
