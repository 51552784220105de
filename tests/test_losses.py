"""Every loss choice in conf/loss: built as train.py builds it, it ignores void pixels, trains, and weighs classes
the way its config says."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from segx.core.errors import ConfigError, SegxError
from segx.training.losses import (
    CategoricalHingeLoss,
    CrossEntropyLoss,
    LovaszLoss,
    WeightedCrossEntropyLoss,
    build_loss,
    class_weights,
)
from tests.conftest import ROOT

CHOICES = sorted(path.stem for path in (ROOT / "conf" / "loss").glob("*.yaml"))
WEIGHTED = [name for name in CHOICES if name.startswith("weighted_")]
NUM_CLASSES = 21
VOID = 255


@functools.cache
def _compose(name: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"loss={name}", *(f"loss.{o}" for o in overrides)]).loss


def _batch(seed: int = 0, shape: tuple[int, ...] = (2, NUM_CLASSES, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and a mask with every class present and a void border, as VOC has around objects."""
    generator = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    logits = torch.randn(shape, generator=generator)
    target = torch.randint(0, c, (n, h, w), generator=generator)
    target[:, :2] = VOID
    target[0, :, -3:] = VOID
    return logits, target


def _frequencies(target: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    labelled = target[target != VOID]
    return torch.bincount(labelled, minlength=num_classes).double() / labelled.numel()


def _build(name: str, *overrides: str, frequencies: torch.Tensor | None = None) -> torch.nn.Module:
    freq = _frequencies(_batch()[1]) if frequencies is None else frequencies
    return build_loss(_compose(name, *overrides), lambda: freq)


@pytest.mark.parametrize("name", CHOICES)
def test_value_is_finite_and_gradients_reach_the_logits(name: str) -> None:
    logits, target = _batch()
    logits.requires_grad_()
    loss = _build(name)(logits, target)
    assert loss.dim() == 0 and torch.isfinite(loss), loss
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    labelled = (target != VOID).unsqueeze(1).expand_as(logits)
    assert logits.grad[labelled].abs().sum() > 0


@pytest.mark.parametrize("fill", ["random", "inf", "nan"])
@pytest.mark.parametrize("name", CHOICES)
def test_logits_at_void_pixels_change_nothing(name: str, fill: str) -> None:
    loss_fn = _build(name)
    logits, target = _batch()
    void = (target == VOID).unsqueeze(1).expand_as(logits)
    changed = logits.clone()
    changed[void] = torch.randn(int(void.sum())) * 50 if fill == "random" else float(fill)
    logits.requires_grad_()
    changed.requires_grad_()
    reference, value = loss_fn(logits, target), loss_fn(changed, target)
    torch.testing.assert_close(value, reference)
    value.backward()
    reference.backward()
    assert (changed.grad[void] == 0).all()
    torch.testing.assert_close(changed.grad, logits.grad)


@pytest.mark.parametrize("name", CHOICES)
def test_a_batch_without_labelled_pixels_gives_zero(name: str) -> None:
    logits, target = _batch()
    logits.requires_grad_()
    loss = _build(name)(logits, torch.full_like(target, VOID))
    assert loss.dim() == 0 and loss.item() == 0.0
    loss.backward()
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("name", CHOICES)
def test_loss_decreases_on_a_fixed_batch(name: str) -> None:
    loss_fn = _build(name)
    start, target = _batch(seed=1)
    logits = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([logits], lr=0.05)
    values = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn(logits, target)
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    assert values[-1] < 0.9 * values[0], values


def test_hinge_matches_a_hand_computed_value() -> None:
    # Logits log(p) give softmax probabilities p exactly. Pixels: (class 0, p=.7/.2/.1), (class 2, same p),
    # (void), (class 2, p=.05/.05/.9). Hinge 1 + max_{c≠y} p_c − p_y: 1+.2−.7 = .5, 1+.7−.1 = 1.6, 1+.05−.9 = .15.
    p = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.05, 0.05, 0.9]])
    logits = p.log().T.reshape(1, 3, 2, 2)
    target = torch.tensor([[[0, 2], [VOID, 2]]])
    assert math.isclose(CategoricalHingeLoss()(logits, target).item(), (0.5 + 1.6 + 0.15) / 3, rel_tol=1e-6)
    # Frequencies e^-1, e^-2, e^-3 give neg_log weights 1, 2, 3: weighted sum 1·.5 + 3·1.6 + 3·.15 = 5.75.
    freq = torch.exp(-torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    pixels = _build("weighted_hinge", "normalize=pixels", frequencies=freq)(logits, target)
    weights = _build("weighted_hinge", "normalize=weights", frequencies=freq)(logits, target)
    assert math.isclose(pixels.item(), 5.75 / 3, rel_tol=1e-6)  # / 3 labelled pixels
    assert math.isclose(weights.item(), 5.75 / 7, rel_tol=1e-6)  # / (1 + 3 + 3)


@pytest.mark.parametrize("name", WEIGHTED)
def test_equal_weights_give_the_unweighted_loss(name: str) -> None:
    logits, target = _batch()
    unweighted = _build(name, "weighting=null")(logits, target)
    uniform = torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES, dtype=torch.float64)
    ones = _build(name, "weighting=median", frequencies=uniform)  # median(f) / f = 1 for every class
    assert torch.allclose(next(ones.buffers()), torch.ones(NUM_CLASSES))
    torch.testing.assert_close(ones(logits, target), unweighted)
    # Any constant weight (-log(1/21) = 3.04 here) when the weighted mean is normalised by the weights.
    by_weights = ("normalize=weights",) if "normalize" in _compose(name) else ()
    constant = _build(name, "weighting=neg_log", *by_weights, frequencies=uniform)
    assert torch.allclose(next(constant.buffers()), torch.full((NUM_CLASSES,), math.log(NUM_CLASSES)))
    torch.testing.assert_close(constant(logits, target), unweighted)


@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize("weighting", ["neg_log", "inverse", "median"])
def test_weights_are_a_buffer_from_the_train_frequencies(name: str, weighting: str) -> None:
    freq = _frequencies(_batch()[1])
    loss = _build(name, f"weighting={weighting}", frequencies=freq)
    buffers = dict(loss.named_buffers())
    assert len(buffers) == 1, buffers
    (buffer,) = buffers.values()
    torch.testing.assert_close(buffer, class_weights(freq, weighting))
    assert set(loss.state_dict()) == set(buffers)  # checkpoints carry the weights
    logits, target = _batch()
    assert not torch.allclose(loss(logits, target), _build(name, "weighting=null")(logits, target))


def test_weighted_ce_normalisations() -> None:
    logits, target = _batch()
    freq = _frequencies(target)
    w = class_weights(freq, "neg_log")
    valid = target != VOID
    per_pixel = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid], reduction="none")
    pixels = _build("weighted_ce", frequencies=freq)  # normalize=pixels is the default
    assert pixels.normalize == "pixels"
    torch.testing.assert_close(pixels(logits, target), (w[target[valid]] * per_pixel).sum() / valid.sum())
    weights = _build("weighted_ce", "normalize=weights", frequencies=freq)
    torch.testing.assert_close(weights(logits, target), F.cross_entropy(logits, target, weight=w, ignore_index=VOID))
    smoothed = _build("weighted_ce", "normalize=weights", "label_smoothing=0.1", frequencies=freq)
    expected = F.cross_entropy(logits, target, weight=w, ignore_index=VOID, label_smoothing=0.1)
    torch.testing.assert_close(smoothed(logits, target), expected)


def test_cross_entropy_ignores_void_and_keeps_label_smoothing() -> None:
    logits, target = _batch()
    valid = target != VOID
    flat_logits, flat_target = logits.permute(0, 2, 3, 1)[valid], target[valid]
    torch.testing.assert_close(CrossEntropyLoss()(logits, target), F.cross_entropy(flat_logits, flat_target))
    smoothed = _build("ce", "label_smoothing=0.2")(logits, target)
    torch.testing.assert_close(smoothed, F.cross_entropy(flat_logits, flat_target, label_smoothing=0.2))


def test_lovasz_refuses_weighting_before_computing_frequencies() -> None:
    calls = []

    def frequencies() -> torch.Tensor:
        calls.append(1)
        return torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES, dtype=torch.float64)

    with pytest.raises(ConfigError, match="loss.weighting='neg_log'.*LovaszLoss.*loss.weighting=null") as error:
        build_loss(_compose("lovasz", "weighting=neg_log"), frequencies)
    assert "\n" not in str(error.value) and not calls
    with pytest.raises(ConfigError, match="loss.weighting"):
        LovaszLoss(weighting="median")


def test_unknown_weighting_or_normalisation_is_refused() -> None:
    with pytest.raises(ConfigError, match="loss.weighting='nope'"):
        build_loss(_compose("weighted_dice", "weighting=nope"), lambda: pytest.fail("frequencies computed"))
    with pytest.raises(SegxError, match="loss.normalize"):
        build_loss(_compose("weighted_ce", "normalize=batch"), _frequencies(_batch()[1]))


def test_class_weight_rules() -> None:
    freq = torch.tensor([0.7, 0.2, 0.1, 0.0])
    neg_log = class_weights(freq, "neg_log")
    assert torch.allclose(neg_log[:3], -torch.log(freq[:3]).float())
    assert neg_log[3] == 0  # absent class: no weight instead of infinity
    inverse = class_weights(freq, "inverse").double()
    assert math.isclose(float((inverse * freq).sum()), 1.0, rel_tol=1e-6)  # average pixel weight 1
    median = class_weights(freq, "median")
    assert math.isclose(float(median[1]), 1.0)  # the median class gets weight 1
    assert median[2] > median[1] > median[0]
    with pytest.raises(SegxError, match="weighting"):
        class_weights(freq, "nope")


def test_build_loss_computes_frequencies_only_for_weighted_losses() -> None:
    calls = []

    def frequencies() -> torch.Tensor:
        calls.append(1)
        return torch.tensor([0.5, 0.5])

    for name in CHOICES:
        if not name.startswith("weighted_"):
            build_loss(_compose(name), frequencies)
    assert isinstance(build_loss(_compose("weighted_ce", "weighting=null"), frequencies), CrossEntropyLoss)
    assert not calls
    loss = build_loss(_compose("weighted_ce", "weighting=inverse"), frequencies)
    assert isinstance(loss, WeightedCrossEntropyLoss) and calls == [1]
    assert torch.allclose(loss.weight, torch.tensor([1.0, 1.0]))
