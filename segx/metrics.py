"""Segmentation scores from a confusion matrix accumulated over a whole split.

Per-batch means (what the study's Keras metrics did) over-weight small batches and images with few
classes; summing one confusion matrix over the split and reducing once is the standard definition
(mmsegmentation, torchvision's reference scripts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from segx.data.voc import IGNORE_INDEX


def confusion_matrix_metric(num_classes: int, ignore_index: int = IGNORE_INDEX) -> MulticlassConfusionMatrix:
    """torchmetrics accumulator (rows: ground truth, columns: prediction); syncs itself under DDP."""
    return MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)


def per_class_iou(confmat: torch.Tensor) -> torch.Tensor:
    """IoU per class; NaN for a class absent from both ground truth and prediction."""
    confmat = confmat.double()
    tp = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def segmentation_scores(confmat: torch.Tensor, class_names: Sequence[str]) -> dict[str, object]:
    """`pixel_acc` (micro), `miou`, `miou_no_bg` (classes 1.., background being class 0) and
    `per_class_iou` (name → IoU or None when the class is absent), and `pixels` (labelled pixels counted);
    absent classes are left out of means."""
    confmat = confmat.double()
    iou = per_class_iou(confmat)
    total = confmat.sum()
    pixel_acc = float(confmat.diag().sum() / total) if total > 0 else float("nan")
    return {
        "pixel_acc": pixel_acc,
        "miou": float(iou.nanmean()),
        "miou_no_bg": float(iou[1:].nanmean()),
        "pixels": int(total),
        "per_class_iou": {
            name: (None if torch.isnan(v) else float(v)) for name, v in zip(class_names, iou, strict=True)
        },
    }
