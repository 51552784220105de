"""The study's Keras losses on probabilities against Keras itself (torch backend, torch autograd through it):
cross entropy with `probability_clip` (Keras' `categorical_crossentropy` and the study's
`weighted_categorical_crossentropy`), `KLDivergenceLoss` (`keras.losses.KLDivergence`), values and gradients with
respect to the logits, including pixels whose clipped probability passes no gradient; and the config refusals."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from segx.core.errors import ConfigError
from segx.training.losses import CrossEntropyLoss, KLDivergenceLoss, WeightedCrossEntropyLoss, build_loss
from tests.conftest import ROOT

C, VOID, EPS = 5, 255, 1e-7


def _batch(void: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [2,C,4,4], labels, mask of the pixels whose probabilities the clip saturates): random logits, and on
    the first image's first row two pixels confidently right (p_y = 1.0) and two confidently wrong (p_y < 1e-7)."""
    generator = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(2, C, 4, 4, generator=generator)
    target = torch.randint(0, C, (2, 4, 4), generator=generator)
    saturated = torch.zeros(2, 4, 4, dtype=torch.bool)
    for column, sign in enumerate([1.0, 1.0, -1.0, -1.0]):
        logits[0, :, 0, column] = 0.0
        logits[0, int(target[0, 0, column]), 0, column] = 40.0 * sign
        saturated[0, 0, column] = True
    if void:
        target[1, -1] = VOID
    return logits, target, saturated


def _keras_inputs(keras: Any, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(one-hot labels [N,H,W,C], all zero at void pixels, the study network's softmax output [N,H,W,C])."""
    labelled = target != VOID
    one_hot = torch.nn.functional.one_hot(target.masked_fill(~labelled, 0), C).float() * labelled.unsqueeze(-1)
    return one_hot, keras.ops.softmax(logits.permute(0, 2, 3, 1), axis=-1)


def _study_weighted_categorical_crossentropy(keras: Any, weights: torch.Tensor) -> Any:
    """The study's `weighted_categorical_crossentropy(weights)`, K.* written as keras.ops."""
    ops = keras.ops
    weights = ops.convert_to_tensor(weights)

    def loss(y_true: Any, y_pred: Any) -> Any:
        # scale predictions so that the class probas of each sample sum to 1
        y_pred = y_pred / ops.sum(y_pred, axis=-1, keepdims=True)
        # clip to prevent NaN's and Inf's
        y_pred = ops.clip(y_pred, keras.backend.epsilon(), 1 - keras.backend.epsilon())
        # calc
        loss = y_true * ops.log(y_pred) * weights
        loss = -ops.sum(loss, -1)
        return loss

    return loss


def _value_and_gradient(loss_fn: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.clone().requires_grad_()
    value = loss_fn(leaf)
    value.backward()
    return value.detach(), leaf.grad


def _compare(ours: Any, reference: Any, logits: torch.Tensor, no_gradient: torch.Tensor) -> torch.Tensor:
    """Same value and logit gradients as the Keras reference, none at all at the `no_gradient` pixels; our gradient."""
    value, gradient = _value_and_gradient(ours, logits)
    expected_value, expected_gradient = _value_and_gradient(reference, logits)
    torch.testing.assert_close(value, expected_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-9)
    clipped = no_gradient.unsqueeze(1).expand_as(gradient)
    assert (gradient[clipped] == 0).all() and (expected_gradient[clipped] == 0).all()
    assert (gradient[~clipped] != 0).any()
    return gradient


@pytest.mark.parametrize("void", [False, True], ids=["no_void", "void"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_clipped_cross_entropy_is_keras_categorical_crossentropy(keras: Any, void: bool,
                                                                  label_smoothing: float) -> None:
    logits, target, saturated = _batch(void)
    labelled = (target != VOID).sum()
    if label_smoothing:  # every class term counts: a confidently wrong pixel's unclipped p_c ≈ 1/(C−1) pass gradient
        saturated[0, 0, 2:] = False

    def reference(leaf: torch.Tensor) -> torch.Tensor:  # Keras per pixel, averaged over the labelled pixels
        one_hot, probs = _keras_inputs(keras, leaf, target)
        per_pixel = keras.losses.categorical_crossentropy(one_hot, probs, label_smoothing=label_smoothing)
        return (per_pixel * (target != VOID)).sum() / labelled

    ours = CrossEntropyLoss(probability_clip=EPS, label_smoothing=label_smoothing)
    _compare(lambda leaf: ours(leaf, target), reference, logits, saturated)
    if not void and not label_smoothing:  # Keras' own reduction (mean over every pixel) where no pixel is void
        one_hot, probs = _keras_inputs(keras, logits, target)
        keras_loss = keras.losses.CategoricalCrossentropy()(one_hot, probs)
        torch.testing.assert_close(ours(logits, target), keras_loss, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("fill", ["inf", "nan"])
def test_clipped_cross_entropy_ignores_void_logits(fill: str) -> None:
    """Void pixels change neither the value nor any gradient, even non-finite ones (e.g. an fp16 overflow)."""
    logits, target, _ = _batch()
    changed = logits.clone()
    changed.permute(0, 2, 3, 1)[target == VOID] = float(fill)
    for loss in (CrossEntropyLoss(probability_clip=EPS, label_smoothing=0.1), KLDivergenceLoss()):
        value, gradient = _value_and_gradient(functools.partial(loss, target=target), logits)
        changed_value, changed_gradient = _value_and_gradient(functools.partial(loss, target=target), changed)
        torch.testing.assert_close(changed_value, value)
        torch.testing.assert_close(changed_gradient, gradient)
        assert (gradient.permute(0, 2, 3, 1)[target == VOID] == 0).all()


@pytest.mark.parametrize("normalize", ["pixels", "weights"])
def test_clipped_weighted_cross_entropy_is_the_studys(keras: Any, normalize: str) -> None:
    logits, target, saturated = _batch()
    frequencies = torch.tensor([0.6, 0.2, 0.1, 0.07, 0.03], dtype=torch.float64)
    ours = WeightedCrossEntropyLoss(frequencies, normalize=normalize, probability_clip=EPS)
    study_loss = _study_weighted_categorical_crossentropy(keras, ours.weight)
    labelled = target != VOID
    count = labelled.sum() if normalize == "pixels" else ours.weight[target.masked_fill(~labelled, 0)][labelled].sum()

    def reference(leaf: torch.Tensor) -> torch.Tensor:
        return study_loss(*_keras_inputs(keras, leaf, target)).sum() / count  # void rows: all-zero one-hot, 0

    _compare(lambda leaf: ours(leaf, target), reference, logits, saturated)
    if normalize == "pixels":  # Keras' mean over all pixels, the study's training loss, where none is void
        logits, target, _ = _batch(void=False)
        torch.testing.assert_close(ours(logits, target), study_loss(*_keras_inputs(keras, logits, target)).mean(),
                                   rtol=1e-6, atol=0.0)


def test_without_the_clip_cross_entropy_keeps_the_log_softmax_gradient() -> None:
    """null is today's log-softmax path: the saturated pixels still pass gradient there, and the values agree
    away from the clip."""
    logits, target, saturated = _batch()
    clipped = _value_and_gradient(lambda leaf: CrossEntropyLoss(probability_clip=EPS)(leaf, target), logits)
    plain = _value_and_gradient(lambda leaf: CrossEntropyLoss()(leaf, target), logits)
    wrong = saturated.unsqueeze(1).expand_as(logits).clone()
    wrong[0, :, 0, :2] = False  # the confidently wrong pixels: log-softmax gives them a gradient near ±1/pixels
    assert (plain[1][wrong].abs() > 1e-3).any() and (clipped[1][wrong] == 0).all()
    normal = ~saturated.unsqueeze(1).expand_as(logits)
    torch.testing.assert_close(clipped[1][normal], plain[1][normal], rtol=1e-4, atol=1e-7)
    assert plain[0] > clipped[0]  # −log p_y of the confidently wrong pixels is ~80, not −log 1e-7 ≈ 16


@pytest.mark.parametrize("void", [False, True], ids=["no_void", "void"])
def test_kl_divergence_is_keras_kldivergence_on_one_hot_labels(keras: Any, void: bool) -> None:
    logits, target, saturated = _batch(void)
    labelled = target != VOID
    kl = keras.losses.KLDivergence(reduction=None)

    def reference(leaf: torch.Tensor) -> torch.Tensor:
        return (kl(*_keras_inputs(keras, leaf, target)) * labelled).sum() / labelled.sum()

    ours = KLDivergenceLoss()
    gradient = _compare(lambda leaf: ours(leaf, target), reference, logits, torch.zeros_like(saturated))
    # The clip cuts −log p_y where p_y < ε; only the ε·log(ε / p_c) terms of the clipped zeros move those logits.
    wrong = torch.zeros_like(saturated)
    wrong[0, 0, 2:] = True
    assert gradient.permute(0, 2, 3, 1)[wrong].abs().max() < 10 * EPS / labelled.sum()
    if not void:
        torch.testing.assert_close(ours(logits, target), keras.losses.KLDivergence()(*_keras_inputs(keras, logits,
                                                                                                   target)),
                                   rtol=1e-6, atol=0.0)
    ce = CrossEntropyLoss(probability_clip=EPS)(logits, target)
    assert 0 <= float(ce - ours(logits, target)) < 20 * EPS * 17  # cross entropy up to the clipped zeros


@functools.cache
def _compose(name: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"loss={name}", *overrides]).loss


@pytest.mark.parametrize("value", [0.0, 0.5, -1e-7, 0.7, "1e-7x", True])
def test_a_probability_clip_outside_0_to_half_is_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match="loss.probability_clip"):
        CrossEntropyLoss(probability_clip=value)
    with pytest.raises(ConfigError, match="loss.probability_clip"):
        KLDivergenceLoss(probability_clip=value)


def test_configs_take_the_protocol_clip_and_refuse_what_they_cannot_do() -> None:
    for name in ("ce", "weighted_ce"):
        assert _compose(name, "++protocol.probability_clip=null").probability_clip is None
        cfg = _compose(name, "++protocol.probability_clip=1e-7")
        assert cfg.probability_clip == 1e-7
        assert build_loss(cfg, lambda: torch.full((21,), 1 / 21)).probability_clip == 1e-7
        with pytest.raises(ConfigError, match=r"loss.probability_clip=0.5 must be"):
            build_loss(_compose(name, "loss.probability_clip=0.5"), lambda: torch.full((21,), 1 / 21))
    assert isinstance(build_loss(_compose("kl")), KLDivergenceLoss)
    with pytest.raises(ConfigError, match="loss.weighting='neg_log'.*KLDivergenceLoss.*takes no class weights"):
        build_loss(_compose("kl", "loss.weighting=neg_log"), lambda: pytest.fail("frequencies computed"))
    with pytest.raises(ConfigError, match="probability_clip=None"):
        KLDivergenceLoss(probability_clip=None)  # type: ignore[arg-type]
