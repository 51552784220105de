"""Segmentation scores from one confusion matrix accumulated over a split."""

from segx.metrics.confusion import (
    MEANS,
    PER_CLASS_SCORES,
    ConfusionMatrix,
    confusion_matrix_metric,
    per_class_iou,
    per_class_scores,
    segmentation_scores,
)

__all__ = ["MEANS", "PER_CLASS_SCORES", "ConfusionMatrix", "confusion_matrix_metric", "per_class_iou",
           "per_class_scores", "segmentation_scores"]
