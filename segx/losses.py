"""Losses. The study found plain cross entropy collapsed to 'all background' on VOC and fixed it by
weighting classes by their rarity; both are here, with three weighting rules."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import nn

from segx.data.voc import IGNORE_INDEX
from segx.errors import SegxError

WEIGHTINGS = ("neg_log", "inverse", "median")


def class_weights(frequencies: torch.Tensor, weighting: str = "neg_log") -> torch.Tensor:
    """Per-class weights from pixel frequencies; classes absent from training get weight 0.

    - `neg_log`: w_c = -log f_c, the study's choice (gentle: the rarest VOC class gets ~6× background).
    - `inverse`: w_c ∝ 1 / f_c, scaled so the average weight per labelled pixel is 1.
    - `median`: w_c = median(f) / f_c, median-frequency balancing (Eigen & Fergus, 2015).
    """
    f = frequencies.double()
    present = f > 0
    if not present.any():
        raise SegxError("No class occurs in the training masks; class weights cannot be computed.")
    w = torch.zeros_like(f)
    if weighting == "neg_log":
        w[present] = -torch.log(f[present])
    elif weighting == "inverse":
        w[present] = 1.0 / (f[present] * int(present.sum()))
    elif weighting == "median":
        w[present] = f[present].median() / f[present]
    else:
        raise SegxError(f"Unknown loss.weighting={weighting!r}; choose one of {', '.join(WEIGHTINGS)}.")
    return w.float()


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Pixel-wise cross entropy on logits; pixels labelled 255 (VOC's object borders) are ignored."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0) -> None:
        super().__init__(ignore_index=ignore_index, label_smoothing=label_smoothing)


class WeightedCrossEntropyLoss(nn.CrossEntropyLoss):
    """Cross entropy with class weights from the training split's pixel frequencies.

    The weights live in the module's state, so a checkpoint reproduces the exact loss it was trained with.
    """

    def __init__(
        self,
        class_frequencies: torch.Tensor,
        weighting: str = "neg_log",
        ignore_index: int = IGNORE_INDEX,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            weight=class_weights(torch.as_tensor(class_frequencies), weighting),
            ignore_index=ignore_index, label_smoothing=label_smoothing,
        )
        self.weighting = weighting


def build_loss(cfg: DictConfig, class_frequencies: Any = None) -> nn.Module:
    """Instantiate `cfg`; a loss whose constructor takes `class_frequencies` is given the train split's.

    Frequencies are computed lazily (pass a callable) so runs with an unweighted loss never pay for them.
    """
    target = get_class(cfg._target_)
    if "class_frequencies" in inspect.signature(target).parameters:
        if class_frequencies is None:
            raise SegxError(f"loss {cfg._target_} needs the training split's class frequencies.")
        freq = class_frequencies() if callable(class_frequencies) else class_frequencies
        return instantiate(cfg, class_frequencies=freq)
    return instantiate(cfg)
