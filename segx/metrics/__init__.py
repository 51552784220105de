"""Segmentation scores from one confusion matrix accumulated over a split."""

from segx.metrics.confusion import ConfusionMatrix, confusion_matrix_metric, per_class_iou, segmentation_scores

__all__ = ["ConfusionMatrix", "confusion_matrix_metric", "per_class_iou", "segmentation_scores"]
