"""int8 models: static QDQ quantization of the feature network, with the head re-fitted to its features.

onnxruntime's `quantize_dynamic` makes these conv nets slower; static QDQ (per-channel int8 weights, uint8
activations with MinMax ranges from 200 training images) makes them about 2x faster. Quantizing shifts the features a
little, which costs the float head 1-2 points; re-training the head on the int8 network's own features
(seconds) wins most of that back. The int8 model is written beside the float one only when its test
accuracy is within `max_drop` points of the float model's. Training side: needs onnx and TensorFlow.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bottlenecks import stream_session
from .data import ImageItem, discover, prepare_image, split_names
from .errors import FlowerxError, ImageError
from .events import QUIET, Events
from .fileio import atomic_write, check_outputs

CALIBRATION_IMAGES = 200


@dataclass
class Int8Result:
    path: Path
    written: bool
    float_accuracy: float
    int8_accuracy: float
    test_count: int
    message: str


def int8_path(float_graph: str | os.PathLike) -> Path:
    path = Path(float_graph)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def strip_head(model):
    """The feature network of a flowerx model: everything before the `head/` nodes, output = features."""
    import onnx

    features = next((n.input[0] for n in model.graph.node if n.name == "head/MatMul"), None)
    if features is None:
        raise FlowerxError("this model has no flowerx head (head/MatMul): export it with flowerx 0.1 or later")
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    keep = [n for n in stripped.graph.node if not n.name.startswith("head/")]
    del stripped.graph.node[:]
    stripped.graph.node.extend(keep)
    weights = [i for i in stripped.graph.initializer if not i.name.startswith("head/")]
    del stripped.graph.initializer[:]
    stripped.graph.initializer.extend(weights)
    del stripped.graph.output[:]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param or "N"
    stripped.graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, [batch, None]))
    del stripped.metadata_props[:]
    return stripped


def quantize_features(features_model, calibration: np.ndarray) -> bytes:
    """Static QDQ int8 (per-channel weights, MinMax-calibrated uint8 activations) of a feature network."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    step = 8 if len(calibration) >= 8 else len(calibration)
    usable = len(calibration) - len(calibration) % step  # equal batches: the calibrator stacks their outputs

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": calibration[i : i + step]} for i in range(0, usable, step)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="flowerx-int8-") as work:
        float_path, pre_path, out_path = (os.path.join(work, n) for n in ("f.onnx", "pre.onnx", "q.onnx"))
        onnx.save(features_model, float_path)
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its progress
            quant_pre_process(float_path, pre_path, skip_symbolic_shape=True)  # folds BatchNorm, infers shapes
            quantize_static(
                pre_path,
                out_path,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                # fold each 2 batches into running ranges: the histogram calibrators (entropy, percentile)
                # keep every activation (10 GB for mobilenet_1.0_224 and 200 images)
                extra_options={"CalibMaxIntermediateOutputs": 2},
            )
        return Path(out_path).read_bytes()


def compute_features(model_bytes: bytes, items: list[ImageItem], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of items through an ONNX feature network: one decode+infer stream per core."""
    network = stream_session(model_bytes)

    def batch(start: int) -> tuple[list[int], np.ndarray | None]:
        good, images = [], []
        for i in range(start, min(start + 32, len(items))):
            try:
                images.append(prepare_image(items[i].path, size))
                good.append(i)
            except ImageError:
                continue
        return good, network(np.stack(images)) if images else None

    features, ok = None, np.zeros(len(items), bool)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for good, out in pool.map(batch, range(0, len(items), 32)):
            if out is None:
                continue
            if features is None:
                features = np.zeros((len(items), out.shape[1]), np.float32)
            features[good], ok[good] = out, True
    if features is None:
        raise FlowerxError("none of the images can be read")
    return features, ok


def export_int8(
    float_graph: str | os.PathLike,
    image_dir: str,
    max_drop: float = 1.0,
    events: Events = QUIET,
    steps: int = 4000,
    learning_rate: float = 0.01,
    seed: int = 0,
    follow_links: bool = False,
) -> Int8Result:
    """Write <graph>.int8.onnx beside a flowerx float model, calibrated and re-fitted on image_dir's
    training split, if its test accuracy is within max_drop points of the float model's."""
    import onnx

    from exporters.onnx_export import append_head, set_metadata

    from .predictor import Predictor, read_training, split_percentages
    from .train import TrainConfig, accuracy_of, train_head

    if not math.isfinite(max_drop):  # negative is allowed: the int8 model must then be better by that much
        raise FlowerxError(f"--max-accuracy-drop must be a finite number, got {max_drop}")
    float_graph = Path(float_graph).expanduser()
    check_outputs({"the int8 model": int8_path(float_graph)}, {"--graph": float_graph})
    predictor = Predictor(float_graph, providers="cpu")
    meta, size = dict(predictor.metadata), predictor.input_size
    training = read_training(meta, float_graph.name)
    val_pct, test_pct = split_percentages(training, float_graph.name) or (10.0, 10.0)
    dataset = discover(image_dir, follow_links)
    unknown = [label for label in dataset.labels if label not in predictor.labels]
    if unknown:
        raise FlowerxError(f"folders {', '.join(unknown)} are not labels of {float_graph.name}")
    items = dataset.items
    y = np.array([predictor.labels.index(dataset.labels[i.label]) for i in items])
    names = split_names(items, val_pct, test_pct)

    model = onnx.load(str(float_graph))
    features_model = strip_head(model)
    initializers = {
        i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("head/")
    }
    rng = np.random.default_rng(seed)
    train_items = [items[i] for i in np.flatnonzero(names == "train")]
    calibration = []
    for k in rng.permutation(len(train_items)):
        try:
            calibration.append(prepare_image(train_items[k].path, size))
        except ImageError:
            continue
        if len(calibration) == CALIBRATION_IMAGES:
            break
    if not calibration:
        raise FlowerxError("no readable training images to calibrate the int8 model on")
    events.info(f"int8: calibrating on {len(calibration)} training images")
    quantized = quantize_features(features_model, np.stack(calibration))
    int8_x, ok = compute_features(quantized, items, size)
    splits = {s: np.flatnonzero((names == s) & ok) for s in ("train", "validation", "test")}
    if not len(splits["test"]):
        raise FlowerxError("no test images to compare the int8 model with")
    float_x, _ = compute_features(features_model.SerializeToString(), [items[i] for i in splits["test"]], size)
    float_acc = accuracy_of(
        float_x,
        y[splits["test"]],
        np.arange(len(splits["test"])),
        initializers["head/kernel"],
        initializers["head/bias"],
    )
    events.info("int8: re-fitting the head on the int8 network's features")
    cfg = TrainConfig(
        image_dir=image_dir,
        how_many_training_steps=steps,
        learning_rate=learning_rate,
        eval_step_interval=steps,
        seed=seed,
    )
    kernel, bias, _ = train_head(int8_x, y, splits, len(predictor.labels), cfg, QUIET, None)
    int8_acc = accuracy_of(int8_x, y, splits["test"], kernel, bias)
    drop = (float_acc - int8_acc) * 100
    path = int8_path(float_graph)
    summary = (
        f"int8 test accuracy {int8_acc * 100:.1f}% vs float {float_acc * 100:.1f}% "
        f"(N={len(splits['test'])}, drop {drop:.1f} points, limit {max_drop:.1f})"
    )
    if not drop <= max_drop:  # NaN-safe: an accuracy that is not a number never passes
        return Int8Result(path, False, float_acc, int8_acc, len(splits["test"]), f"{summary}: int8 model not written")

    combined = append_head(onnx.load_from_string(quantized), kernel, bias)
    meta["quantization"] = "int8 static QDQ, per-channel weights, MinMax-calibrated activations, head re-fitted"
    meta["training"] = json.dumps(
        {
            **training,
            "test_accuracy": round(int8_acc, 6),
            "float_test_accuracy": round(float_acc, 6),
            "test_count": int(len(splits["test"])),
        }
    )
    set_metadata(combined, meta)
    data = combined.SerializeToString()
    _check_composition(data, quantized, kernel, bias, np.stack(calibration[:8]))
    atomic_write(path, data)
    return Int8Result(path, True, float_acc, int8_acc, len(splits["test"]), f"{summary}: wrote {path}")


def _check_composition(model: bytes, features: bytes, kernel: np.ndarray, bias: np.ndarray, images: np.ndarray) -> None:
    """The written model must equal int8 features followed by the re-fitted head."""
    import onnxruntime as ort

    got = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    x = ort.InferenceSession(features, providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    logits = x @ kernel + bias
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    if not np.abs(got - want).max() <= 1e-4:  # NaN-safe
        raise FlowerxError("the int8 model does not match its parts; not written")
