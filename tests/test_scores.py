"""The scores the field reports, from the split's confusion matrix: Dice, precision, recall (class accuracy),
F-beta, against their formulas and against segmentation_models_pytorch's metrics; logged, recorded and monitorable."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from segx.metrics import ConfusionMatrix, per_class_scores, segmentation_scores
from segx.runs.record import read_record
from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, run_in_process


def test_each_score_follows_its_formula_and_is_left_out_where_undefined() -> None:
    # rows: ground truth, columns: prediction. Class 2 is never predicted, class 3 is predicted but not in the
    # ground truth, class 4 appears nowhere.
    confmat = torch.tensor([[6.0, 2, 0, 0, 0],
                            [1, 3, 0, 0, 0],
                            [1, 1, 0, 0, 0],
                            [0, 0, 0, 0, 0],
                            [0, 0, 0, 0, 0]])
    confmat[0, 3] = 1  # one background pixel predicted as class 3
    confmat[0, 0] = 5
    scores = per_class_scores(confmat, beta=2.0)
    tp, fp, fn = torch.tensor([5.0, 3, 0, 0, 0]), torch.tensor([2.0, 3, 0, 1, 0]), torch.tensor([3.0, 1, 2, 0, 0])
    for c in range(3):
        assert scores["iou"][c] == pytest.approx(tp[c] / (tp[c] + fp[c] + fn[c]))
        assert scores["dice"][c] == pytest.approx(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]))
    assert scores["precision"][:2].tolist() == pytest.approx([5 / 7, 3 / 6])
    assert scores["recall"][:3].tolist() == pytest.approx([5 / 8, 3 / 4, 0.0])
    p, r = 5 / 7, 5 / 8
    assert scores["fscore"][0] == pytest.approx(5 * p * r / (4 * p + r))
    # never predicted: precision undefined, but F-beta is 0 as its Dice is (counted in the means, not dropped)
    assert math.isnan(scores["precision"][2]) and scores["fscore"][2] == 0 and scores["dice"][2] == 0
    assert scores["fscore"][3] == 0  # predicted, not in the ground truth: 0 as well
    assert math.isnan(scores["recall"][3]) and scores["precision"][3] == 0 and scores["iou"][3] == 0  # not in GT
    assert all(math.isnan(scores[name][4]) for name in scores)  # absent everywhere: no score at all

    names = ["background", "a", "b", "c", "d"]
    means = segmentation_scores(confmat, names)
    assert means["mdice"] == pytest.approx(float(scores["dice"][:4].mean()))  # class d left out
    assert means["macc"] == means["mrecall"] == pytest.approx(float(scores["recall"][:3].mean()))
    assert means["mprecision"] == pytest.approx(float(scores["precision"][[0, 1, 3]].mean()))
    assert means["per_class_dice"]["d"] is None and means["fscore_beta"] == 1.0
    # F1 is the Dice class by class, so the two means agree whatever the model never predicts
    f1 = per_class_scores(confmat)["fscore"]
    assert torch.allclose(f1[:4], scores["dice"][:4]) and math.isnan(f1[4])
    assert means["mfscore"] == pytest.approx(means["mdice"])


def test_the_scores_agree_with_segmentation_models_pytorch_on_random_predictions() -> None:
    import segmentation_models_pytorch.metrics as smp_metrics

    generator = torch.Generator().manual_seed(0)
    classes = 5
    preds = torch.randint(0, classes, (4, 24, 24), generator=generator)
    target = torch.randint(0, classes, (4, 24, 24), generator=generator)
    confmat = ConfusionMatrix(classes)
    confmat.update(preds, target)
    scores = segmentation_scores(confmat.compute(), [str(c) for c in range(classes)], beta=2.0)
    stats = smp_metrics.get_stats(preds, target, mode="multiclass", num_classes=classes)
    macro = {name: float(getattr(smp_metrics, function)(*stats, reduction="macro"))
             for name, function in (("miou", "iou_score"), ("mdice", "f1_score"), ("mprecision", "precision"),
                                    ("mrecall", "recall"))}
    macro["mfscore"] = float(smp_metrics.fbeta_score(*stats, beta=2.0, reduction="macro"))
    for name, value in macro.items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name
    assert scores["pixel_acc"] == pytest.approx(float(smp_metrics.recall(*stats, reduction="micro")), abs=1e-6)


def test_every_score_is_logged_recorded_and_can_pick_the_best_epoch(shapes_root: Path, tmp_path: Path) -> None:
    run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "logger=none",
                   "trainer.max_epochs=2", "trainer.limit_train_batches=2", "monitor=val/mfscore",
                   "fscore_beta=0.5", f"hydra.run.dir={tmp_path}")
    record = read_record(tmp_path)
    assert record["monitor"] == "val/mfscore"
    best = record["best"]
    assert {"val/mdice", "val/macc", "val/mprecision", "val/mrecall", "val/mfscore"} <= set(best)
    assert {"val/dice/background", "val/precision/background", "val/recall/background"} <= set(best)
    history = record["history"]
    assert best["val/mfscore"] == max(h["val/mfscore"] for h in history)
    precision, recall = best["val/precision/background"], best["val/recall/background"]
    assert best["val/fscore/background"] == pytest.approx(1.25 * precision * recall / (0.25 * precision + recall))
