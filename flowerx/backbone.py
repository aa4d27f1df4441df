"""Keras networks: the frozen pretrained base and the combined uint8-in, probabilities-out model.

Training path only (imports TensorFlow); the predictor never imports this module.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

import numpy as np

from .architectures import Architecture
from .contract import INPUT, OUTPUT
from .errors import FlowerxError

# TensorFlow's C++ start-up lines, printed at import whatever TF_CPP_MIN_LOG_LEVEL says.
_STARTUP_NOISE = (
    b"All log messages before absl::InitializeLog() is called",
    b"oneDNN custom operations are on",
    b"cpu_feature_guard",
    b"To enable the following instructions",
)


@contextlib.contextmanager
def _filtered_stderr():
    """Pass file descriptor 2 through a filter that drops only TensorFlow's start-up lines and forwards every
    other line as it comes (a crash's message included). FLOWERX_DEBUG=1: no filter."""
    if os.environ.get("FLOWERX_DEBUG"):
        yield
        return
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    saved = os.dup(2)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not any(noise in line for noise in _STARTUP_NOISE):
                    os.write(saved, line)

    thread = threading.Thread(target=forward, name="flowerx-stderr", daemon=True)
    thread.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the forwarder reads to the end and stops
        thread.join(timeout=10)
        os.close(saved)


def _import_tensorflow():
    """Import TensorFlow and Keras with their log noise silenced. TF_CPP_MIN_LOG_LEVEL is set to 3 unless the
    user set it (or FLOWERX_DEBUG is set): TensorFlow's C++ logging reads it at every message, so it stays
    set for the process that trains."""
    if not os.environ.get("FLOWERX_DEBUG"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _filtered_stderr():
        import keras
        import tensorflow

    return tensorflow, keras


tf, keras = _import_tensorflow()  # the training path imports TF from here


def build_base(arch: Architecture, weights: str | Path | None, any_size: bool = False) -> keras.Model:
    """The pretrained network without its classifier, global-average pooled: float [-1, 1] in, features out.

    weights: a weights file, or None for random weights (benchmarks only). any_size: images of any side in
    (fine-tuning at lower resolutions), not only arch.input_size.
    """
    shape = (None, None, 3) if any_size else (arch.input_size, arch.input_size, 3)
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
    image = keras.Input((size, size, 3), dtype="uint8", name=INPUT)
    x = keras.layers.Rescaling(1.0 / arch.std, offset=-arch.mean / arch.std, name="normalize")(
        keras.ops.cast(image, "float32")
    )
    return keras.Model(image, base(x, training=False), name=f"features_{arch.name}")


def build_classifier(features: keras.Model, kernel: np.ndarray, bias: np.ndarray) -> keras.Model:
    """The exported network: the feature model plus the trained softmax layer."""
    head = keras.layers.Dense(kernel.shape[1], activation="softmax", name=OUTPUT)
    probs = head(features.output)
    head.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return keras.Model(features.input, probs, name=features.name.replace("features_", "flowerx_"))


def calibrate_batchnorm(model: keras.Model, images: np.ndarray) -> None:
    """Give a randomly initialised network realistic BatchNorm statistics.

    With weights=None every moving mean is 0 and variance 1, activations blow up or saturate, and every
    output comes out the same: a parity check on such a model tests nothing. One forward pass in training
    mode with momentum 0 sets each layer's moving statistics to those of its real input.
    """
    norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer.momentum, layer.trainable) for layer in norms]
    for layer in norms:
        layer.momentum, layer.trainable = 0.0, True
    model(images, training=True)
    for layer, (momentum, trainable) in zip(norms, saved):
        layer.momentum, layer.trainable = momentum, trainable


def _all_layers(model: keras.Model) -> list:
    layers = []
    for layer in model.layers:
        layers.extend(_all_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one image through the conv and dense layers (the cost that matters)."""
    total = 0
    for layer in _all_layers(model):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            # Each output position costs one MAC per kernel weight: kh*kw*cin*cout (conv),
            # kh*kw*cin*multiplier (depthwise) or in*out (dense).
            spatial = int(np.prod(layer.output.shape[1:-1]))
            total += spatial * int(np.prod(layer.get_weights()[0].shape))
    return total
