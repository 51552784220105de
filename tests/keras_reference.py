"""Weights shared between a Keras model built from the study's code and segx's network of the same layout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def to_numpy(keras: Any, tensor: Any) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(tensor))


def randomize_keras_weights(keras: Any, layers: Sequence[Any], rng: np.random.Generator) -> None:
    """Random BatchNorm statistics and biases (kernels as initialised), so that every term of a layer shows."""
    for layer in layers:
        shapes = [tuple(w.shape) for w in layer.weights]
        if isinstance(layer, keras.layers.BatchNormalization):  # gamma, beta, moving mean, moving variance
            layer.set_weights([rng.uniform(0.5, 1.5, shapes[0]), rng.normal(0, 0.1, shapes[1]),
                               rng.normal(0, 0.1, shapes[2]), rng.uniform(0.5, 1.5, shapes[3])])
        elif len(shapes) == 2:  # kernel as initialised, a random bias
            layer.set_weights([to_numpy(keras, layer.weights[0]), rng.normal(0, 0.05, shapes[1])])


def copy_keras_weights(keras: Any, layers: Sequence[Any], modules: Sequence[nn.Module]) -> None:
    """segx's weights (BatchNorm running statistics included) from the Keras layers' current ones, in order."""
    with torch.no_grad():
        for layer, module in zip(layers, modules, strict=True):
            weights = [torch.from_numpy(to_numpy(keras, w).astype(np.float32)) for w in layer.weights]
            if isinstance(module, nn.BatchNorm2d):
                for target, value in zip((module.weight, module.bias, module.running_mean, module.running_var),
                                         weights, strict=True):
                    target.copy_(value)
            else:  # Keras (kh, kw, in, out) → torch (out, in, kh, kw); transposed convs alike, not flipped
                module.weight.copy_(weights[0].permute(3, 2, 0, 1))
                if module.bias is not None:
                    module.bias.copy_(weights[1])
                assert len(weights) == 1 + (module.bias is not None)
