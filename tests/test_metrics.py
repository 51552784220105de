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


def test_labels_outside_the_classes_are_refused_once_the_split_is_counted() -> None:
    metric = confusion_matrix_metric(4)
    metric.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 7, 255]]))  # no read back while training
    with pytest.raises(ValueError, match="1 pixels have a target or prediction >= num_classes=4"):
        metric.compute()


def _bincount_reference(preds: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """The counting it replaced: a boolean mask, then one bincount (both size their output from the data)."""
    labelled = target != 255
    return torch.bincount(target[labelled] * classes + preds[labelled], minlength=classes ** 2).view(classes, -1)


def test_counting_needs_no_value_from_the_device() -> None:
    """On the meta device tensors have shapes but no values: an op whose output size depends on the data (a boolean
    mask, bincount) or a `.item()` fails there, and on CUDA each of those waits for the GPU every step. The update
    runs there (the counting it replaced does not), and counts as it did, exactly."""
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 21, (4, 24, 24), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = 255
    preds = torch.randint(0, 21, (4, 24, 24), generator=generator)
    on_meta = confusion_matrix_metric(21).to("meta")
    on_meta.update(preds.to("meta"), target.to("meta"))
    assert on_meta.confmat.shape == (21, 21)
    with pytest.raises(NotImplementedError, match="nonzero"):
        _bincount_reference(preds.to("meta"), target.to("meta"), 21)
    metric = confusion_matrix_metric(21)
    metric.update(preds, target)
    metric.update(preds, target)
    assert torch.equal(metric.compute(), 2 * _bincount_reference(preds, target, 21))


@pytest.mark.parametrize("name", ["dice", "jaccard", "tversky"])
def test_the_overlap_losses_need_no_value_from_the_device(name: str) -> None:
    from omegaconf import OmegaConf

    from segx.training.losses import build_loss

    loss = build_loss(OmegaConf.create({"_target_": f"segx.training.losses.{name.capitalize()}Loss"}))
    target = torch.randint(0, 4, (2, 8, 8), device="meta")
    assert loss(torch.randn(2, 4, 8, 8, device="meta"), target).shape == ()
