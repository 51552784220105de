"""The study as Keras ran it: segx's Keras-mode optimizers and initialiser against Keras 3 itself (torch backend),
and the study's relabelling of VOC's void pixels.

Named to run last: once imported, Keras takes over the process' stderr, and the in-process runs of tests after it
lose theirs ("lost sys.stderr"); Keras is therefore only imported by this file's fixture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from segx.core.errors import ConfigError
from segx.training.optim import build_optimizer


@pytest.fixture(scope="module")
def keras() -> Any:
    """Keras 3 on the torch backend, imported only by these tests: imported while the suite is collected, it takes
    over the process' stderr and logging, which the in-process runs of other tests then lose."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    return pytest.importorskip("keras", reason="Keras 3 is in the dev extra (pip install 'segx[dev]')")


STEPS = 3


def _gradients() -> list[np.ndarray]:
    """Small gradients, as most of a U-Net's first ones are: where Adam's epsilon placement matters."""
    rng = np.random.default_rng(0)
    return [rng.normal(0, 1e-6, size=(64,)).astype(np.float32) * (1 + step) for step in range(STEPS)]


def _keras_updates(keras: Any, optimizer: object, start: np.ndarray) -> np.ndarray:
    variable = keras.Variable(start.copy())
    for gradient in _gradients():
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(gradient), variable)])
    return keras.ops.convert_to_numpy(variable) - start


def _segx_updates(cfg: dict, start: np.ndarray, decay: float) -> np.ndarray:
    param = torch.nn.Parameter(torch.from_numpy(start.copy()))
    optimizer, schedule = build_optimizer([param], {**cfg, "decay": decay})
    for gradient in _gradients():
        param.grad = torch.from_numpy(gradient)
        optimizer.step()
        schedule.step()
    return param.detach().numpy() - start


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name, keras_optimizer, target", [
    ("adam", lambda k, lr: k.optimizers.Adam(learning_rate=lr, epsilon=1e-7), "torch.optim.Adam"),
    ("adamax", lambda k, lr: k.optimizers.Adamax(learning_rate=lr, epsilon=1e-7), "torch.optim.Adamax"),
    ("sgd", lambda k, lr: k.optimizers.SGD(learning_rate=lr), "torch.optim.SGD"),
])
def test_keras_epsilon_updates_as_keras_does_three_steps_with_the_study_decay(keras: Any, name: str,
                                                                             keras_optimizer: Any,
                                                                             target: str) -> None:
    start = (1e-6 * np.random.default_rng(1).normal(size=(64,))).astype(np.float32)  # SGD moves it by ~1e-10
    schedule = keras.optimizers.schedules.InverseTimeDecay(1e-4, decay_steps=1, decay_rate=1e-3)
    expected = _keras_updates(keras, keras_optimizer(keras, schedule), start)
    extra = {} if name == "sgd" else {"betas": [0.9, 0.999], "eps": 1e-7}
    keras_mode = _segx_updates({"_target_": target, "lr": 1e-4, "keras_epsilon": True, **extra}, start, 1e-3)
    assert _relative(keras_mode, expected) <= 0.01, name
    if name == "adam":  # PyTorch's own update is far from Keras' for such gradients: the option matters
        plain = _segx_updates({"_target_": target, "lr": 1e-4, **extra}, start, 1e-3)
        assert _relative(plain, expected) > 0.5


def test_keras_epsilon_is_refused_for_an_optimizer_whose_keras_update_segx_does_not_have() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match="keras_epsilon=true gives Adam's and Adamax's Keras update"):
        build_optimizer([param], {"_target_": "torch.optim.RMSprop", "lr": 1e-3, "keras_epsilon": True})


def test_he_normal_is_keras_truncated_normal(keras: Any) -> None:
    from segx.models.keras_init import TRUNCATED_STDDEV, he_normal

    torch.manual_seed(0)
    conv = he_normal(torch.nn.Conv2d(64, 128, 3))
    ours = conv.weight.detach().numpy()
    theirs = keras.ops.convert_to_numpy(keras.initializers.HeNormal(seed=0)((3, 3, 64, 128)))
    stddev = np.sqrt(2 / (64 * 9))
    cut = 2 * stddev / TRUNCATED_STDDEV
    # Keras' torch backend redraws an out-of-range value only 4 times, so a few in a million stay beyond the cut.
    assert np.abs(ours).max() <= cut and (np.abs(theirs) > cut).mean() < 1e-4
    assert ours.std() == pytest.approx(theirs.std(), rel=0.02) and ours.std() == pytest.approx(stddev, rel=0.02)
    assert (conv.bias == 0).all()


def test_the_study_presets_train_with_keras_updates() -> None:
    from hydra import compose, initialize_config_dir

    from tests.conftest import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for preset in ("optimizer_grid", "loss_grid", "size_study", "best_setting", "compare_models"):
            assert compose("train", [f"experiment={preset}"]).optimizer.keras_epsilon is True, preset
        assert compose("train", ["optimizer=adam"]).optimizer.keras_epsilon is False  # PyTorch's by default


def test_void_label_background_reads_vocs_void_borders_as_background(shapes_root: Path) -> None:
    from segx.data.shapes_datamodule import ShapesDataModule

    options = {"root": str(shapes_root), "num_train": 96, "num_val": 16, "min_size": 48, "max_size": 80,
               "image_size": 32}
    ignored = ShapesDataModule(**options).load_split("val").masks
    relabelled = ShapesDataModule(**options, void_label="background").load_split("val").masks
    assert (ignored == 255).any() and not (relabelled == 255).any()
    assert torch.equal(relabelled, torch.where(ignored == 255, torch.zeros_like(ignored), ignored))
    with pytest.raises(ConfigError, match="data.void_label='border' is not a choice"):
        ShapesDataModule(**options, void_label="border")
