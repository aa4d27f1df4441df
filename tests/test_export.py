"""The export's self-check: a converted model that disagrees with Keras is refused."""

import json

import numpy as np
import pytest

pytest.importorskip("tf2onnx")

from exporters import ExportError  # noqa: E402
from exporters.onnx_export import any_size_input, check_parity, export, package  # noqa: E402
from flowerx.backbone import keras  # noqa: E402  (imports TensorFlow quietly)
from flowerx.contract import Contract  # noqa: E402


def tiny_model(seed: int):
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 3), dtype="uint8", name="image")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 127.5, offset=-1)(keras.ops.cast(image, "float32")))
    return keras.Model(image, keras.layers.Dense(4, activation="softmax")(x))


def test_export_writes_contract_and_refuses_a_mismatch():
    import onnx

    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    model = tiny_model(0)
    contract = Contract(
        ["a", "b", "c", "d"],
        8,
        "tiny",
        input_mean=127.5,
        input_std=127.5,
        training={"test_accuracy": 0.9, "test_count": 10},
    )
    data, diff = export(model, 8, contract.description("9.9"), images)
    assert diff <= 1e-4
    proto = onnx.load_from_string(data)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["probs", "labels"]
    image = proto.graph.input[0].type
    assert image.tensor_type.elem_type == onnx.TensorProto.UINT8
    # Issue 12's standard description: named dims, ONNX denotations and image metadata, a doc string,
    # flowerx as producer, a model version, the contract version; normalisation said to be inside the graph.
    assert [d.dim_param or d.dim_value for d in image.tensor_type.shape.dim] == ["N", "H", "W", 3]
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert image.denotation == "IMAGE"
    assert [d.denotation for d in image.tensor_type.shape.dim] == [
        "DATA_BATCH",
        "DATA_FEATURE",
        "DATA_FEATURE",
        "DATA_CHANNEL",
    ]
    assert (proto.producer_name, proto.producer_version) == ("flowerx", "9.9") and proto.model_version > 2026e10
    assert "4 classes: a, b, c, d" in proto.doc_string and "90.0%" in proto.doc_string
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["labels"] == '["a", "b", "c", "d"]' and meta["input_size"] == "8" and meta["flowerx_contract"] == "2"
    assert meta["Image.BitmapPixelFormat"] == "Rgb8" and meta["Image.NominalPixelRange"] == "NominalRange_0_255"
    assert "input_mean" not in meta and "do not normalise" in json.loads(meta["normalization"])["applied"]
    assert Contract.from_metadata(meta, "m.onnx") == contract  # and it reads back as the same contract
    with pytest.raises(ExportError, match="disagrees with Keras"):
        check_parity(data, tiny_model(1), images)


def test_contract_2_takes_any_size_and_says_its_labels():
    """The graph resizes any decoded size to S x S itself, exactly as flowerx's own decode does (and within a
    level of PIL's bilinear), and passes S x S pixels unchanged; its `labels` output is the labels as UTF-8
    JSON bytes, asked for or not."""
    import onnxruntime as ort
    from PIL import Image

    from exporters.int8 import strip_head
    from exporters.onnx_export import append_head, keras_to_onnx
    from flowerx.data import resize

    rng = np.random.default_rng(1)
    labels = ["a", "b", "c", "dé 雏菊"]
    proto = append_head(keras_to_onnx(tiny_model(0), 8, "features"), rng.normal(size=(4, 4)), np.zeros(4))
    # tiny_model's output is already a softmax over 4; as "features" it feeds a second 4-class head
    model = package(proto, Contract(labels, 8, "tiny").description("9.9"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    square = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(session.run(["probs"], {"image": square})[0], fixed.run(None, {"image": square})[0])
    for h, w in ((31, 17), (8, 20), (5, 3)):  # shrink, mixed, enlarge
        photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = session.run(["probs"], {"image": photo[None]})[0]
        want = fixed.run(None, {"image": resize(Image.fromarray(photo), 8)[None]})[0]
        assert np.abs(got - want).max() < 1e-6, (h, w)
    probs, data = session.run(None, {"image": square})
    assert json.loads(data.tobytes().decode("utf-8")) == labels and probs.shape == (3, 4)
    # the front alone, on a photo-like image: flowerx's resize exactly, PIL's bilinear to rounding
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["out"])],
        "identity",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 64, 64, 3])],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, ["N", 64, 64, 3])],
    )
    front = any_size_input(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), 64)
    resizer = ort.InferenceSession(front.SerializeToString(), providers=["CPUExecutionProvider"])
    yy, xx = np.mgrid[0:333, 0:500]
    smooth = np.stack([xx % 256, yy % 256, (xx * yy) % 251], -1).astype(np.uint8)
    for photo in (smooth, smooth[:40, :50]):
        got = resizer.run(None, {"image": photo[None]})[0][0]
        assert np.array_equal(got, resize(Image.fromarray(photo), 64))
        diff = np.abs(got.astype(int) - np.asarray(Image.fromarray(photo).resize((64, 64), Image.BILINEAR), int))
        assert diff.mean() < 0.1 and diff.max() <= 1, (photo.shape, diff.mean(), diff.max())
    # int8 starts from the network behind the front: S x S in, no labels output
    features = strip_head(model)
    assert [d.dim_value for d in features.graph.input[0].type.tensor_type.shape.dim[1:]] == [8, 8, 3]
    assert [o.name for o in features.graph.output] == ["features"]


def test_the_shipped_resize_model_is_the_contracts_resize():
    """flowerx/resize.onnx (what flowerx.data.resize runs) is exporters' resize_model(), node for node."""
    import onnx

    from exporters.onnx_export import resize_model
    from flowerx.data import resources

    shipped = onnx.load_from_string((resources.files("flowerx") / "resize.onnx").read_bytes())
    assert shipped.graph == resize_model().graph and shipped.opset_import == resize_model().opset_import
