"""Keras -> ONNX (tf2onnx), the head appended as ONNX nodes, metadata stamping and the parity check.

The graph other apps code against (flowerx.contract documents the whole contract):
  input  `image`: uint8 [N, S, S, 3] RGB; normalised inside.
  output `probs`: float32 [N, num_classes], softmax, in label order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from . import ExportError
from .names import HEAD_ADD, HEAD_BIAS, HEAD_KERNEL, HEAD_MATMUL, HEAD_SOFTMAX, INPUT, OUTPUT

OPSET = 15  # tf2onnx 1.17 with TF 2.21: opset 19+ fails to convert
PARITY_ATOL = 1e-4  # on probabilities
FEATURES_ATOL = 1e-3  # on pooled features (values up to ~6 after ReLU6)


def keras_to_onnx(model, input_size: int, output: str = OUTPUT):
    """Convert a Keras model with a uint8 [N, S, S, 3] input into an ONNX ModelProto (image -> output)."""
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    spec = (tf.TensorSpec([None, input_size, input_size, 3], tf.uint8, name=INPUT),)

    @tf.function(input_signature=spec)
    def serve(image):
        return {output: model(image, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=OPSET)
    return proto


def append_head(features_proto, kernel: np.ndarray, bias: np.ndarray):
    """The classifier as ONNX: the feature network's graph plus MatMul, Add and Softmax (output `probs`).

    Saves a second tf2onnx conversion of the whole network on every training run.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(features_proto)
    graph = model.graph
    (features,) = graph.output
    num_classes = kernel.shape[1]
    graph.initializer.extend(
        [
            numpy_helper.from_array(kernel.astype(np.float32), HEAD_KERNEL),
            numpy_helper.from_array(bias.astype(np.float32), HEAD_BIAS),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("MatMul", [features.name, HEAD_KERNEL], ["head/matmul"], name=HEAD_MATMUL),
            helper.make_node("Add", ["head/matmul", HEAD_BIAS], ["head/logits"], name=HEAD_ADD),
            helper.make_node("Softmax", ["head/logits"], [OUTPUT], name=HEAD_SOFTMAX, axis=-1),
        ]
    )
    batch = features.type.tensor_type.shape.dim[0]
    probs = helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, [batch.dim_param or None, num_classes])
    del graph.output[:]
    graph.output.append(probs)
    return model


def set_metadata(proto, metadata: dict[str, object]) -> None:
    """Store metadata as ONNX metadata_props (strings; lists and dicts as JSON)."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def check_parity(
    model_bytes: bytes, keras_model, images: np.ndarray, atol: float = PARITY_ATOL, top1: bool = True
) -> float:
    """Run images through ONNX Runtime and Keras; raise ExportError unless they agree (max abs difference
    <= atol and, with top1, the same argmax). Returns the max difference."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT: images})[0]
    want = np.asarray(keras_model(images, training=False))
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        raise ExportError(
            f"the exported model's outputs are not finite (NaN or inf) on {len(images)} real images: "
            "training diverged; model not written"
        )
    diff = float(np.abs(got - want).max())
    if not diff <= atol or (top1 and not np.array_equal(got.argmax(1), want.argmax(1))):  # NaN-safe
        raise ExportError(
            f"exported ONNX model disagrees with Keras on {len(images)} real images "
            f"(max difference {diff:.2e} > {atol:.0e} or a different top-1); model not written"
        )
    return diff


@dataclass
class Description:
    """What describes a model besides its graph: metadata_props, a doc string, who made it, its version."""

    metadata: dict[str, object]
    doc: str = ""
    producer_version: str = ""
    model_version: int = 0


def describe(proto, description: Description) -> None:
    """Stamp a model: metadata, doc string, flowerx as producer, model_version, the batch dimension named `N`
    (tf2onnx leaves `unk__395`) and ONNX's denotations (an IMAGE input of batch, rows, columns, channels)."""
    set_metadata(proto, description.metadata)
    proto.doc_string = description.doc
    proto.producer_name, proto.producer_version = "flowerx", description.producer_version
    proto.model_version = description.model_version
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_param = "N"
    image = proto.graph.input[0]
    image.type.denotation = "IMAGE"
    for dim, name in zip(
        image.type.tensor_type.shape.dim, ("DATA_BATCH", "DATA_FEATURE", "DATA_FEATURE", "DATA_CHANNEL")
    ):
        dim.denotation = name


def export(
    keras_model, input_size: int, description: Description, check_images: np.ndarray, proto=None
) -> tuple[bytes, float]:
    """Convert (unless proto is given), describe and verify against keras_model.

    Returns (serialized model, max parity difference)."""
    proto = proto if proto is not None else keras_to_onnx(keras_model, input_size)
    describe(proto, description)
    data = proto.SerializeToString()
    diff = check_parity(data, keras_model, check_images)
    return data, diff
