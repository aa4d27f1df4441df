"""The export's self-check: a converted model that disagrees with Keras is refused."""

import numpy as np
import pytest

pytest.importorskip("tf2onnx")

from exporters import ExportError  # noqa: E402
from exporters.onnx_export import check_parity, export  # noqa: E402
from flowerx.backbone import keras  # noqa: E402  (imports TensorFlow quietly)


def tiny_model(seed: int):
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 3), dtype="uint8", name="image")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 127.5, offset=-1)(keras.ops.cast(image, "float32")))
    return keras.Model(image, keras.layers.Dense(4, activation="softmax")(x))


def test_export_writes_contract_and_refuses_a_mismatch():
    import onnx

    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    model = tiny_model(0)
    data, diff = export(model, 8, {"labels": ["a", "b", "c", "d"], "input_size": "8"}, images)
    assert diff <= 1e-4
    proto = onnx.load_from_string(data)
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["probs"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta == {"labels": '["a", "b", "c", "d"]', "input_size": "8"}
    with pytest.raises(ExportError, match="disagrees with Keras"):
        check_parity(data, tiny_model(1), images)
