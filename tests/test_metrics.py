"""mIoU, pixel accuracy and per-class IoU against a confusion matrix computed by hand."""

from __future__ import annotations

import math

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
