"""The export's self-check: a converted model that disagrees with Keras is refused."""

import json

import numpy as np
import pytest

pytest.importorskip("tf2onnx")

from exporters import ExportError  # noqa: E402
from exporters.onnx_export import check_parity, export  # noqa: E402
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
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["probs"]
    image = proto.graph.input[0].type
    assert image.tensor_type.elem_type == onnx.TensorProto.UINT8
    # Issue 12's standard description: named batch dims, ONNX denotations and image metadata, a doc string,
    # flowerx as producer, a model version, the contract version; normalisation said to be inside the graph.
    assert [d.dim_param or d.dim_value for d in image.tensor_type.shape.dim] == ["N", 8, 8, 3]
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
    assert meta["labels"] == '["a", "b", "c", "d"]' and meta["input_size"] == "8" and meta["flowerx_contract"] == "1"
    assert meta["Image.BitmapPixelFormat"] == "Rgb8" and meta["Image.NominalPixelRange"] == "NominalRange_0_255"
    assert "input_mean" not in meta and "do not normalise" in json.loads(meta["normalization"])["applied"]
    assert Contract.from_metadata(meta, "m.onnx") == contract  # and it reads back as the same contract
    with pytest.raises(ExportError, match="disagrees with Keras"):
        check_parity(data, tiny_model(1), images)
