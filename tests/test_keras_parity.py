"""The study as Keras ran it: the seed's U-Net built in Keras 3 (torch backend) with its weights copied into segx's,
segx's Keras-mode optimizers and initialiser against Keras itself, and the study's relabelling of VOC's void pixels.
Keras comes from the `keras` fixture of tests/conftest.py (see there why with the process' own streams)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segx.core.errors import ConfigError
from segx.models.unet import UNet
from segx.training.optim import build_optimizer
from tests.keras_reference import copy_keras_weights, randomize_keras_weights

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


WIDTHS, BOTTLENECK, CLASSES, SIZE = (4, 8, 8, 16), 16, 5, 32  # the seed's four levels, narrow


def _seed_unet(keras: Any) -> Any:
    """The seed's `unet()` (report section 1.3) at narrow widths, its final softmax left to the loss."""
    layers = keras.layers
    inputs = layers.Input((SIZE, SIZE, 3))
    x, skips = inputs, []
    for width in WIDTHS:  # c1..c4: Conv(relu, he_normal) → BatchNorm, twice, then a 2×2 max-pool
        for _ in range(2):
            x = layers.Conv2D(width, (3, 3), activation="relu", kernel_initializer="he_normal", padding="same")(x)
            x = layers.BatchNormalization()(x)
        skips.append(x)
        x = layers.MaxPooling2D((2, 2))(x)
    for _ in range(2):  # c5: no he_normal in the seed
        x = layers.BatchNormalization()(layers.Conv2D(BOTTLENECK, (3, 3), activation="relu", padding="same")(x))
    for width, skip in zip(reversed(WIDTHS), reversed(skips), strict=True):  # u6..u9, c6..c9: no BatchNorm
        x = layers.concatenate([layers.Conv2DTranspose(width, (2, 2), strides=(2, 2), padding="same")(x), skip])
        x = layers.Conv2D(width, (3, 3), activation="relu", padding="same")(x)
        x = layers.Conv2D(width, (3, 3), activation="relu", padding="same")(x)
    return keras.Model(inputs, layers.Conv2D(CLASSES, (1, 1))(x))


class KerasUNetPair:
    """The seed's U-Net in Keras and segx's UNet of the same widths, the Keras weights (random BatchNorm statistics
    and biases included, so every term shows) copied into segx's."""

    def __init__(self, keras: Any) -> None:
        self.keras = keras
        keras.utils.set_random_seed(0)
        self.model = _seed_unet(keras)
        self.net = UNet(CLASSES, 3, WIDTHS, BOTTLENECK)
        self.layers = [layer for layer in self.model.layers if layer.weights]  # in creation order, as segx's
        self.modules = [m for m in self.net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d,
                                                                         torch.nn.BatchNorm2d))]
        keras_names = {"Conv2d": "Conv2D", "ConvTranspose2d": "Conv2DTranspose", "BatchNorm2d": "BatchNormalization"}
        assert [keras_names[type(m).__name__] for m in self.modules] == [type(x).__name__ for x in self.layers]
        rng = np.random.default_rng(0)
        randomize_keras_weights(keras, self.layers, rng)
        self.initial = [layer.get_weights() for layer in self.layers]
        self.reset()
        self.images = rng.uniform(-2, 2, (2, SIZE, SIZE, 3)).astype(np.float32)  # NHWC, as Keras takes them
        self.labels = rng.integers(0, CLASSES, (2, SIZE, SIZE))

    def numpy(self, tensor: Any) -> np.ndarray:
        return np.array(self.keras.ops.convert_to_numpy(tensor))

    def reset(self) -> None:
        """Both networks back to the initial Keras weights."""
        for layer, weights in zip(self.layers, self.initial, strict=True):
            layer.set_weights(weights)
        copy_keras_weights(self.keras, self.layers, self.modules)

    def keras_logits(self, training: bool) -> np.ndarray:
        return self.numpy(self.model(self.images, training=training))

    def segx_logits(self, training: bool) -> np.ndarray:
        self.net.train(training)
        with torch.no_grad():
            return self.net(torch.from_numpy(self.images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()

    def keras_weights(self) -> np.ndarray:
        return np.concatenate([self.numpy(w).ravel() for layer in self.layers for w in layer.trainable_weights])

    def segx_weights(self) -> np.ndarray:  # in Keras' layout and order: kernel (or gamma), then bias (or beta)
        return np.concatenate([(p.detach().permute(2, 3, 1, 0) if p.dim() == 4 else p.detach()).numpy().ravel()
                               for m in self.modules for p in (m.weight, m.bias)])


@pytest.fixture(scope="module")
def unet_pair(keras: Any) -> KerasUNetPair:
    return KerasUNetPair(keras)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training mode"])
def test_the_seeds_unet_in_keras_and_segx_give_the_same_logits(unet_pair: KerasUNetPair, training: bool) -> None:
    unet_pair.reset()
    expected = unet_pair.keras_logits(training)
    assert np.abs(unet_pair.segx_logits(training) - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("name, keras_optimizer, target", [
    ("adam", lambda k, lr: k.optimizers.Adam(learning_rate=lr, epsilon=1e-7), "torch.optim.Adam"),
    ("adamax", lambda k, lr: k.optimizers.Adamax(learning_rate=lr, epsilon=1e-7), "torch.optim.Adamax"),
    ("sgd", lambda k, lr: k.optimizers.SGD(learning_rate=lr), "torch.optim.SGD"),
])
def test_three_training_steps_of_the_seeds_unet_update_its_weights_as_keras_does(
        unet_pair: KerasUNetPair, name: str, keras_optimizer: Any, target: str) -> None:
    """From identical weights, one batch, three steps at lr 1e-4 with the study's decay 1e-3 per batch: each side
    takes its own gradients of cross entropy through its own network."""
    keras = unet_pair.keras
    unet_pair.reset()
    start = unet_pair.keras_weights()
    assert np.array_equal(unet_pair.segx_weights(), start)
    schedule = keras.optimizers.schedules.InverseTimeDecay(1e-4, decay_steps=1, decay_rate=1e-3)
    unet_pair.model.compile(optimizer=keras_optimizer(keras, schedule),
                            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for _ in range(STEPS):
        unet_pair.model.train_on_batch(unet_pair.images, unet_pair.labels)
    expected = unet_pair.keras_weights() - start

    def segx_updates(keras_epsilon: bool) -> np.ndarray:
        unet_pair.reset()
        net = unet_pair.net.train()
        extra = {} if name == "sgd" else {"betas": [0.9, 0.999], "eps": 1e-7}
        optimizer, decay = build_optimizer(list(net.parameters()), {"_target_": target, "lr": 1e-4, "decay": 1e-3,
                                                                    "keras_epsilon": keras_epsilon, **extra})
        images, labels = torch.from_numpy(unet_pair.images).permute(0, 3, 1, 2), torch.from_numpy(unet_pair.labels)
        for _ in range(STEPS):
            optimizer.zero_grad()
            F.cross_entropy(net(images), labels).backward()
            optimizer.step()
            decay.step()
        return unet_pair.segx_weights() - start

    assert _relative(segx_updates(keras_epsilon=True), expected) <= 0.1, name
    if name == "adam":  # PyTorch's own Adam moves these weights differently (measured 0.36): the option matters
        assert _relative(segx_updates(keras_epsilon=False), expected) > 0.2


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
        for preset in ("optimizer_grid", "loss_grid", "size_study", "best_setting", "compare_models",
                       "compare_models_chained", "loss_comparison_chained"):
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
