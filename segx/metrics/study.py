"""The study's two Keras IoU metrics, read exactly as its code computed them, to reproduce its curves.

Neither is a mean IoU. `MeanIoU(21)` was fed one-hot labels and softmax probabilities without an argmax: it
cast both to integers (a probability below 1.0 becomes 0) and counted the flattened one-hot *entries*, so only
classes 0 and 1 of its 21×21 matrix fill and it reads 10/21 = 0.4762 for any prediction whose probabilities stay
below 1.0, from all-background to perfect. `new_mean_iou` is a soft IoU of probabilities per image, averaged
over the batch and then over the epoch's batches. segx's real scores are `segx.metrics.confusion`'s.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from segx.data.source import IGNORE_INDEX


def _labelled(target: torch.Tensor, num_classes: int, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with every unlabelled pixel set to 0, mask of the pixels whose one-hot row is not all zero).

    The study's one-hot encoding gives an all-zero row to `ignore_index` and to any value outside 0..C-1.
    """
    target = target.long()
    labelled = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        labelled &= target != ignore_index
    return target.masked_fill(~labelled, 0), labelled


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities in float32, as the study's networks ended in a float32 softmax."""
    return logits.detach().float().softmax(dim=1)


class StudyMeanIoU(Metric):
    """`tf.keras.metrics.MeanIoU(num_classes)` as the study called it: on one-hot labels and softmax probabilities.

    Of the flattened entries of the one-hot labels t and the probabilities truncated to integers (1 only where a
    probability is exactly 1.0 in float32), it counts the 2×2 confusion of values 0/1 — the only cells of Keras'
    num_classes×num_classes matrix that fill — over the epoch, as int64 (summed over DDP ranks), and returns the
    mean IoU over the classes whose union is non-zero. `update(logits [N,C,H,W], target [N,H,W])`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes={num_classes} must be at least 2 (Keras' matrix holds the values 0 and 1).")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.confmat: torch.Tensor
        self.add_state("confmat", torch.zeros(2, 2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch's one-hot entries: rows the label entry (0/1), columns the truncated probability."""
        channels = logits.shape[1]
        labels, labelled = _labelled(target, channels, self.ignore_index)
        saturated = _softmax(logits) >= 1.0  # int(p) for p in [0, 1]: at most one class per pixel
        hits = saturated.gather(1, labels.unsqueeze(1)).squeeze(1) & labelled
        entries = logits.numel()  # pixels × classes: a shape, no device sync
        ones_true, ones_pred, both = labelled.sum(), saturated.sum(), hits.sum()
        counts = torch.stack([entries - ones_true - ones_pred + both, ones_pred - both, ones_true - both, both])
        self.confmat += counts.view(2, 2)

    def compute(self) -> torch.Tensor:
        """Mean IoU over the classes (values 0 and 1) whose union is non-zero; 0 if none is (divide_no_nan)."""
        confmat = self.confmat.double()
        tp = confmat.diag()
        union = confmat.sum(0) + confmat.sum(1) - tp
        valid = union > 0
        iou = torch.where(valid, tp / union.clamp(min=1), torch.zeros_like(tp))
        count = valid.sum()
        return torch.where(count > 0, iou.sum() / count.clamp(min=1), torch.zeros_like(iou.sum())).float()


def study_iou_no_background(
    logits: torch.Tensor, target: torch.Tensor, background_index: int | None = 0,
    ignore_index: int | None = IGNORE_INDEX, smooth: float = 1e-3,
) -> torch.Tensor:
    """The study's `new_mean_iou` of one batch (float32; NaN if no kept class has a union anywhere)."""
    probs = _softmax(logits)
    labels, labelled = _labelled(target, probs.shape[1], ignore_index)
    one_hot = torch.zeros_like(probs).scatter_(1, labels.unsqueeze(1), labelled.unsqueeze(1).float())
    intersection = (one_hot * probs).abs().sum(dim=(2, 3))  # [N, C], as K.sum(K.abs(y_true * y_pred), (1, 2))
    union = one_hot.abs().sum(dim=(2, 3)) + probs.abs().sum(dim=(2, 3)) - intersection
    iou = (intersection + smooth) / (union + smooth)
    mask = (union != 0).float()
    if background_index is not None:  # the study's `metric[:, 1:]`: background dropped
        b = background_index
        iou, mask = torch.cat([iou[:, :b], iou[:, b + 1:]], dim=1), torch.cat([mask[:, :b], mask[:, b + 1:]], dim=1)
    class_count = mask.sum(dim=0)
    non_zero = class_count > 0  # tf.boolean_mask(…, non_zero) then K.mean, without a host sync
    per_class = (iou * mask).sum(dim=0) / class_count.clamp(min=1)
    return (per_class * non_zero).sum() / non_zero.sum()


class StudyIoUNoBackground(Metric):
    """The study's `new_mean_iou` (a soft IoU of probabilities per image, background dropped) as Keras reported
    it: the mean of its per-batch values over the epoch. `update(logits [N,C,H,W], target [N,H,W])`."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, background_index: int | None = 0, ignore_index: int | None = IGNORE_INDEX,
                 smooth: float = 1e-3, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.background_index = background_index
        self.ignore_index = ignore_index
        self.smooth = float(smooth)
        self.total: torch.Tensor
        self.batches: torch.Tensor
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("batches", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch's `new_mean_iou`."""
        self.total += study_iou_no_background(logits, target, self.background_index, self.ignore_index,
                                              self.smooth).double()
        self.batches += 1

    def compute(self) -> torch.Tensor:
        """The mean of the batch values (NaN before any batch)."""
        return (self.total / self.batches).float()
