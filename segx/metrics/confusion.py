"""Segmentation scores from a confusion matrix accumulated over a whole split.

Per-batch means (what the study's Keras metrics did) over-weight small batches and images with few
classes; summing one confusion matrix over the split and reducing once is the standard definition
(mmsegmentation, torchvision's reference scripts).

`ConfusionMatrix` counts every pixel into a fixed set of c·c + 2 bins with one 1-D `scatter_add_` (ignored
pixels into one extra bin, labels outside the classes into another): exact integer counts, deterministic on CPU
and CUDA (also under `torch.use_deterministic_algorithms(True)`), O(pixels) memory, and no read back to the host
during training (a boolean mask or a `bincount` sizes its output from the data, which waits for the GPU on every
step). torchmetrics' `MulticlassConfusionMatrix` switches to a [pixels, C²] int64 comparison in deterministic
mode (about 0.9 GB for a batch of 16 at 128 px and 21 classes), which is why it is not used here.
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
        self.outside: torch.Tensor
        self.add_state("confmat", torch.zeros(self.num_classes, self.num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")
        # pixels whose target or prediction lies outside the classes (and is not ignore_index), told at compute
        self.add_state("outside", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.is_floating_point() and preds.dim() == target.dim() + 1:
            preds = preds.argmax(1)
        target, preds = target.reshape(-1).long(), preds.reshape(-1).long()
        c = self.num_classes
        inside = (target >= 0) & (target < c) & (preds >= 0) & (preds < c)
        ignored = target == self.ignore_index if self.ignore_index is not None else torch.zeros_like(inside)
        bins = torch.where(inside, target * c + preds, torch.where(ignored, c * c, c * c + 1))
        counts = torch.zeros(c * c + 2, dtype=torch.long, device=bins.device)
        counts.scatter_add_(0, bins, torch.ones_like(bins))  # 1-D: deterministic on CUDA too
        self.confmat += counts[: c * c].view(c, c)
        self.outside += counts[c * c + 1]

    def compute(self) -> torch.Tensor:
        if int(self.outside):  # read once a split, not once a step
            raise ValueError(f"{int(self.outside)} pixels have a target or prediction >= num_classes="
                             f"{self.num_classes} (and not ignore_index={self.ignore_index}): the labels do not "
                             "match the classes.")
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


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator per class, NaN where the denominator is 0 (the score is undefined there)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), torch.full_like(numerator,
                                                                                                 float("nan")))


def per_class_scores(confmat: torch.Tensor, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """IoU, Dice, precision, recall (= class accuracy) and F-beta of every class, NaN where a score is undefined
    (IoU, Dice and F-beta: the class is in neither ground truth nor prediction; precision: never predicted;
    recall: not in the ground truth)."""
    confmat = confmat.double()
    tp = confmat.diag()
    predicted, labelled = confmat.sum(0), confmat.sum(1)
    precision, recall = _ratio(tp, predicted), _ratio(tp, labelled)
    b2 = float(beta) ** 2
    # F-beta from the counts, (1+β²)tp / (β²·labelled + predicted), rather than from precision and recall
    # (mmsegmentation's way): a class that is labelled but never predicted then scores 0, as its Dice does, instead
    # of being left out of the mean because its precision is undefined. At β = 1 it is the Dice, class by class.
    fscore = _ratio((1 + b2) * tp, b2 * labelled + predicted)
    scores = (per_class_iou(confmat), _ratio(2 * tp, predicted + labelled), precision, recall, fscore)
    return dict(zip(PER_CLASS_SCORES, scores, strict=True))


def _named(values: torch.Tensor, class_names: Sequence[str]) -> dict[str, float | None]:
    return {name: (None if torch.isnan(v) else float(v)) for name, v in zip(class_names, values, strict=True)}


#: The scores `per_class_scores` gives each class.
PER_CLASS_SCORES = ("iou", "dice", "precision", "recall", "fscore")
#: The means `segmentation_scores` returns beside mIoU, and the per-class score each is the mean of.
MEANS = {"mdice": "dice", "mprecision": "precision", "mrecall": "recall", "macc": "recall", "mfscore": "fscore"}


def segmentation_scores(confmat: torch.Tensor, class_names: Sequence[str],
                        background_index: int | None = 0, beta: float = 1.0) -> dict[str, object]:
    """`pixel_acc` (micro), `miou`, `miou_no_bg` (every class but `background_index`; None for a dataset without
    a background class), `mdice`, `mprecision`, `mrecall`, `macc` (class accuracy: the mean recall), `mfscore`
    (F-beta), each class's scores under `per_class_<score>` (name → value, None where undefined), and `pixels`
    (labelled pixels counted). A class whose score is undefined is left out of that score's mean."""
    confmat = confmat.double()
    per_class = per_class_scores(confmat, beta)
    iou = per_class["iou"]
    total = confmat.sum()
    pixel_acc = float(confmat.diag().sum() / total) if total > 0 else float("nan")
    scores: dict[str, object] = {
        "pixel_acc": pixel_acc,
        "miou": float(iou.nanmean()),
        "miou_no_bg": None if background_index is None else float(
            torch.cat([iou[:background_index], iou[background_index + 1:]]).nanmean()),
        "pixels": int(total),
        "fscore_beta": float(beta),
    }
    scores.update({mean: float(per_class[score].nanmean()) for mean, score in MEANS.items()})
    for score, values in per_class.items():
        scores[f"per_class_{score}"] = _named(values, class_names)
    return scores
