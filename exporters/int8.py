"""int8 (static QDQ) conversion of a flowerx model's feature network, and the head's removal to get it.

onnxruntime's `quantize_dynamic` makes these conv nets slower; static QDQ (per-channel int8 weights, uint8
activations with MinMax ranges from real images; the first convolution and a depthwise one after it stay
float) makes them 2-3x faster; each int8 convolution's bias is then corrected on the same images.
flowerx.quantize decides what to calibrate on, re-fits the head and gates on accuracy; this module only
converts.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from . import ExportError
from .names import HEAD_MATMUL, HEAD_PREFIX, INPUT, LABELS_PREFIX

# quantize_features' histogram methods (names.CALIBRATIONS after "minmax"): onnxruntime's calibrator, options
HISTOGRAMS = {
    "percentile": ("Percentile", {"percentile": 99.999, "symmetric": False}),
    "entropy": ("Entropy", {}),
}


def streams_histograms() -> bool:
    """Whether this onnxruntime's quantize_static can take ranges computed beforehand (calibration_cache_path),
    which the streamed histogram methods need."""
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def strip_head(model):
    """The feature network of a flowerx model: everything before the `head/` nodes, output = features, its
    input S x S (contract 2's resize and labels output removed)."""
    import onnx

    from .onnx_export import fixed_size_input

    model = fixed_size_input(model)
    features = next((n.input[0] for n in model.graph.node if n.name == HEAD_MATMUL), None)
    if features is None:
        raise ExportError(f"this model has no flowerx head ({HEAD_MATMUL}): export it with flowerx 0.1 or later")
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    keep = [n for n in stripped.graph.node if not n.name.startswith((HEAD_PREFIX, LABELS_PREFIX))]
    del stripped.graph.node[:]
    stripped.graph.node.extend(keep)
    weights = [i for i in stripped.graph.initializer if not i.name.startswith((HEAD_PREFIX, LABELS_PREFIX))]
    del stripped.graph.initializer[:]
    stripped.graph.initializer.extend(weights)
    del stripped.graph.output[:]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param or "N"
    stripped.graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, [batch, None]))
    del stripped.metadata_props[:]
    return stripped


def float_front(model) -> list[str]:
    """The names of what quantize_features keeps in float: the first convolution, the input normalisation
    before it (Mul/Add/Sub/Div, and a Transpose), and a depthwise convolution right after it (through its
    activation). In int8 that first convolution (3 input channels: an im2col of 27 values per output pixel)
    was the slowest node of mobilenet_1.0_224 (330 us of 2.4 ms at one thread), and onnxruntime's int8
    depthwise kernel wastes most of its vector on the few channels that follow it (8 in mobilenet_0.25_224:
    319 us of 1.5 ms, against 68 us in float). In float the two run as onnxruntime's NCHWc convolutions, and
    the int8 network is faster even with the quantize, reorder and transpose that then follow them
    (measured: mobilenet_0.25_224 16-21%, mobilenet_0.50_224 9%, mobilenet_1.0_224 1-3%). Only a front can
    stay float: onnxruntime (WeightBiasQuantization, 1.21+) quantizes, per tensor and at load time, the
    weights of a float convolution that a DequantizeLinear feeds and a QuantizeLinear follows."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    first = next((node for node in model.graph.node if node.op_type == "Conv"), None)
    if first is None:
        return []
    names, node = [first.name], producer.get(first.input[0])
    while node is not None and node.op_type in ("Mul", "Add", "Sub", "Div", "Transpose"):
        names.append(node.name)
        node = next((producer[i] for i in node.input if i in producer), None)  # the data, not a constant
    between, users = [], consumers.get(first.output[0], [])
    while len(users) == 1 and users[0].op_type in ("Relu", "Clip"):  # forward through the activation
        between.append(users[0].name)
        users = consumers.get(users[0].output[0], [])
    if len(users) == 1 and users[0].op_type == "Conv":
        group = next((a.i for a in users[0].attribute if a.name == "group"), 1)
        if group > 1 and group == _out_channels(model, first):  # depthwise over the first conv's channels
            names += [*between, users[0].name]
    return [name for name in names if name]  # an unnamed node cannot be told apart from the others


def _out_channels(model, conv) -> int:
    """A convolution's output channels, from its weights' first dimension (0 where they are not a constant)."""
    weights = next((i for i in model.graph.initializer if i.name == conv.input[1]), None)
    return int(weights.dims[0]) if weights is not None and weights.dims else 0


def _streamed_ranges(model_path: str, calibration: np.ndarray, step: int, method, options: dict, work: str):
    """Activation ranges from histograms built one batch at a time (onnxruntime's histogram calibrators
    keep every activation of every image otherwise: 3 GB for mobilenet_0.25_224 and 200 images): each
    collect_data call folds its batch into the running histograms and drops the activations."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import create_calibrator

    class One(CalibrationDataReader):
        def __init__(self, batch):
            self.batch = batch

        def get_next(self):
            batch, self.batch = self.batch, None
            return batch

    calibrator = create_calibrator(
        model_path, None, os.path.join(work, "augmented.onnx"), calibrate_method=method, extra_options=options
    )
    for i in range(0, len(calibration), step):
        calibrator.collect_data(One({INPUT: calibration[i : i + step]}))
    return calibrator.compute_data()


def _channel_means(model, names: list[str], images: np.ndarray, step: int) -> list[np.ndarray]:
    """The mean of each tensor `names` of a model over the images and every axis but the channels' (1)."""
    import onnx
    import onnxruntime as ort

    nodes = model.graph.node
    producer = {out: k for k, node in enumerate(nodes) for out in node.output}
    needed, todo = set(), list(names)  # the nodes these tensors depend on: the rest need not run
    while todo:
        k = producer.get(todo.pop())
        if k is not None and k not in needed:
            needed.add(k)
            todo.extend(nodes[k].input)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.node[:]
    probe.graph.node.extend(nodes[k] for k in sorted(needed))
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums, counts = [np.zeros(())] * len(names), [0] * len(names)
    for i in range(0, len(images), step):
        for k, out in enumerate(session.run(names, {INPUT: images[i : i + step]})):
            others = tuple(a for a in range(out.ndim) if a != 1)
            sums[k] = sums[k] + out.sum(axis=others, dtype=np.float64)
            counts[k] += out.size // out.shape[1]
    return [total / count for total, count in zip(sums, counts)]


def correct_biases(quantized, reference, calibration: np.ndarray, step: int = 8) -> int:
    """Empirical bias correction, in place: in network order, shift each int8 convolution's int32 bias so that
    the mean of its output per channel over the calibration images is the float network's (reference: the
    same graph before quantization), the convolutions before it corrected already. Rounding int8 weights moves
    a channel's mean by a few percent, and the moves add up along the network (OpenVINO's NNCF corrects them
    by default too; figures in README.md). Returns how many convolutions it corrected: those with an int32
    bias behind a DequantizeLinear, matched by node name (an unnamed one is left as it is).
    In order, not all at once: corrected together from one pass, each also makes up for the shifts before it,
    which their own corrections remove (tests/test_int8.py)."""
    from onnx import numpy_helper

    producer = {out: node for node in quantized.graph.node for out in node.output}
    constants = {i.name: i for i in quantized.graph.initializer}
    floats = {n.name: n for n in reference.graph.node if n.op_type == "Conv" and n.name}
    convs = []
    for node in quantized.graph.node:
        dq = producer.get(node.input[2]) if node.op_type == "Conv" and len(node.input) > 2 else None
        if (
            node.name in floats
            and dq is not None
            and dq.op_type == "DequantizeLinear"
            and {dq.input[0], dq.input[1]} <= constants.keys()
        ):
            convs.append((node, constants[dq.input[0]], numpy_helper.to_array(constants[dq.input[1]])))
    if not convs:
        return 0
    targets = _channel_means(reference, [floats[node.name].output[0] for node, _, _ in convs], calibration, step)
    for (node, bias, scale), target in zip(convs, targets):
        shift = _channel_means(quantized, [node.output[0]], calibration, step)[0] - target
        steps = np.divide(shift, scale, out=np.zeros_like(shift), where=scale > 0)  # in units of the int32 bias
        values = np.clip(numpy_helper.to_array(bias) - np.round(steps), -(2**31), 2**31 - 1)  # float64: no wrap
        bias.CopyFrom(numpy_helper.from_array(values.astype(np.int32), bias.name))
    return len(convs)


def quantize_features(
    features_model, calibration: np.ndarray, method: str = "minmax", bias_correction: bool = True
) -> bytes:
    """Static QDQ int8 (per-channel weights, uint8 activations) of a feature network, its activation ranges
    from the calibration images by MinMax, or by a percentile (99.999) or entropy of streamed histograms, and
    its convolutions' biases corrected on the same images (correct_biases). The first convolution, the
    normalisation before it and a depthwise convolution after it stay in float (float_front)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    step = 8 if len(calibration) >= 8 else len(calibration)
    usable = len(calibration) - len(calibration) % step  # equal batches: the calibrator stacks their outputs

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT: calibration[i : i + step]} for i in range(0, usable, step)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="flowerx-int8-") as work:
        float_path, pre_path, out_path = (os.path.join(work, n) for n in ("f.onnx", "pre.onnx", "q.onnx"))
        onnx.save(features_model, float_path)
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its progress
            quant_pre_process(float_path, pre_path, skip_symbolic_shape=True)  # folds BatchNorm, infers shapes
            prepared = onnx.load(pre_path)  # what is quantized: float_front reads it, bias correction aims at it
            streamed, cache = HISTOGRAMS.get(method), None
            if streamed is not None:  # flowerx.quantize checked that this onnxruntime can (streams_histograms)
                cache = os.path.join(work, "ranges.json")  # quantize_static reads the ranges from it
                ranges = _streamed_ranges(
                    pre_path, calibration, step, getattr(CalibrationMethod, streamed[0]), streamed[1], work
                )
                save_tensors_data(ranges, cache)
            quantize_static(
                pre_path,
                out_path,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                # MinMax keeps only each tensor's min and max per batch (onnxruntime's histogram calibrators
                # keep every activation, 10 GB for mobilenet_1.0_224 and 200 images, unless streamed as
                # above). No CalibMaxIntermediateOutputs:
                # onnxruntime 1.32 drops the collected batches at that limit without folding them into the
                # ranges (microsoft/onnxruntime#18893), so only the last few batches counted, and an even
                # number of batches failed with "No data is collected".
                calibrate_method=getattr(CalibrationMethod, streamed[0]) if streamed else CalibrationMethod.MinMax,
                calibration_cache_path=cache,
                nodes_to_exclude=float_front(prepared),
            )
        if not bias_correction:
            return Path(out_path).read_bytes()
        quantized = onnx.load(out_path)
        correct_biases(quantized, prepared, calibration[:usable], step)
        return quantized.SerializeToString()
