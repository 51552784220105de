"""The study's two Keras IoU readings (segx.metrics.study) against Keras itself: `keras.metrics.MeanIoU(21)` fed
one-hot labels and softmax probabilities as the study's `train()` fed it, and the study's `new_mean_iou` in
keras.ops averaged over batches by `keras.metrics.Mean`; then the module logging them over a real epoch."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from segx.metrics import StudyIoUNoBackground, StudyMeanIoU
from segx.training.losses import CrossEntropyLoss
from segx.training.module import SegmentationModule

C, VOID, BATCHES = 21, 255, 3
STUDY_KEYS = {"train/study_meaniou", "val/study_meaniou", "train/study_iou_no_bg", "val/study_iou_no_bg"}


def _batch(case: str, seed: int, void: bool = True, n: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [n,C,size,size] and labels of one kind of prediction, with a void row (255) unless `void=False`."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (n, size, size), generator=generator)
    target[0, : size // 2] = 0  # background, as in VOC
    noise = torch.randn(n, C, size, size, generator=generator)
    if case == "random":
        logits = 2.0 * noise
    elif case == "all_background":  # p(background) ≈ 0.5 everywhere: below 1.0
        logits = 0.1 * noise
        logits[:, 0] += 3.0
    elif case == "perfect":  # the argmax is the label everywhere, its probability ≈ 0.7 < 1.0
        logits = 0.1 * noise + 4.0 * torch.nn.functional.one_hot(target, C).permute(0, 3, 1, 2)
    elif case == "saturated":  # float32 softmax rounds to exactly 1.0: right on even columns, random on odd ones
        winner = torch.where(torch.arange(size) % 2 == 0, target, torch.randint(0, C, target.shape,
                                                                                  generator=generator))
        logits = noise + 100.0 * torch.nn.functional.one_hot(winner, C).permute(0, 3, 1, 2)
    else:
        raise ValueError(case)
    if void:
        target[:, -1] = VOID  # their predictions still count in Keras' readings (all-zero one-hot rows)
    return logits, target


def _keras_inputs(keras: Any, logits: torch.Tensor, target: torch.Tensor) -> tuple[Any, Any]:
    """(one-hot labels [N,H,W,C], all zero at void pixels, softmax probabilities [N,H,W,C]) as the study had them."""
    labelled = (target >= 0) & (target < C)
    one_hot = torch.nn.functional.one_hot(target.masked_fill(~labelled, 0), C).float() * labelled.unsqueeze(-1)
    probs = keras.ops.softmax(keras.ops.convert_to_tensor(logits.permute(0, 2, 3, 1).numpy()), axis=-1)
    return keras.ops.convert_to_tensor(one_hot.numpy()), probs


def _new_mean_iou(keras: Any, y_true: Any, y_pred: Any, drop_last: bool = True) -> Any:
    """The study's `new_mean_iou` in keras.ops: K.* → ops.*, tf.boolean_mask + K.mean → sums over `non_zero`."""
    ops = keras.ops
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    axes = (1, 2)
    intersection = ops.sum(ops.abs(y_true * y_pred), axis=axes)
    mask_sum = ops.sum(ops.abs(y_true), axis=axes) + ops.sum(ops.abs(y_pred), axis=axes)
    union = mask_sum - intersection
    smooth = 0.001
    iou = (intersection + smooth) / (union + smooth)
    metric = iou
    mask = ops.cast(ops.not_equal(union, 0), "float32")
    if drop_last:
        metric = metric[:, 1:]
        mask = mask[:, 1:]
    class_count = ops.sum(mask, axis=0)
    non_zero = ops.greater(class_count, 0)
    non_zero_sum = ops.sum(metric * mask, axis=0)  # tf.boolean_mask(…, non_zero): kept where non_zero below
    non_zero_count = ops.where(non_zero, class_count, 1.0)
    kept = ops.cast(non_zero, "float32")
    return ops.sum(kept * non_zero_sum / non_zero_count) / ops.sum(kept)  # K.mean over the kept: NaN if none


def _run(keras: Any, case: str, void: bool = True) -> tuple[float, float, float, float]:
    """(Keras MeanIoU, segx StudyMeanIoU, Keras Mean of new_mean_iou, segx StudyIoUNoBackground) over BATCHES."""
    keras_iou, keras_mean = keras.metrics.MeanIoU(num_classes=C), keras.metrics.Mean()
    ours_iou, ours_no_bg = StudyMeanIoU(C, VOID), StudyIoUNoBackground(0, VOID)
    for seed in range(BATCHES):
        logits, target = _batch(case, seed, void)
        y_true, y_pred = _keras_inputs(keras, logits, target)
        keras_iou.update_state(y_true, y_pred)  # as the study's compile(metrics=[MeanIoU(21)]): no argmax
        keras_mean.update_state(_new_mean_iou(keras, y_true, y_pred))
        ours_iou.update(logits, target)
        ours_no_bg.update(logits, target)
    return (float(keras_iou.result()), float(ours_iou.compute()), float(keras_mean.result()),
            float(ours_no_bg.compute()))


@pytest.mark.parametrize("void", [True, False], ids=["void", "no_void"])
@pytest.mark.parametrize("case", ["random", "all_background", "perfect", "saturated"])
def test_both_readings_match_keras(keras: Any, case: str, void: bool) -> None:
    keras_iou, ours_iou, keras_no_bg, ours_no_bg = _run(keras, case, void)
    assert math.isclose(ours_iou, keras_iou, rel_tol=1e-6, abs_tol=1e-7), (ours_iou, keras_iou)
    assert math.isclose(ours_no_bg, keras_no_bg, rel_tol=1e-5, abs_tol=1e-6), (ours_no_bg, keras_no_bg)
    if case != "saturated":
        if not void:  # every prediction below probability 1.0 reads 10/21, all-background and perfect alike
            assert math.isclose(ours_iou, 10 / 21, rel_tol=1e-6)
    else:
        assert not math.isclose(ours_iou, 10 / 21, rel_tol=1e-3)  # it moves once probabilities round to 1.0
    if case == "perfect":  # the soft IoU is not 1 for a perfect argmax either
        assert ours_no_bg < 0.8


def test_all_saturated_background_gives_nan_as_the_study_did(keras: Any) -> None:
    """Background labels predicted with probability exactly 1.0: every other class' soft union is 0, so
    `new_mean_iou` takes the mean of nothing (NaN); MeanIoU counts only the value-0 entries then (IoU 1)."""
    logits = torch.zeros(2, C, 4, 4)
    logits[:, 0] = 200.0
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    y_true, y_pred = _keras_inputs(keras, logits, target)
    keras_mean, keras_iou = keras.metrics.Mean(), keras.metrics.MeanIoU(num_classes=C)
    keras_mean.update_state(_new_mean_iou(keras, y_true, y_pred))
    keras_iou.update_state(y_true, y_pred)
    no_bg, iou = StudyIoUNoBackground(), StudyMeanIoU(C)
    no_bg.update(logits, target)
    iou.update(logits, target)
    assert math.isnan(float(keras_mean.result())) and math.isnan(float(no_bg.compute()))
    assert math.isclose(float(iou.compute()), float(keras_iou.result()), rel_tol=1e-6)


def test_states_are_integer_counts_and_batch_sums_merged_as_ddp_does() -> None:
    """Two ranks' states summed (torchmetrics' DDP reduction) give the reading of all their batches."""
    whole_iou, whole_no_bg = StudyMeanIoU(C), StudyIoUNoBackground()
    ranks = [(StudyMeanIoU(C), StudyIoUNoBackground()) for _ in range(2)]
    for seed in range(4):
        logits, target = _batch("saturated", seed)
        whole_iou.update(logits, target)
        whole_no_bg.update(logits, target)
        for metric in ranks[seed % 2]:
            metric.update(logits, target)
    assert whole_iou.confmat.dtype == torch.long
    assert int(whole_iou.confmat.sum()) == 4 * 2 * C * 8 * 8  # every one-hot entry once
    for mine, other in zip(*ranks, strict=True):
        mine.merge_state(other)  # the states' dist_reduce_fx, the one DDP's sync applies
    assert torch.equal(ranks[0][0].compute(), whole_iou.compute())
    torch.testing.assert_close(ranks[0][1].compute(), whole_no_bg.compute())


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, C, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


def _loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(6, 3, 8, 8, generator=generator)
    masks = torch.randint(0, C, (6, 8, 8), generator=generator)
    masks[:, 0] = VOID
    return DataLoader(TensorDataset(images, masks), batch_size=2)


@pytest.mark.parametrize("study_metrics", [True, False])
def test_the_module_logs_the_study_readings_only_when_asked(study_metrics: bool, tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = SegmentationModule(_TinyNet(), CrossEntropyLoss(), optimizer={"_target_": "torch.optim.SGD", "lr": 0.1},
                                study_metrics=study_metrics)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, train_dataloaders=_loader(0), val_dataloaders=_loader(1))
    logged = STUDY_KEYS & set(trainer.callback_metrics)
    if not study_metrics:
        assert logged == set()
        return
    assert logged == STUDY_KEYS
    # The val readings are the epoch's, with the trained weights, over all its batches (the sanity check's reset).
    expected_iou, expected_no_bg = StudyMeanIoU(C), StudyIoUNoBackground()
    with torch.no_grad():
        for images, masks in _loader(1):
            logits = module(images)
            expected_iou.update(logits, masks)
            expected_no_bg.update(logits, masks)
    torch.testing.assert_close(trainer.callback_metrics["val/study_meaniou"], expected_iou.compute())
    torch.testing.assert_close(trainer.callback_metrics["val/study_iou_no_bg"], expected_no_bg.compute())


def test_no_background_no_iou_without_background() -> None:
    module = SegmentationModule(_TinyNet(), CrossEntropyLoss(), optimizer={"_target_": "torch.optim.SGD", "lr": 0.1},
                                background_index=None, study_metrics=True)
    assert set(module._study_metrics("val")) == {"val/study_meaniou"}
