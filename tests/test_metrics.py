"""mIoU, pixel accuracy and per-class IoU against a confusion matrix computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from segx.metrics import confusion_matrix_metric, per_class_iou, segmentation_scores

NAMES = ["background", "a", "b", "c"]


def test_scores_against_a_hand_computed_confusion_matrix() -> None:
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    preds = torch.tensor([[0, 1, 1, 1, 0, 2]])  # the 255 pixel's prediction must not count
    metric = confusion_matrix_metric(4)
    metric.update(preds, target)
    confmat = metric.compute()
    # rows: truth, columns: prediction; class 3 absent from both
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(confmat.cpu(), expected)
    scores = segmentation_scores(confmat, NAMES)
    iou_bg, iou_a, iou_b = 1 / 3, 2 / 3, 0.0
    assert math.isclose(scores["pixel_acc"], 3 / 5)
    assert math.isclose(scores["miou"], (iou_bg + iou_a + iou_b) / 3)  # absent class 3 left out
    assert math.isclose(scores["miou_no_bg"], (iou_a + iou_b) / 2)
    assert scores["per_class_iou"]["c"] is None
    assert math.isclose(scores["per_class_iou"]["a"], iou_a)


def test_a_class_only_predicted_counts_with_iou_zero() -> None:
    confmat = torch.tensor([[3, 1], [0, 0]])  # class 1 predicted once, never true
    iou = per_class_iou(confmat)
    assert math.isclose(float(iou[0]), 3 / 4)
    assert float(iou[1]) == 0.0


def test_accumulation_over_batches_equals_one_big_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (6, 8, 8), generator=generator)
    target[:, 0] = 255
    preds = torch.randint(0, 4, (6, 8, 8), generator=generator)
    whole, parts = confusion_matrix_metric(4), confusion_matrix_metric(4)
    whole.update(preds, target)
    for i in range(0, 6, 4):  # uneven batches: a per-batch mean would differ
        parts.update(preds[i:i + 4], target[i:i + 4])
    assert torch.equal(whole.compute(), parts.compute())
    assert int(whole.compute().sum()) == 6 * 7 * 8


def test_matches_torchmetrics_and_runs_under_deterministic_algorithms() -> None:
    from torchmetrics.classification import MulticlassConfusionMatrix

    generator = torch.Generator().manual_seed(1)
    target = torch.randint(0, 21, (4, 24, 24), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = 255
    preds = torch.randint(0, 21, (4, 24, 24), generator=generator)
    reference = MulticlassConfusionMatrix(num_classes=21, ignore_index=255, validate_args=False)
    reference.update(preds, target)
    torch.use_deterministic_algorithms(True)
    try:
        metric = confusion_matrix_metric(21)
        metric.update(preds, target)
        metric.update(preds[:1], target[:1])  # accumulates
        confmat = metric.compute()
    finally:
        torch.use_deterministic_algorithms(False)
    reference.update(preds[:1], target[:1])
    assert confmat.dtype == torch.int64
    assert torch.equal(confmat, reference.compute().long())
    assert int(confmat.sum()) == int((target != 255).sum() + (target[:1] != 255).sum())
    metric.reset()
    assert int(metric.confmat.sum()) == 0


def test_states_merge_by_sum_as_ddp_does() -> None:
    generator = torch.Generator().manual_seed(2)
    target = torch.randint(0, 4, (4, 8, 8), generator=generator)
    preds = torch.randint(0, 4, (4, 8, 8), generator=generator)
    whole, rank0, rank1 = confusion_matrix_metric(4), confusion_matrix_metric(4), confusion_matrix_metric(4)
    whole.update(preds, target)
    rank0.update(preds[:2], target[:2])
    rank1.update(preds[2:], target[2:])
    rank0.merge_state(rank1)  # the state's dist_reduce_fx, the one DDP's sync applies
    assert torch.equal(rank0.compute(), whole.compute())


def test_labels_outside_the_classes_are_refused() -> None:
    metric = confusion_matrix_metric(4)
    with pytest.raises(ValueError, match="num_classes=4"):
        metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))
