"""segmentation-models-pytorch's overlap, focal and Lovász losses behind segx's loss contract (multiclass mode,
class weights as a buffer, void pixels truly ignored); import them from `segx.training.losses`."""

from __future__ import annotations

import inspect

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from segx.core.errors import SegxError
from segx.data.source import IGNORE_INDEX
from segx.training.losses import _mask_void, _refuse_weighting, _weights_or_none

# -- segmentation-models-pytorch's losses ---------------------------------------------------------------------
# Checked on smp 0.6.0: for finite logits its ignore_index makes the value independent of void pixels and
# their gradient 0 (Dice/Jaccard/Tversky multiply probabilities and one-hot targets by the mask; Focal and
# Lovász drop void pixels by boolean indexing). Two gaps, closed by `_SmpLoss.forward`:
# - inf/NaN logits at void pixels still leak: Dice/Jaccard/Tversky compute NaN·0 = NaN in the value, and
#   Lovász's softmax over the whole tensor gives NaN gradients at those pixels;
# - a batch without labelled pixels: Focal returns NaN (mean of nothing), Lovász an empty tensor.


def _store_class_weights(loss: nn.Module, weights: torch.Tensor | None) -> None:
    """Replace smp's plain `class_weights` attribute by a buffer (moved with the module, saved in checkpoints).

    smp's forward reads `self.class_weights` and takes the weighted mean of its per-class terms,
    sum_c w_c·L_c / sum_c w_c; older smp releases ignore the attribute, so refuse to weigh silently there.
    """
    smp_class = next(c for c in type(loss).__mro__ if c.__module__.startswith("segmentation_models_pytorch"))
    if weights is not None and "class_weights" not in inspect.signature(smp_class.__init__).parameters:
        raise SegxError(f"Weighted {type(loss).__name__} needs segmentation-models-pytorch with per-class weights "
                        f"(0.6 or newer; {smp.__version__} is installed). Upgrade it, or set loss.weighting=null.")
    if hasattr(loss, "class_weights"):
        delattr(loss, "class_weights")
    loss.register_buffer("class_weights", weights)


class _SmpLoss(nn.Module):
    """Placed before an smp loss class: void logits zeroed first, and 0 for a batch without labelled pixels."""

    ignore_index: int
    # smp's Focal and Lovász losses index the labelled pixels (a mean of nothing is NaN), so a batch without any is
    # answered here, at the cost of reading `valid.any()` back from the GPU; they sync inside smp anyway.
    guards_empty_batch = True

    def _weigh_classes(self, weighting: str | None, class_frequencies: torch.Tensor | None) -> None:
        self.weighting = weighting
        _store_class_weights(self, _weights_or_none(class_frequencies, weighting, type(self).__name__))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        logits = _mask_void(logits, valid)
        if self.guards_empty_batch and not bool(valid.any()):
            return logits.sum() * 0.0
        return super().forward(logits, target)


class _OverlapLoss(_SmpLoss):
    """The constructor smp's multiclass Dice and Jaccard losses share (placed before the smp class)."""

    guards_empty_batch = False  # smp masks classes absent from the batch: 0 and a zero gradient, without a sync

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        weighting: str | None = None,
        smooth: float = 0.0,
        log_loss: bool = False,
        class_frequencies: torch.Tensor | None = None,
    ) -> None:
        super().__init__(mode=smp_losses.MULTICLASS_MODE, from_logits=True, ignore_index=ignore_index,
                         smooth=smooth, log_loss=log_loss)
        self._weigh_classes(weighting, class_frequencies)


class DiceLoss(_OverlapLoss, smp_losses.DiceLoss):
    """smp's multiclass Dice loss, 1 − soft Dice per class over the batch, averaged over classes (classes absent
    from the batch count 0); with `weighting`, a weighted mean of the per-class terms."""


class JaccardLoss(_OverlapLoss, smp_losses.JaccardLoss):
    """smp's multiclass Jaccard (soft IoU) loss, per class over the batch, averaged over classes; with
    `weighting`, a weighted mean of the per-class terms."""


class TverskyLoss(_SmpLoss, smp_losses.TverskyLoss):
    """smp's multiclass Tversky loss: Dice with false positives weighted by `alpha` and false negatives by
    `beta` (0.5/0.5 is Dice), the class mean raised to `gamma`; with `weighting`, a weighted class mean."""

    guards_empty_batch = False  # as the Dice: 0 and a zero gradient for a batch without labelled pixels

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        weighting: str | None = None,
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 1.0,
        smooth: float = 0.0,
        log_loss: bool = False,
        class_frequencies: torch.Tensor | None = None,
    ) -> None:
        super().__init__(mode=smp_losses.MULTICLASS_MODE, from_logits=True, ignore_index=ignore_index,
                         smooth=smooth, log_loss=log_loss, alpha=alpha, beta=beta, gamma=gamma)
        self._weigh_classes(weighting, class_frequencies)


class FocalLoss(_SmpLoss, smp_losses.FocalLoss):
    """smp's multiclass focal loss: per class, a one-vs-rest sigmoid focal loss averaged over labelled pixels,
    then averaged over classes; with `weighting`, a weighted mean of these per-class terms (not per pixel)."""

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        weighting: str | None = None,
        gamma: float = 2.0,
        alpha: float | None = None,
        normalized: bool = False,
        class_frequencies: torch.Tensor | None = None,
    ) -> None:
        super().__init__(mode=smp_losses.MULTICLASS_MODE, from_logits=True, ignore_index=ignore_index,
                         gamma=gamma, alpha=alpha, normalized=normalized)
        self._weigh_classes(weighting, class_frequencies)


class LovaszLoss(_SmpLoss, smp_losses.LovaszLoss):
    """smp's Lovász-Softmax loss over the batch (classes present in it). It cannot weigh classes: smp averages
    its per-class terms inside `_lovasz_softmax_flat`, with no weights, so `weighting` must stay null."""

    unweighted_because = "smp's Lovász-Softmax averages its per-class terms internally and takes no class weights"

    def __init__(self, ignore_index: int = IGNORE_INDEX, weighting: str | None = None) -> None:
        _refuse_weighting(type(self), weighting)
        super().__init__(mode=smp_losses.MULTICLASS_MODE, ignore_index=ignore_index)
        self.weighting = None
