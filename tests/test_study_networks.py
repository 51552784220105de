"""The study's own ResU-Net, PSPNet and FCN, built in Keras 3 (torch backend) from its code
(seed/study-code/master_514_course_project.py) and compared with segx's StudyResUNet, StudyPSPNet and FCN
(model=fcn_study): parameter counts, and the same probabilities once the Keras weights are copied into segx's.

`study_code` translates the study's functions as faithfully as Keras 3 allows (`tf.keras.layers` is `keras.layers`,
`K.int_shape` a KerasTensor's shape); the only additions are width arguments, defaulting to the study's numbers,
so the weight-copy tests run narrow. Measured here (narrow widths, random BatchNorm statistics and biases, max abs
probability difference, inference / BatchNorm training mode): ResU-Net 2.3e-6 / 1.3e-6 (logits up to ±20, so float32
rounding through 33 convs), PSPNet 3.7e-8 / 9.1e-7 at 128 px and 3.7e-8 / 2.9e-6 at 192 px, FCN 1.5e-8 (inference).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from segx.models import build_network, parameter_counts
from segx.models.pspnet_study import StudyPSPNet
from segx.models.resunet_study import SameConv2d, StudyResUNet
from tests.conftest import ROOT
from tests.keras_reference import copy_keras_weights, randomize_keras_weights

STUDY_RESUNET_COUNTS = (401_564_629, 401_505_877)  # (total, trainable) as Keras counts them, 21 classes
STUDY_PSPNET_COUNTS = (3_365_781, 3_358_741)
STUDY_FCN_COUNT = 34_397_525

NARROW_RESUNET = (4, 8, 8, 16, 16, 32)
MID_RESUNET = (8, 16, 32, 64, 128, 256)
NARROW_PSPNET = {"widths": (8, 8, 16, 16, 16), "pyramid_channels": 16}
NARROW_FCN = {"widths": (8, 8, 16, 16), "fc_width": 32}
FCN_OVERRIDES = ["model.widths=[8,8,16,16]", "model.fc_width=32"]
TOLERANCE = 1e-5  # on probabilities; measured differences are 1.5e-8 to 2.9e-6


def study_code(keras: Any) -> SimpleNamespace:
    """The study's network functions on Keras 3, and `created`: every Conv2D and BatchNormalization they made, in
    creation order (the order segx registers the same modules in). Fresh recording per call."""
    layers = keras.layers
    created: list[Any] = []

    def recorded(cls: Any) -> Any:
        def make(*args: Any, **kwargs: Any) -> Any:
            layer = cls(*args, **kwargs)
            created.append(layer)
            return layer
        return make

    # from tensorflow.keras.layers import *  (the layers the study uses)
    Conv2D, BatchNormalization = recorded(layers.Conv2D), recorded(layers.BatchNormalization)
    Activation, Add, AveragePooling2D, Concatenate = (layers.Activation, layers.Add, layers.AveragePooling2D,
                                                      layers.Concatenate)
    Dropout, Input, MaxPooling2D, UpSampling2D, ZeroPadding2D = (layers.Dropout, layers.Input, layers.MaxPooling2D,
                                                                 layers.UpSampling2D, layers.ZeroPadding2D)
    Model, l2 = keras.Model, keras.regularizers.l2

    def FCN(weight_decay=0., batch_momentum=0.9, classes=21, size=128,
            widths=(64, 128, 256, 512), fc_width=1024):
        img_input = Input(shape=(size, size, 3))
        x = img_input
        for block, (width, convs) in enumerate(zip(widths, (2, 2, 3, 3), strict=True), start=1):  # Blocks 1-4
            for conv in range(1, convs + 1):
                x = Conv2D(width, (3, 3), activation='relu', padding='same', name=f'block{block}_conv{conv}',
                           kernel_regularizer=l2(weight_decay))(x)
            x = MaxPooling2D((2, 2), strides=(2, 2), name=f'block{block}_pool')(x)

        # Convolutional layers transfered from fully-connected layers
        x = Conv2D(fc_width, (7, 7), activation='relu', padding='same', name='fc1',
                   kernel_regularizer=l2(weight_decay))(x)
        x = Dropout(0.2)(x)
        x = Conv2D(fc_width, (1, 1), activation='relu', padding='same', name='fc2',
                   kernel_regularizer=l2(weight_decay))(x)
        x = Dropout(0.2)(x)
        # classifying layer
        x = Conv2D(classes, (1, 1), kernel_initializer='he_normal', activation='relu', padding='valid',
                   strides=(1, 1), kernel_regularizer=l2(weight_decay))(x)

        x = UpSampling2D(size=(16, 16))(x)
        x = (Activation('softmax'))(x)
        return Model(img_input, x)

    def bn_act(x, act=True):
        'batch normalization layer with an optinal activation layer'
        x = BatchNormalization()(x)
        if act:
            x = Activation('relu')(x)
        return x

    def conv_block(x, filters, kernel_size=3, padding='same', strides=1):
        'convolutional layer which always uses the batch normalization layer'
        conv = bn_act(x)
        conv = Conv2D(filters, kernel_size, padding=padding, strides=strides)(conv)
        conv = Dropout(0.1)(conv)
        return conv

    def stem(x, filters, kernel_size=3, padding='same', strides=1):
        conv = Conv2D(filters, kernel_size, padding=padding, strides=strides)(x)
        conv = conv_block(conv, filters, kernel_size, padding, strides)
        shortcut = Conv2D(filters, kernel_size=1, padding=padding, strides=strides)(x)
        shortcut = bn_act(shortcut, act=False)
        return Add()([conv, shortcut])

    def residual_block(x, filters, kernel_size=3, padding='same', strides=1):
        k_size = 3
        res = conv_block(x, filters, k_size, padding, strides)
        res = conv_block(res, filters, k_size, padding, 1)
        shortcut = Conv2D(filters, kernel_size, padding=padding, strides=strides)(x)
        shortcut = bn_act(shortcut, act=False)
        return Add()([shortcut, res])

    def upsample_concat_block(x, xskip):
        u = UpSampling2D((2, 2))(x)
        return Concatenate()([u, xskip])

    def ResUNet(img_h=128, img_w=128, f=(64, 128, 256, 512, 1024, 2048)):
        inputs = Input((img_h, img_w, 3))

        ## Encoder
        e0 = inputs
        e1 = stem(e0, f[0])
        e2 = residual_block(e1, f[1], strides=2)
        e3 = residual_block(e2, f[2], strides=2)
        e4 = residual_block(e3, f[3], strides=2)
        e5 = residual_block(e4, f[4], strides=2)
        e6 = residual_block(e5, f[5], strides=2)

        ## Bridge
        b0 = conv_block(e6, f[5], strides=1)
        b1 = conv_block(b0, f[5], strides=1)

        ## Decoder
        u1 = upsample_concat_block(b1, e5)
        d1 = residual_block(u1, f[5])
        u2 = upsample_concat_block(d1, e4)
        d2 = residual_block(u2, f[4])
        u3 = upsample_concat_block(d2, e3)
        d3 = residual_block(u3, f[3])
        u4 = upsample_concat_block(d3, e2)
        d4 = residual_block(u4, f[2])
        u5 = upsample_concat_block(d4, e1)
        d5 = residual_block(u5, f[1])  # noqa: F841 - built, but its output feeds nothing

        outputs = Conv2D(21, (1, 1), padding="same", activation="softmax")(d4)
        outputs = UpSampling2D(size=(2, 2))(outputs)
        return Model(inputs, outputs)

    def vanilla_encoder(input_height=128, input_width=128, widths=(64, 128, 256, 256, 256)):
        kernel = 3
        filter_size = widths[0]
        pad = 1
        pool_size = 2

        img_input = Input(shape=(input_height, input_width, 3))
        image_input = Input((128, 128, 3))  # noqa: F841 - unused in the study's code too
        x = img_input
        levels = []

        x = (ZeroPadding2D((pad, pad), data_format='channels_last'))(x)
        x = (Conv2D(filter_size, (kernel, kernel), data_format='channels_last', padding='valid'))(x)
        x = (BatchNormalization())(x)
        x = (Activation('relu'))(x)
        x = (MaxPooling2D((pool_size, pool_size), data_format='channels_last'))(x)
        levels.append(x)

        x = (ZeroPadding2D((pad, pad), data_format='channels_last'))(x)
        x = (Conv2D(widths[1], (kernel, kernel), data_format='channels_last', padding='valid'))(x)
        x = (BatchNormalization())(x)
        x = (Activation('relu'))(x)
        x = (MaxPooling2D((pool_size, pool_size), data_format='channels_last'))(x)
        levels.append(x)

        for width in widths[2:]:  # range(3) at 256 in the study
            x = (ZeroPadding2D((pad, pad), data_format='channels_last'))(x)
            x = (Conv2D(width, (kernel, kernel), data_format='channels_last', padding='valid'))(x)
            x = (BatchNormalization())(x)
            x = (Activation('relu'))(x)
            x = (MaxPooling2D((pool_size, pool_size), data_format='channels_last'))(x)
            levels.append(x)

        return img_input, levels

    def pool_block(feats, pool_factor, channels=512):
        h, w = feats.shape[1], feats.shape[2]  # K.int_shape(feats)[1:3], channels_last
        pool_size = strides = [int(np.round(float(h) / pool_factor)), int(np.round(float(w) / pool_factor))]

        x = AveragePooling2D(pool_size, data_format='channels_last', strides=strides, padding='same')(feats)
        x = Conv2D(channels, (1, 1), data_format='channels_last', padding='same', use_bias=False)(x)
        x = BatchNormalization()(x)
        x = Activation('relu')(x)
        x = UpSampling2D(size=tuple(pool_size))(x)
        return x

    def _pspnet(n_classes, encoder, input_height=128, input_width=128, channels=512):
        img_input, levels = encoder(input_height=input_height, input_width=input_width)
        [f1, f2, f3, f4, f5] = levels

        o = f5
        pool_factors = [1, 2, 3, 6]
        pool_outs = [o]
        for p in pool_factors:
            pooled = pool_block(o, p, channels)
            pool_outs.append(pooled)

        o = Concatenate(axis=-1)(pool_outs)
        o = Conv2D(channels, (1, 1), data_format='channels_last', use_bias=False)(o)
        o = BatchNormalization()(o)
        o = Activation('relu')(o)

        o = Conv2D(n_classes, (3, 3), data_format='channels_last', padding='same')(o)
        o = UpSampling2D(size=(32, 32))(o)
        o = Activation('softmax')(o)
        return Model(img_input, o)

    def pspnet(n_classes, input_height=128, input_width=128, widths=(64, 128, 256, 256, 256), channels=512):
        model = _pspnet(n_classes, functools.partial(vanilla_encoder, widths=widths),
                        input_height=input_height, input_width=input_width, channels=channels)
        model.model_name = "pspnet"
        return model

    return SimpleNamespace(FCN=FCN, ResUNet=ResUNet, pspnet=pspnet, created=created)


def keras_counts(model: Any) -> tuple[int, int]:
    """(total, trainable) as Keras' summary gives them."""
    return model.count_params(), int(sum(np.prod(w.shape) for w in model.trainable_weights))


def counts(net: nn.Module) -> tuple[int, int]:
    c = parameter_counts(net)
    return c["total"], c["trainable"]


def study_config(name: str, *overrides: str) -> Any:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", [f"model={name}", *overrides]).model


class KerasPair:
    """A Keras model from the study's code and segx's network of the same widths, with the Keras weights (random
    BatchNorm statistics and biases included, so every term shows) copied into segx's."""

    def __init__(self, keras: Any, build: Any, net: nn.Module, size: int, batch: int = 2) -> None:
        self.keras = keras
        keras.utils.set_random_seed(0)
        code = study_code(keras)
        self.model = build(code)
        in_model = {id(layer) for layer in self.model.layers}
        self.layers = [layer for layer in code.created if id(layer) in in_model]  # the study's d5 is not
        self.net = net
        self.modules = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        names = {"Conv2d": "Conv2D", "BatchNorm2d": "BatchNormalization", "SameConv2d": "Conv2D"}
        assert [names[type(m).__name__] for m in self.modules] == [type(x).__name__ for x in self.layers]
        rng = np.random.default_rng(0)
        randomize_keras_weights(keras, self.layers, rng)
        self.images = rng.uniform(-2, 2, (batch, size, size, 3)).astype(np.float32)  # NHWC, as Keras takes them

    def numpy(self, tensor: Any) -> np.ndarray:
        return np.array(self.keras.ops.convert_to_numpy(tensor))

    def copy_weights(self) -> None:
        """segx's weights (BatchNorm running statistics included) from the Keras model's current ones."""
        copy_keras_weights(self.keras, self.layers, self.modules)

    def without_dropout(self) -> None:
        """Dropout off on both sides, so BatchNorm's training mode can be compared alone."""
        for layer in self.model.layers:
            if isinstance(layer, self.keras.layers.Dropout):
                layer.rate = 0.0
        for module in self.net.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    def probabilities(self, training: bool) -> tuple[np.ndarray, np.ndarray]:
        """(Keras' output, softmax of segx's logits), both NHWC, from the same weights."""
        self.copy_weights()  # after any training-mode call, Keras' moving statistics moved
        self.net.train(training)
        with torch.no_grad():
            logits = self.net(torch.from_numpy(self.images).permute(0, 3, 1, 2))
        ours = F.softmax(logits, dim=1).permute(0, 2, 3, 1).numpy()
        return self.numpy(self.model(self.images, training=training)), ours


def report(name: str, difference: float) -> None:
    print(f"{name}: max abs probability difference {difference:.1e}")


def constant_tiles(x: np.ndarray, tile: int) -> bool:
    """Whether an NHWC map repeats one value over every tile × tile block."""
    coarse = x[:, ::tile, ::tile]
    return np.array_equal(np.repeat(np.repeat(coarse, tile, axis=1), tile, axis=2), x)


# ------------------------------------------------------------------------------------------- parameter counts


def test_segx_study_networks_have_the_study_counts_at_full_width() -> None:
    with torch.device("meta"):  # 401.6M parameters: 1.6 GB of weights that are only counted
        resunet = StudyResUNet()
    assert counts(resunet) == STUDY_RESUNET_COUNTS
    assert counts(StudyPSPNet()) == STUDY_PSPNET_COUNTS
    fcn = build_network(study_config("fcn_study"))
    assert counts(fcn) == (STUDY_FCN_COUNT, STUDY_FCN_COUNT)
    assert fcn.classifier_activation == "relu" and fcn.fc1[2].p == fcn.fc2[2].p == 0.2


def test_keras_full_width_pspnet_and_fcn_count_as_segx(keras: Any) -> None:
    code = study_code(keras)
    assert keras_counts(code.pspnet(21)) == STUDY_PSPNET_COUNTS
    assert keras_counts(code.FCN()) == (STUDY_FCN_COUNT, STUDY_FCN_COUNT)


@pytest.mark.parametrize("widths", [NARROW_RESUNET, MID_RESUNET], ids=["narrow", "mid"])
def test_keras_and_segx_resunet_count_alike(keras: Any, widths: Sequence[int]) -> None:
    model = study_code(keras).ResUNet(64, 64, f=widths)
    assert keras_counts(model) == counts(StudyResUNet(widths=widths))


@pytest.mark.slow
def test_keras_full_width_resunet_counts_as_segx(keras: Any) -> None:
    """Keras allocates and initialises all 401.6M weights (1.6 GB): about 13 s here."""
    started = time.perf_counter()
    model = study_code(keras).ResUNet()
    print(f"Keras full-width ResUNet built in {time.perf_counter() - started:.1f} s")
    assert keras_counts(model) == STUDY_RESUNET_COUNTS


# ------------------------------------------------------------------------------------- the same probabilities


@pytest.fixture(scope="module")
def resunet_pair(keras: Any) -> KerasPair:
    return KerasPair(keras, lambda code: code.ResUNet(64, 64, f=NARROW_RESUNET),
                     StudyResUNet(widths=NARROW_RESUNET), size=64)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "batchnorm training mode"])
def test_the_study_resunet_in_keras_and_segx_gives_the_same_probabilities(resunet_pair: KerasPair,
                                                                        training: bool) -> None:
    if training:
        resunet_pair.without_dropout()
    expected, ours = resunet_pair.probabilities(training)
    difference = float(np.abs(ours - expected).max())
    report(f"ResU-Net ({'training' if training else 'inference'})", difference)
    assert difference <= TOLERANCE
    assert constant_tiles(ours, 2) and constant_tiles(expected, 2)  # the head runs at 1/2
    assert not constant_tiles(ours, 4)


def test_the_resunet_strided_convs_pad_as_keras_not_as_torch(keras: Any) -> None:
    """Keras' 'same' 3×3 stride-2 conv on an even side pads 0 before and 1 after; torch's padding=1 samples
    other positions."""
    keras.utils.set_random_seed(0)
    layer = keras.layers.Conv2D(4, 3, strides=2, padding="same")
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype(np.float32)
    expected = np.array(keras.ops.convert_to_numpy(layer(x))).transpose(0, 3, 1, 2)
    ours = SameConv2d(3, 4, 3, stride=2)
    kernel, bias = (torch.from_numpy(np.array(keras.ops.convert_to_numpy(w))) for w in layer.weights)
    with torch.no_grad():
        ours.weight.copy_(kernel.permute(3, 2, 0, 1))
        ours.bias.copy_(bias)
        torch_padding = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), ours.weight, ours.bias, 2, 1)
        result = ours(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert result.shape == expected.shape == torch_padding.shape == (1, 4, 4, 4)
    assert np.abs(result - expected).max() <= 1e-5
    assert np.abs(torch_padding.numpy() - expected).max() > 0.1


@pytest.fixture(scope="module", params=[128, 192], ids=["128px", "192px"])
def pspnet_pair(keras: Any, request: pytest.FixtureRequest) -> KerasPair:
    size = request.param  # 1/32 maps of 4 and 6: pool sizes (4, 2, 1, 1) and (6, 3, 2, 1)
    return KerasPair(keras, lambda code: code.pspnet(21, size, size, NARROW_PSPNET["widths"],
                                                     NARROW_PSPNET["pyramid_channels"]),
                     StudyPSPNet(**NARROW_PSPNET), size=size)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "batchnorm training mode"])
def test_the_study_pspnet_in_keras_and_segx_gives_the_same_probabilities(pspnet_pair: KerasPair,
                                                                       training: bool) -> None:
    expected, ours = pspnet_pair.probabilities(training)  # no dropout in this network
    difference = float(np.abs(ours - expected).max())
    size = pspnet_pair.images.shape[1]
    report(f"PSPNet {size} px ({'training' if training else 'inference'})", difference)
    assert difference <= TOLERANCE
    assert constant_tiles(ours, 32) and constant_tiles(expected, 32)  # a (size/32)² grid
    assert not constant_tiles(ours, 64)


@pytest.mark.parametrize("size", [64, 160])
def test_the_study_pspnet_takes_sizes_keras_cannot_build(keras: Any, size: int) -> None:
    """At 64 px a pool size rounds to 0, at 160 (a 1/32 map of 5) the pool of 2 does not tile back to 5: Keras
    refuses both; segx rounds the pool size up to 1 and crops the upsampled branch."""
    with pytest.raises(ValueError):
        study_code(keras).pspnet(21, size, size, NARROW_PSPNET["widths"], NARROW_PSPNET["pyramid_channels"])
    net = StudyPSPNet(**NARROW_PSPNET).eval()
    with torch.no_grad():
        logits = net(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 21, size, size) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def fcn_pair(keras: Any) -> KerasPair:
    return KerasPair(keras, lambda code: code.FCN(size=64, **NARROW_FCN),
                     build_network(study_config("fcn_study", *FCN_OVERRIDES)), size=64)


def test_fcn_study_gives_the_study_fcns_probabilities_and_fcn_keras_does_not(fcn_pair: KerasPair) -> None:
    expected, ours = fcn_pair.probabilities(training=False)
    difference = float(np.abs(ours - expected).max())
    report("FCN (fcn_study, inference)", difference)
    assert difference <= TOLERANCE
    without_relu = build_network(study_config("fcn_keras", *FCN_OVERRIDES)).eval()
    without_relu.load_state_dict(fcn_pair.net.state_dict())  # the same weights, no ReLU on the classifier
    with torch.no_grad():
        logits = without_relu(torch.from_numpy(fcn_pair.images).permute(0, 3, 1, 2))
    plain = F.softmax(logits, dim=1).permute(0, 2, 3, 1).numpy()
    assert np.abs(plain - expected).max() > 1e-2
