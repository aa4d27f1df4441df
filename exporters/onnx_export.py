"""Keras -> ONNX (tf2onnx), the head appended as ONNX nodes, the contract's interface around it (any-size
input resized inside the graph, a labels output), metadata stamping and the parity check.

The graph other apps code against (flowerx.contract documents the whole contract, version 2):
  input  `image`: uint8 [N, H, W, 3] RGB, any size; resized to S x S and normalised inside.
  output `probs`: float32 [N, num_classes], softmax, in label order.
  output `labels`: uint8 [L], the labels as a UTF-8 JSON list (for clients that cannot read metadata).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from . import ExportError
from .names import (
    HEAD_ADD,
    HEAD_BIAS,
    HEAD_KERNEL,
    HEAD_MATMUL,
    HEAD_SOFTMAX,
    INPUT,
    LABELS,
    LABELS_PREFIX,
    OUTPUT,
    PREPROCESS_PREFIX,
    RESIZED,
)

OPSET = 15  # tf2onnx 1.17 with TF 2.21: opset 19+ fails to convert
# The shipped model's opset: Resize's antialias (opset 18) is what makes the in-graph resize PIL's bilinear
# when it shrinks (within 1 level of PIL's, 0.03 on average, on the flower photos; 1.9 without antialias).
MODEL_OPSET = 18
SIZE = PREPROCESS_PREFIX + "size"
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


def _resize_node(image: str, sizes: str, output: str, name: str):
    """The contract's resize: linear, half-pixel centres, antialiased (PIL's bilinear, which low-pass filters
    when it shrinks), on uint8 pixels. flowerx's own decode runs the same node (resize_model), so the pixels
    a model sees are the same whether flowerx or the graph resized them (tests/test_export.py checks it)."""
    from onnx import helper

    return helper.make_node(
        "Resize",
        [image, "", "", sizes],
        [output],
        name=name,
        mode="linear",
        antialias=1,
        coordinate_transformation_mode="half_pixel",
        exclude_outside=1,  # PIL renormalises its filter at the borders too (0.026 vs 0.028 levels from PIL)
    )


def resize_model():
    """The resize alone: uint8 `image` [N, H, W, 3] and int64 `sizes` [4] in, `resized` out. Shipped as
    flowerx/resize.onnx (the base install has no onnx package to build it); a test checks the two agree."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [_resize_node(INPUT, "sizes", "resized", "resize")],
        "flowerx_resize",
        [
            helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", "H", "W", 3]),
            helper.make_tensor_value_info("sizes", TensorProto.INT64, [4]),
        ],
        [helper.make_tensor_value_info("resized", TensorProto.UINT8, ["N", "S", "S", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MODEL_OPSET)], producer_name="flowerx")
    model.ir_version = 8  # onnxruntime 1.20 (the oldest flowerx supports) reads IR 8
    return model


def any_size_input(proto, input_size: int):
    """Contract 2's front: the graph takes uint8 [N, H, W, 3] of any size and resizes it to S x S itself
    (_resize_node), so a client only decodes. A new model at MODEL_OPSET; S x S pixels pass unchanged."""
    from onnx import helper, numpy_helper, version_converter

    model = version_converter.convert_version(proto, MODEL_OPSET)
    graph = model.graph
    for node in graph.node:
        node.input[:] = [RESIZED if name == INPUT else name for name in node.input]
    graph.initializer.append(numpy_helper.from_array(np.array([input_size, input_size], np.int64), SIZE))
    prefix = PREPROCESS_PREFIX
    nchw = prefix + "nchw"
    # Resized as NCHW (sizes [N, C, S, S]): OpenCV 5's DNN resizes the last two axes whatever the layout (on
    # NHWC it resized W and C, not H and W). Bit-identical to resize_model's NHWC resize, and no slower on
    # onnxruntime (its transpose optimizer folds the transposes): 17 ms for a 12 MP photo.
    front = [
        helper.make_node("Transpose", [INPUT], [nchw], name=prefix + "ToNCHW", perm=[0, 3, 1, 2]),
        helper.make_node("Shape", [nchw], [prefix + "batch_channels"], name=prefix + "Shape", end=2),
        helper.make_node(
            "Concat", [prefix + "batch_channels", SIZE], [prefix + "sizes"], name=prefix + "Concat", axis=0
        ),
        _resize_node(nchw, prefix + "sizes", prefix + "resized_nchw", prefix + "Resize"),
        helper.make_node("Transpose", [prefix + "resized_nchw"], [RESIZED], name=prefix + "ToNHWC", perm=[0, 2, 3, 1]),
    ]
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    dims = graph.input[0].type.tensor_type.shape.dim
    for dim, name in ((dims[1], "H"), (dims[2], "W")):
        dim.ClearField("dim_value")
        dim.dim_param = name
    return model


def fixed_size_input(model):
    """The network behind a contract-2 front (uint8 [N, S, S, 3] in), as a new model; others copied as they are."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    graph = fixed.graph
    size = next((i for i in graph.initializer if i.name == SIZE), None)
    if size is None:
        return fixed
    side = int(onnx.numpy_helper.to_array(size)[0])
    keep = [n for n in graph.node if not n.name.startswith(PREPROCESS_PREFIX)]
    for node in keep:
        node.input[:] = [INPUT if name == RESIZED else name for name in node.input]
    del graph.node[:]
    graph.node.extend(keep)
    weights = [i for i in graph.initializer if i.name != SIZE]
    del graph.initializer[:]
    graph.initializer.extend(weights)
    for dim in graph.input[0].type.tensor_type.shape.dim[1:3]:
        dim.ClearField("dim_param")
        dim.dim_value = side
    return fixed


def add_labels_output(proto, labels: list[str]) -> None:
    """A second output `labels`: the labels as UTF-8 JSON bytes (uint8 [L]), for clients that cannot read
    metadata (onnxruntime-web and -node, OpenCV). A constant: a run that asks only for `probs` never computes
    it. Not a string tensor: OpenCV 5's importer refuses those."""
    from onnx import TensorProto, helper, numpy_helper

    data = np.frombuffer(json.dumps(labels, ensure_ascii=False).encode("utf-8"), np.uint8)
    constant = LABELS_PREFIX + "json"
    proto.graph.initializer.append(numpy_helper.from_array(data, constant))
    proto.graph.node.append(helper.make_node("Identity", [constant], [LABELS], name=LABELS_PREFIX + "Identity"))
    proto.graph.output.append(helper.make_tensor_value_info(LABELS, TensorProto.UINT8, [len(data)]))


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
    got = session.run([session.get_outputs()[0].name], {INPUT: images})[0]
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
    labels: list[str]
    input_size: int
    doc: str = ""
    producer_version: str = ""
    model_version: int = 0


def package(proto, description: Description):
    """A fixed-size classifier graph (image S x S -> probs) as the file flowerx ships: any-size input,
    labels output, described. Returns a new model."""
    model = any_size_input(proto, description.input_size)
    add_labels_output(model, description.labels)
    describe(model, description)
    return model


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
    """Convert (unless proto is given), package and verify against keras_model (on S x S images, which the
    in-graph resize passes unchanged).

    Returns (serialized model, max parity difference)."""
    proto = proto if proto is not None else keras_to_onnx(keras_model, input_size)
    data = package(proto, description).SerializeToString()
    diff = check_parity(data, keras_model, check_images)
    return data, diff
