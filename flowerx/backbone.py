"""Keras networks: the frozen pretrained base and the combined uint8-in, probabilities-out model.

Training path only (imports TensorFlow); the predictor never imports this module.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from .architectures import Architecture
from .errors import FlowerxError


@contextlib.contextmanager
def _quiet_stderr():
    """TensorFlow's C++ start-up lines (oneDNN, CPU features) ignore TF_CPP_MIN_LOG_LEVEL: mute fd 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
with _quiet_stderr():
    import tensorflow as tf  # noqa: F401  (re-exported: the training path imports TF from here)
    import keras


def build_base(arch: Architecture, weights: str | Path | None) -> keras.Model:
    """The pretrained network without its classifier, global-average pooled: float [-1, 1] in, features out.

    weights: a weights file, or None for random weights (benchmarks only).
    """
    shape = (arch.input_size, arch.input_size, 3)
    kwargs = dict(input_shape=shape, include_top=False, pooling="avg", weights=None)
    try:
        if arch.family == "inception_v3":
            model = keras.applications.InceptionV3(**kwargs)
        else:
            model = keras.applications.MobileNet(alpha=arch.alpha, **kwargs)
        if weights is not None:
            model.load_weights(str(weights))
    except (OSError, ValueError) as e:
        raise FlowerxError(f"cannot load weights for {arch.name} from {weights}: {e}") from None
    model.trainable = False
    return model


def build_feature_model(arch: Architecture, base: keras.Model) -> keras.Model:
    """uint8 RGB [N, S, S, 3] -> normalise inside the graph -> base -> pooled bottleneck features."""
    size = arch.input_size
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0 / arch.std, offset=-arch.mean / arch.std, name="normalize")(
        keras.ops.cast(image, "float32")
    )
    return keras.Model(image, base(x, training=False), name=f"features_{arch.name}")


def build_classifier(features: keras.Model, kernel: np.ndarray, bias: np.ndarray) -> keras.Model:
    """The exported network: the feature model plus the trained softmax layer."""
    head = keras.layers.Dense(kernel.shape[1], activation="softmax", name="probs")
    probs = head(features.output)
    head.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return keras.Model(features.input, probs, name=features.name.replace("features_", "flowerx_"))
