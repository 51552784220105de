"""Segmentation scores from one confusion matrix accumulated over a split (and the study's own two IoU readings,
kept only to reproduce its curves: segx.metrics.study)."""

from segx.metrics.confusion import (
    MEANS,
    PER_CLASS_SCORES,
    ConfusionMatrix,
    confusion_matrix_metric,
    per_class_iou,
    per_class_scores,
    segmentation_scores,
)
from segx.metrics.study import StudyIoUNoBackground, StudyMeanIoU, study_iou_no_background

__all__ = ["MEANS", "PER_CLASS_SCORES", "ConfusionMatrix", "confusion_matrix_metric", "per_class_iou",
           "per_class_scores", "segmentation_scores", "StudyIoUNoBackground", "StudyMeanIoU",
           "study_iou_no_background"]
