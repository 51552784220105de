"""Losses of the study, on logits [N,C,H,W] and integer masks [N,H,W] whose void pixels (255) are ignored.

The study weighted classes by their rarity after a run that predicted only background (its learning rate had
decayed to 1.4e-5 within an epoch, so the loss was not to blame); it also compared Keras' categorical hinge and
KL divergence, and segx adds the overlap losses (Dice, Jaccard, Tversky), focal and Lovász-Softmax.
`probability_clip` reproduces Keras' clipped cross entropy on probabilities. Every loss that can weigh classes
takes the same switch, `weighting` (null | neg_log | inverse | median), with weights from the training split's
class frequencies.

The overlap, focal and Lovász losses are segmentation-models-pytorch's (multiclass mode); their wrappers
(segx/training/smp_losses.py, importable from here) only fix their mode, store the class weights as a buffer
(so a checkpoint carries the exact loss) and make void pixels truly ignored (see `_SmpLoss`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import nn

from segx.core.errors import ConfigError, SegxError
from segx.data.source import IGNORE_INDEX

WEIGHTINGS = ("neg_log", "inverse", "median")
NORMALIZATIONS = ("pixels", "weights")
WEIGHTABLE_CHOICES = "ce, hinge, dice, jaccard, tversky, focal (or their weighted_* choices)"


def class_weights(frequencies: torch.Tensor, weighting: str = "neg_log") -> torch.Tensor:
    """Per-class weights from pixel frequencies; classes absent from training get weight 0.

    - `neg_log`: w_c = -log f_c, the study's choice (gentle: the rarest VOC class gets ~6× background).
    - `inverse`: w_c ∝ 1 / f_c, scaled so the average weight per labelled pixel is 1.
    - `median`: w_c = median(f) / f_c, median-frequency balancing (Eigen & Fergus, 2015).
    """
    f = torch.as_tensor(frequencies).double()
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
        raise ConfigError(f"Unknown loss.weighting={weighting!r}; choose null (unweighted) or one of "
                          f"{', '.join(WEIGHTINGS)}.")
    return w.float()


def _weights_or_none(class_frequencies: Any, weighting: str | None, loss: str) -> torch.Tensor | None:
    """The class weights a loss stores, or None when unweighted (frequencies are then not needed)."""
    if weighting is None:
        return None
    if class_frequencies is None:
        raise SegxError(f"loss {loss} with weighting={weighting!r} needs the training split's class frequencies "
                        "(build it with segx.training.losses.build_loss, or pass class_frequencies).")
    return class_weights(class_frequencies, weighting)


def _check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"Unknown loss.normalize={normalize!r}; choose `pixels` (weighted sum / labelled pixels, "
                          "Keras, the study's) or `weights` (weighted sum / sum of their weights, PyTorch's).")
    return normalize


def _mask_void(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Logits with every void pixel set to 0, so neither the value nor any gradient can depend on them.

    `masked_fill` (not a multiplication) also stops inf/NaN logits at void pixels, e.g. an fp16 overflow:
    `F.cross_entropy(ignore_index=...)` alone gives them NaN gradients (its log-softmax covers every pixel).
    """
    return logits.masked_fill(~valid.unsqueeze(1), 0.0)


def _pixel_mean(
    weighted_sum: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
    normalize: str,
) -> torch.Tensor:
    """Divide a (weighted) sum over labelled pixels by their number (`pixels`) or their weights (`weights`).

    `labels` has void pixels replaced by a real class; a batch without labelled pixels gives 0, not NaN.
    """
    if weights is None or normalize == "pixels":
        count = valid.sum().float()
    else:
        count = (weights[labels] * valid).sum().float()
    return weighted_sum.float() / count.clamp_min(torch.finfo(torch.float32).tiny)


def _check_probability_clip(probability_clip: float | None) -> float | None:
    if probability_clip is None:
        return None
    if isinstance(probability_clip, bool) or not isinstance(probability_clip, (int, float)) \
            or not 0.0 < float(probability_clip) < 0.5:
        raise ConfigError(f"loss.probability_clip={probability_clip!r} must be null (PyTorch's log-softmax cross "
                          "entropy) or a probability in (0, 0.5), e.g. 1e-7 (Keras' epsilon, the study's).")
    return float(probability_clip)


def _clipped_probabilities(logits: torch.Tensor, clip: float) -> torch.Tensor:
    """Softmax in float32 divided by its sum and clipped to [clip, 1 − clip], as Keras' `categorical_crossentropy`
    on probabilities computes them (a clipped probability passes no gradient)."""
    probs = logits.float().softmax(dim=1)
    probs = probs / probs.sum(dim=1, keepdim=True)
    return probs.clamp(clip, 1.0 - clip)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Pixel-wise cross entropy on logits, optionally class-weighted; void pixels are ignored.

    A pixel of class y counts w_y · CE (PyTorch's per-pixel term, with label smoothing weighting each smoothed
    class term by its own weight). The weighted sum is divided by the number of labelled pixels
    (`normalize=pixels`, Keras' sample weights as the study used them) or by the sum of their weights
    (`normalize=weights`, `nn.CrossEntropyLoss(weight=...)`). The weights are the `weight` buffer, as in
    `nn.CrossEntropyLoss`, so checkpoints of earlier weighted runs still load.

    `probability_clip=ε` computes the per-pixel term as Keras did on the study's softmax outputs (its
    `categorical_crossentropy` and `weighted_categorical_crossentropy`): softmax in float32, divided by its sum,
    clipped to [ε, 1 − ε], −log p_y; a pixel whose probability is clipped gets no gradient. None: log-softmax.
    """

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        label_smoothing: float = 0.0,
        weighting: str | None = None,
        normalize: str = "pixels",
        class_frequencies: torch.Tensor | None = None,
        probability_clip: float | None = None,
    ) -> None:
        super().__init__(
            weight=_weights_or_none(class_frequencies, weighting, type(self).__name__),
            ignore_index=ignore_index, label_smoothing=label_smoothing,
        )
        self.weighting = weighting
        self.normalize = _check_normalize(normalize)
        self.probability_clip = _check_probability_clip(probability_clip)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        labels = target.masked_fill(~valid, 0)
        if self.probability_clip is not None:
            per_pixel = self._clipped_cross_entropy(_mask_void(logits, valid), labels) * valid
            return _pixel_mean(per_pixel.sum(), valid, labels, self.weight, self.normalize)
        per_pixel = F.cross_entropy(
            _mask_void(logits, valid), target, weight=self.weight, ignore_index=self.ignore_index,
            reduction="none", label_smoothing=self.label_smoothing,
        )
        return _pixel_mean(per_pixel.sum(), valid, labels, self.weight, self.normalize)

    def _clipped_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Keras' cross entropy on probabilities per pixel: p = softmax / its sum, clipped; −Σ_c t_c·w_c·log p_c."""
        probs = _clipped_probabilities(logits, self.probability_clip)
        index = labels.unsqueeze(1)
        if self.label_smoothing == 0:  # one-hot target: only the labelled class' term
            per_pixel = -probs.gather(1, index).squeeze(1).log()
            return per_pixel * self.weight[labels] if self.weight is not None else per_pixel
        classes = probs.shape[1]  # Keras' label smoothing: t = (1 − ε)·onehot + ε / C
        one_hot = torch.zeros_like(probs).scatter_(1, index, 1.0)
        smoothed = one_hot * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        terms = -smoothed * probs.log()
        if self.weight is not None:
            terms = terms * self.weight.view(1, -1, *([1] * (probs.dim() - 2)))
        return terms.sum(dim=1)


class WeightedCrossEntropyLoss(CrossEntropyLoss):
    """`CrossEntropyLoss` with `weighting=neg_log` by default: the `_target_` of `loss=weighted_ce`.

    Kept as its own name so configs, code and checkpoints that name it keep working.
    """

    def __init__(
        self,
        class_frequencies: torch.Tensor | None = None,
        weighting: str | None = "neg_log",
        ignore_index: int = IGNORE_INDEX,
        label_smoothing: float = 0.0,
        normalize: str = "pixels",
        probability_clip: float | None = None,
    ) -> None:
        super().__init__(ignore_index=ignore_index, label_smoothing=label_smoothing, weighting=weighting,
                         normalize=normalize, class_frequencies=class_frequencies,
                         probability_clip=probability_clip)


class KLDivergenceLoss(nn.Module):
    """Keras' `KLDivergence` on softmax probabilities against the one-hot labels, as the study's loss comparison
    used it: per labelled pixel Σ_c t_c·log(t_c / p_c) with t and p clipped to [ε, 1], averaged over labelled pixels.

    For one-hot labels it is −log p_y + ε·Σ_{c≠y} log(ε / p_c) (that sum within [−3e-5, 0] for 21 classes): cross
    entropy up to the clipping. Void pixels are ignored (Keras gave their all-zero rows ε·Σ_c log(ε / p_c)).
    """

    unweighted_because = "Keras' KLDivergence, as the study used it, takes no class weights"

    def __init__(self, ignore_index: int = IGNORE_INDEX, probability_clip: float = 1e-7,
                 weighting: str | None = None) -> None:
        _refuse_weighting(type(self), weighting)
        super().__init__()
        self.ignore_index = ignore_index
        clip = _check_probability_clip(probability_clip)
        if clip is None:
            raise ConfigError("loss.probability_clip=None is not possible with KLDivergenceLoss: Keras clips "
                              "both distributions to [ε, 1]; use a probability in (0, 0.5), e.g. 1e-7.")
        self.probability_clip = clip

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        labels = target.masked_fill(~valid, 0)
        probs = _mask_void(logits, valid).float().softmax(dim=1).clamp(self.probability_clip, 1.0)
        truth = torch.zeros_like(probs).scatter_(1, labels.unsqueeze(1), 1.0).clamp(self.probability_clip, 1.0)
        per_pixel = (truth * torch.log(truth / probs)).sum(dim=1) * valid
        return _pixel_mean(per_pixel.sum(), valid, labels, None, "pixels")


class CategoricalHingeLoss(nn.Module):
    """Keras' `categorical_hinge` on softmax probabilities, as the study used it: per labelled pixel of class y,
    max(0, 1 + max_{c≠y} p_c − p_y), averaged over labelled pixels.

    With `weighting`, a pixel of class y counts w_y times; `normalize` divides the weighted sum by the number of
    labelled pixels (`pixels`, Keras) or by the sum of their weights (`weights`). Weights: `class_weights` buffer.
    """

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        weighting: str | None = None,
        normalize: str = "pixels",
        class_frequencies: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.weighting = weighting
        self.normalize = _check_normalize(normalize)
        self.register_buffer("class_weights", _weights_or_none(class_frequencies, weighting, type(self).__name__))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        labels = target.masked_fill(~valid, 0)
        probs = _mask_void(logits, valid).float().softmax(dim=1)
        index = labels.unsqueeze(1)
        p_true = probs.gather(1, index).squeeze(1)
        p_other = probs.scatter(1, index, 0.0).amax(dim=1)  # Keras: max((1 - y_true) * y_pred); p ≥ 0
        per_pixel = (1.0 + p_other - p_true).clamp_min(0.0) * valid
        if self.class_weights is not None:
            per_pixel = per_pixel * self.class_weights[labels]
        return _pixel_mean(per_pixel.sum(), valid, labels, self.class_weights, self.normalize)


#: The losses built on segmentation-models-pytorch (segx/training/smp_losses.py), imported on first use: smp and
#: timm take over half a second to import, which a run of cross entropy or hinge never pays.
SMP_LOSSES = ("DiceLoss", "JaccardLoss", "TverskyLoss", "FocalLoss", "LovaszLoss")


def __getattr__(name: str) -> Any:
    if name in SMP_LOSSES:  # `_target_: segx.training.losses.DiceLoss` resolves through here
        from segx.training import smp_losses

        return getattr(smp_losses, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _refuse_weighting(target: type, weighting: Any) -> None:
    """A loss that cannot weigh classes refuses `loss.weighting` instead of silently training unweighted."""
    if weighting is None:
        return
    why = getattr(target, "unweighted_because", "its constructor takes no class frequencies")
    raise ConfigError(
        f"loss.weighting={weighting!r} is not possible with the loss {target.__module__}.{target.__qualname__}: "
        f"{why}. Set loss.weighting=null to train it unweighted, or choose a loss that weighs classes: "
        f"{WEIGHTABLE_CHOICES}."
    )


def build_loss(cfg: DictConfig, class_frequencies: Any = None) -> nn.Module:
    """Instantiate `cfg`; a weighted loss is given the train split's class frequencies.

    `class_frequencies` is a tensor or a zero-argument callable returning one; it is called only when the loss
    is actually weighted, so runs with an unweighted loss never pay for it. Invalid `loss.weighting` values
    are refused here, before the frequencies are computed.
    """
    target = get_class(cfg._target_)
    parameters = inspect.signature(target).parameters
    if cfg.get("normalize") is not None:
        _check_normalize(cfg.normalize)
    if cfg.get("probability_clip") is not None:  # refused as itself, not wrapped in Hydra's InstantiationException
        _check_probability_clip(cfg.probability_clip)
    if "weighting" in cfg:
        weighting = cfg.weighting
    elif "weighting" in parameters:
        weighting = parameters["weighting"].default
    else:
        weighting = None
    if "class_frequencies" not in parameters:
        _refuse_weighting(target, weighting)
        return instantiate(cfg)
    if weighting is None:
        return instantiate(cfg)
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"Unknown loss.weighting={weighting!r} for {cfg._target_}; choose null (unweighted) or "
                          f"one of {', '.join(WEIGHTINGS)}.")
    if class_frequencies is None:
        raise SegxError(f"loss {cfg._target_} with weighting={weighting!r} needs the training split's class "
                        "frequencies.")
    freq = class_frequencies() if callable(class_frequencies) else class_frequencies
    return instantiate(cfg, class_frequencies=freq)
