"""int8 export on a small real subset (needs $FLOWERX_SHARED)."""

import json
import re

import numpy as np
import pytest
from conftest import DAISY, run_cli, small_train_args, subset

from flowerx import Predictor


@pytest.mark.slow
def test_quantize_int8_writes_a_faithful_smaller_model_or_refuses(shared, tmp_path):
    data = subset(shared, tmp_path / "data", per_class=25)
    graph = tmp_path / "out" / "model.onnx"
    result = run_cli(
        *small_train_args(shared, data, tmp_path, graph, steps="300"),
        "--testing-percentage",
        "30",
        "--quantize",
        "int8",
        "--max-accuracy-drop",
        "100",
        "--int8-calibration",
        "percentile",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"int8 test accuracy [\d.]+% vs float [\d.]+% \(N=\d+, drop -?[\d.]+ points", result.stdout)
    int8 = graph.with_name("model.int8.onnx")
    fp32, q = Predictor(graph), Predictor(int8)
    assert q.labels == fp32.labels and q.input_size == fp32.input_size == 224
    assert "int8" in q.metadata["quantization"] and json.loads(q.metadata["training"])["float_test_accuracy"] >= 0
    assert json.loads(q.metadata["training"])["calibration"] == "percentile"
    assert int8.stat().st_size < graph.stat().st_size * 0.6  # int8 weights (the small net's graph overhead stays)
    images = [p for p in sorted(data.rglob("*.jpg"))[::5]]
    agree = np.mean([fp32.predict(p)[0][0] == q.predict(p)[0][0] for p in images])
    assert agree >= 0.8, agree
    assert q.predict(shared / DAISY)[0][0] == "daisy"

    refused = run_cli("export-int8", "--graph", str(graph), "--image-dir", str(data), "--max-accuracy-drop", "-100")
    assert refused.returncode == 1 and "int8 model not written" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_calibration_uses_every_batch(tmp_path, method, monkeypatch):
    """onnxruntime 1.32 drops batches at CalibMaxIntermediateOutputs without folding them into the ranges
    (and fails on an even number of batches): flowerx must calibrate on all of its images. The histogram
    methods see them one batch at a time (onnxruntime would hold every activation of every image)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import calibrate

    from exporters.int8 import quantize_features

    batches = []
    collect = calibrate.HistogramCalibrater.collect_data

    def counted(self, reader):
        batches.append(1)
        return collect(self, reader)

    monkeypatch.setattr(calibrate.HistogramCalibrater, "collect_data", counted)

    model = _two_convs()
    bright = np.full((8, 8, 8, 3), 250, np.uint8)  # only the first of two batches is bright
    dark = np.random.default_rng(1).integers(0, 10, (8, 8, 8, 3), dtype=np.uint8)
    quantized = onnx.load_from_string(quantize_features(model, np.concatenate([bright, dark]), method))
    assert len(batches) == (0 if method == "minmax" else 2)  # streamed: one call per batch of 8
    scales = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer if i.name.endswith("_scale")}
    scale = next(float(v) for k, v in scales.items() if k.startswith("front_"))  # the second conv's input
    assert scale > 250 / 255 * 0.9, scales  # the bright batch counted (alone, the dark one gives ~10/255)


def _two_convs(depthwise: bool = False):
    """uint8 NHWC -> Cast -> Mul (normalise) -> Transpose -> 1x1 identity conv ("front": the pixels again)
    -> 3x3 conv -> mean: a feature network in miniature. depthwise: a ReLU and a 3x3 depthwise conv between
    the two (MobileNet's first block)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1) * 2, "identity"),
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(rng.normal(size=(3, 1, 3, 3)).astype(np.float32), "dw"),
    ]
    block = [
        ("Relu", ["front"], ["relu"], {}),
        ("Conv", ["relu", "dw"], ["block"], {"group": 3, "pads": [1, 1, 1, 1]}),
    ]
    nodes = [
        ("Cast", ["image"], ["x"], {"to": TensorProto.FLOAT}),
        ("Mul", ["x", "half"], ["scaled"], {}),
        ("Transpose", ["scaled"], ["nchw"], {"perm": [0, 3, 1, 2]}),
        ("Conv", ["nchw", "identity"], ["front"], {}),
        *(block if depthwise else []),
        ("Conv", ["block" if depthwise else "front", "w"], ["conv"], {}),
        ("ReduceMean", ["conv"], ["features"], {"axes": [2, 3], "keepdims": 0}),
    ]
    return _features_model(
        [helper.make_node(op, i, o, name=f"{op.lower()}_{n}", **a) for n, (op, i, o, a) in enumerate(nodes)],
        weights if depthwise else weights[:3],
        channels=4,
    )


def _features_model(nodes: list, initializers: list, channels: int):
    """A feature network in miniature: uint8 NHWC 8 x 8 images in, `features` [N, channels] out."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "features",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 8, 8, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", channels])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def _mean_features(model: bytes, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images})[0].mean(axis=0)


def test_the_first_convolution_and_the_normalisation_stay_in_float():
    """In int8 the first convolution (3 input channels) was the slowest node: it and the normalisation before
    it stay float; the rest is quantized."""
    import onnx

    from exporters.int8 import float_front, quantize_features

    model = _two_convs()
    assert float_front(model) == ["conv_3", "transpose_2", "mul_1"]  # back from the first conv, not past Cast
    images = np.random.default_rng(2).integers(0, 255, (8, 8, 8, 3), dtype=np.uint8)
    quantized = onnx.load_from_string(quantize_features(model, images))
    ops = {n.name: n.op_type for n in quantized.graph.node}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    first, second = (next(n for n in quantized.graph.node if n.name == name) for name in ("conv_3", "conv_4"))
    assert first.input[1] == "identity" and ops["mul_1"] == "Mul"  # float weights, no DequantizeLinear
    assert producer[second.input[1]].op_type == "DequantizeLinear"  # int8 weights
    assert producer[second.input[0]].op_type == "DequantizeLinear"  # uint8 activations in


def test_a_depthwise_convolution_after_the_first_stays_in_float_too():
    """onnxruntime's int8 depthwise kernel is slow on the few channels after the first convolution (8 in
    mobilenet_0.25_224: 319 us against 68 in float): that convolution and the activation before it stay float
    as well; the next one (not depthwise) is quantized."""
    import onnx

    from exporters.int8 import float_front, quantize_features

    model = _two_convs(depthwise=True)
    assert float_front(model) == ["conv_3", "transpose_2", "mul_1", "relu_4", "conv_5"]
    images = np.random.default_rng(2).integers(0, 255, (8, 8, 8, 3), dtype=np.uint8)
    quantized = onnx.load_from_string(quantize_features(model, images))
    producer = {o: n for n in quantized.graph.node for o in n.output}
    by_name = {n.name: n for n in quantized.graph.node}
    assert by_name["conv_5"].input[1] == "dw" and producer[by_name["conv_5"].input[0]].op_type == "Relu"  # float
    assert producer[by_name["conv_6"].input[1]].op_type == "DequantizeLinear"  # int8 weights
    assert producer[by_name["conv_6"].input[0]].op_type == "DequantizeLinear"  # uint8 activations in


def test_what_stays_float_still_runs_in_float_in_onnxruntime(tmp_path, monkeypatch):
    """onnxruntime's WeightBiasQuantization optimizer (1.21+) quantizes, as it loads a model, the weights of
    any float convolution between a DequantizeLinear and a QuantizeLinear, per tensor: a convolution kept
    float in the middle of the int8 network runs int8 after all, with worse weights (mobilenet_0.25_224 with
    one depthwise convolution "kept float": 0.81 relative error in the features, against 0.19). Only a front
    that no DequantizeLinear feeds can stay float, which is what float_front keeps."""
    import onnx
    import onnxruntime as ort

    from exporters import int8

    def float_after_loading(quantized: bytes) -> set[str]:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # where it runs
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(quantized, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
        constants = {i.name for i in optimized.graph.initializer}  # float weights, not a DequantizeLinear's
        return {n.name for n in optimized.graph.node if n.op_type == "Conv" and n.input[1] in constants}

    model = _two_convs(depthwise=True)
    images = np.random.default_rng(2).integers(0, 255, (8, 8, 8, 3), dtype=np.uint8)
    assert float_after_loading(int8.quantize_features(model, images)) == {"conv_3", "conv_5"}
    monkeypatch.setattr(int8, "float_front", lambda model: ["conv_5"])  # the depthwise one alone, int8 around it
    assert float_after_loading(int8.quantize_features(model, images)) == set()


def test_bias_correction_gives_each_int8_convolution_its_float_mean():
    """Weights below half an int8 step all round to zero, here all of the same sign: every channel's mean moves
    by about 10 (7%; in MobileNet such moves are a few percent per layer and add up). After bias correction
    the int8 network's mean per channel on the calibration images is the float one's again, its bias still
    int32 behind a DequantizeLinear."""
    import onnx
    from onnx import numpy_helper

    from exporters.int8 import quantize_features

    model = _two_convs()
    weights = np.full((4, 3, 3, 3), 0.003, np.float32)  # int8 step 1/127: these round to 0
    weights[np.arange(4), np.arange(4) % 3, 1, 1] = 1.0
    next(i for i in model.graph.initializer if i.name == "w").CopyFrom(numpy_helper.from_array(weights, "w"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([0.5, -0.5, 1, 0], np.float32), "b"))
    next(n for n in model.graph.node if n.name == "conv_4").input.append("b")
    images = np.random.default_rng(3).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)  # two batches of 8

    float_mean = _mean_features(model.SerializeToString(), images)
    plain = quantize_features(model, images, bias_correction=False)
    corrected = quantize_features(model, images)
    assert np.abs(_mean_features(plain, images) - float_mean).min() > 5
    assert np.abs(_mean_features(corrected, images) - float_mean).max() < 0.2
    biases = []
    for quantized in map(onnx.load_from_string, (plain, corrected)):
        producer = {o: n for n in quantized.graph.node for o in n.output}
        dq = producer[next(n for n in quantized.graph.node if n.name == "conv_4").input[2]]
        assert dq.op_type == "DequantizeLinear"
        biases.append(next(numpy_helper.to_array(i) for i in quantized.graph.initializer if i.name == dq.input[0]))
    assert biases[1].dtype == np.int32 and (biases[1] > biases[0]).all()  # raised to make up for the lost weights


def test_bias_correction_in_network_order_along_a_chain(monkeypatch):
    """Four int8 1x1 convolutions with ReLUs after a float first one: each is corrected after those before it,
    and the network's output means land on the float ones. Corrected all at once from one pass, each would
    also make up for shifts that the corrections before it remove, and overshoot (0.013 here, worse than none)."""
    from onnx import TensorProto, helper, numpy_helper

    from exporters import int8

    rng, channels = np.random.default_rng(0), 8
    inits = [numpy_helper.from_array(np.array(1 / 128, np.float32), "half")]
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["x", "half"], ["scaled"], name="mul"),
        helper.make_node("Transpose", ["scaled"], ["a0"], perm=[0, 3, 1, 2], name="transpose"),
    ]
    for k in range(5):  # conv0: 3x3 on the pixels (stays float), then four 1x1
        shape, scale, offset, bias = (
            ((channels, 3, 3, 3), 0.3, 0, 1) if k == 0 else ((channels,) * 2 + (1, 1), 0.4, 0.002, 0.1)
        )
        inits.append(numpy_helper.from_array((rng.normal(size=shape) * scale + offset).astype(np.float32), f"w{k}"))
        inits.append(numpy_helper.from_array((rng.normal(size=channels) * bias).astype(np.float32), f"b{k}"))
        pads = [shape[2] // 2] * 4
        nodes.append(helper.make_node("Conv", [f"a{k}", f"w{k}", f"b{k}"], [f"c{k}"], pads=pads, name=f"conv{k}"))
        nodes.append(helper.make_node("Relu", [f"c{k}"], [f"a{k + 1}"], name=f"relu{k}"))
    nodes.append(helper.make_node("ReduceMean", ["a5"], ["features"], axes=[2, 3], keepdims=0, name="mean"))
    model = _features_model(nodes, inits, channels)
    images = np.random.default_rng(3).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    counts = []
    correct = int8.correct_biases
    monkeypatch.setattr(int8, "correct_biases", lambda *a, **k: counts.append(correct(*a, **k)) or counts[-1])

    float_mean = _mean_features(model.SerializeToString(), images)
    plain = int8.quantize_features(model, images, bias_correction=False)
    corrected = int8.quantize_features(model, images)
    assert counts == [4]  # every int8 convolution, none of the float one
    assert np.abs(_mean_features(plain, images) - float_mean).max() > 0.006
    assert np.abs(_mean_features(corrected, images) - float_mean).max() < 0.003


def test_a_bad_calibration_fails_before_any_work():
    from flowerx import FlowerxError
    from flowerx.train import TrainConfig

    with pytest.raises(FlowerxError, match="--int8-calibration 'bogus': one of minmax, percentile, entropy"):
        TrainConfig(image_dir="photos", quantize="int8", int8_calibration="bogus").check()
    TrainConfig(image_dir="photos", int8_calibration="bogus").check()  # no --quantize int8: not used, not checked
