"""int8 (static QDQ) conversion of a flowerx model's feature network, and the head's removal to get it.

onnxruntime's `quantize_dynamic` makes these conv nets slower; static QDQ (per-channel int8 weights, uint8
activations with MinMax ranges from real images; the first convolution and a depthwise one after it stay
float) makes them 2-3x faster.
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


def quantize_features(features_model, calibration: np.ndarray, method: str = "minmax") -> bytes:
    """Static QDQ int8 (per-channel weights, uint8 activations) of a feature network, its activation ranges
    from the calibration images by MinMax, or by a percentile (99.999) or entropy of streamed histograms. The
    first convolution, the normalisation before it and a depthwise convolution after it stay in float
    (float_front)."""
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
                nodes_to_exclude=float_front(onnx.load(pre_path)),
            )
        return Path(out_path).read_bytes()
