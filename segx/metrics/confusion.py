"""Segmentation scores from a confusion matrix accumulated over a whole split.

Per-batch means (what the study's Keras metrics did) over-weight small batches and images with few
classes; summing one confusion matrix over the split and reducing once is the standard definition
(mmsegmentation, torchvision's reference scripts).

`ConfusionMatrix` counts with one `torch.bincount` over the labelled pixels, without weights: exact
integer counts, deterministic on CPU and CUDA (also under `torch.use_deterministic_algorithms(True)`,
which only forbids CUDA bincount *with* weights), and O(pixels) memory. torchmetrics'
`MulticlassConfusionMatrix` switches to a [pixels, C²] int64 comparison in deterministic mode
(about 0.9 GB for a batch of 16 at 128 px and 21 classes), which is why it is not used here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from segx.data.source import IGNORE_INDEX


class ConfusionMatrix(Metric):
    """Confusion matrix accumulated over batches (rows: ground truth, columns: prediction), int64 counts.

    `update(preds, target)` takes class indices of the same shape (or logits with a class dimension 1
    more than the target, reduced by argmax); pixels whose target is `ignore_index` are not counted.
    The `confmat` state is summed over the processes under DDP, as torchmetrics' metrics are.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ValueError(f"num_classes={num_classes} must be at least 1.")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.confmat: torch.Tensor
        self.add_state("confmat", torch.zeros(self.num_classes, self.num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.is_floating_point() and preds.dim() == target.dim() + 1:
            preds = preds.argmax(1)
        target, preds = target.reshape(-1).long(), preds.reshape(-1).long()
        if self.ignore_index is not None:
            labelled = target != self.ignore_index
            target, preds = target[labelled], preds[labelled]
        c = self.num_classes
        counts = torch.bincount(target * c + preds, minlength=c * c)  # no weights: deterministic on CUDA too
        if counts.numel() > c * c:
            raise ValueError(f"a target or prediction is >= num_classes={c} (and not ignore_index="
                             f"{self.ignore_index}): the labels do not match the classes.")
        self.confmat += counts.view(c, c)

    def compute(self) -> torch.Tensor:
        return self.confmat.clone()


def confusion_matrix_metric(num_classes: int, ignore_index: int = IGNORE_INDEX) -> ConfusionMatrix:
    """The split's confusion matrix accumulator (rows: ground truth, columns: prediction); syncs itself under DDP."""
    return ConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)


def per_class_iou(confmat: torch.Tensor) -> torch.Tensor:
    """IoU per class; NaN for a class absent from both ground truth and prediction."""
    confmat = confmat.double()
    tp = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def segmentation_scores(confmat: torch.Tensor, class_names: Sequence[str],
                        background_index: int | None = 0) -> dict[str, object]:
    """`pixel_acc` (micro), `miou`, `miou_no_bg` (every class but `background_index`; None for a dataset without
    a background class) and `per_class_iou` (name → IoU or None when the class is absent), and `pixels` (labelled
    pixels counted); absent classes are left out of means."""
    confmat = confmat.double()
    iou = per_class_iou(confmat)
    total = confmat.sum()
    pixel_acc = float(confmat.diag().sum() / total) if total > 0 else float("nan")
    return {
        "pixel_acc": pixel_acc,
        "miou": float(iou.nanmean()),
        "miou_no_bg": None if background_index is None else float(
            torch.cat([iou[:background_index], iou[background_index + 1:]]).nanmean()),
        "pixels": int(total),
        "per_class_iou": {
            name: (None if torch.isnan(v) else float(v)) for name, v in zip(class_names, iou, strict=True)
        },
    }
