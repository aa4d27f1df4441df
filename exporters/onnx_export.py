"""Keras -> ONNX (tf2onnx) for flowerx's model contract, with metadata and a parity check.

The contract other apps code against:
  input  `image`: uint8 [N, S, S, 3] RGB, the whole image resized to S x S (bilinear); normalised inside.
  output `probs`: float32 [N, num_classes], softmax, in label order.
  metadata_props: labels (JSON list), input_size, architecture, resize, and the training summary.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from flowerx.errors import FlowerxError

OPSET = 15  # tf2onnx 1.17 with TF 2.21: opset 19+ fails to convert
PARITY_ATOL = 1e-4


def keras_to_onnx(model, input_size: int):
    """Convert a Keras model with a uint8 [N, S, S, 3] input into an ONNX ModelProto (image -> probs)."""
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    spec = (tf.TensorSpec([None, input_size, input_size, 3], tf.uint8, name="image"),)

    @tf.function(input_signature=spec)
    def serve(image):
        return {"probs": model(image, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=OPSET)
    return proto


def set_metadata(proto, metadata: dict[str, object]) -> None:
    """Store metadata as ONNX metadata_props (strings; lists and dicts as JSON)."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def check_parity(model_bytes: bytes, keras_model, images: np.ndarray, atol: float = PARITY_ATOL) -> float:
    """Run images through ONNX Runtime and Keras; raise FlowerxError unless they agree. Returns max diff."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    got = session.run(["probs"], {"image": images})[0]
    want = np.asarray(keras_model(images, training=False))
    diff = float(np.abs(got - want).max())
    if diff > atol or not np.array_equal(got.argmax(1), want.argmax(1)):
        raise FlowerxError(
            f"exported ONNX model disagrees with Keras on {len(images)} validation images "
            f"(max |dp| = {diff:.2e} > {atol:.0e} or a different top-1); model not written"
        )
    return diff


def export(keras_model, input_size: int, metadata: dict[str, object], check_images: np.ndarray) -> tuple[bytes, float]:
    """Convert, stamp metadata and verify: returns (serialized model, max parity difference)."""
    proto = keras_to_onnx(keras_model, input_size)
    set_metadata(proto, metadata)
    proto.producer_name = "flowerx"
    data = proto.SerializeToString()
    diff = check_parity(data, keras_model, check_images)
    return data, diff
