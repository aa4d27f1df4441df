"""int8 models: static QDQ quantization of the feature network, with the head re-fitted to its features.

onnxruntime's `quantize_dynamic` makes these conv nets slower; static QDQ (per-channel int8 weights, uint8
activations with MinMax ranges from 200 training images, the first convolution and the depthwise one after it
float) makes them 2-3x faster.
Quantizing shifts the features a little, which costs the float head 1-2 points; re-training the head on
the int8 network's own features (seconds) wins most of that back. The int8 model is written beside the float
one only when its test accuracy is within `max_drop` points of the float model's. Training side: needs onnx
and TensorFlow.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from exporters import ExportError
from exporters.int8 import streams_histograms
from exporters.names import CALIBRATIONS

from .bottlenecks import stream_session
from .contract import CONTRACT_VERSION, HEAD_BIAS, HEAD_KERNEL, HEAD_PREFIX, Contract
from .data import ImageItem, discover, prepare_image, split_names
from .errors import FlowerxError, ImageError
from .events import QUIET, Events
from .fileio import atomic_write, check_outputs
from .head import HeadConfig, accuracy_of, train_head
from .parallel import chunked, map_ahead

CALIBRATION_IMAGES = 200  # activation ranges come from this many training images
# --int8-calibration (exporters.int8.quantize_features). Measured on mobilenet_0.25_224 (head only, test split,
# float 89.0%), before the first convolution stayed float: minmax 87.1%, percentile 99.999 87.5% (99.99: 87.5,
# 99.9: 87.1), entropy 87.1% (minmax with it float: 88.1%); the histogram methods' peak memory is MinMax's
# (830 MB), not the 3 GB of onnxruntime's own calibrators.
QUANTIZATION = (
    "int8 static QDQ, per-channel weights, {}-calibrated activations, first convolution and the depthwise one after"
    " it float, convolution biases corrected, head re-fitted"
)


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


def compute_features(
    model_bytes: bytes, items: list[ImageItem], size: int, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Features of items through an ONNX feature network: one decode+infer stream per core. Returns
    (features [n, D], ok [n]); unreadable images are not ok."""
    network = stream_session(model_bytes)

    def batch(indices: range) -> tuple[list[int], np.ndarray | None]:
        good, images = [], []
        for i in indices:
            try:
                images.append(prepare_image(items[i].path, size))
                good.append(i)
            except ImageError:
                continue
        return good, network(np.stack(images)) if images else None

    features, ok = None, np.zeros(len(items), bool)
    with map_ahead(batch, chunked(range(len(items)), batch_size)) as done:
        for good, out in done:
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
    head: HeadConfig | None = None,
    follow_links: bool = False,
    calibration_images: int = CALIBRATION_IMAGES,
    calibration: str = "minmax",
) -> Int8Result:
    """Write <graph>.int8.onnx beside a flowerx float model, calibrated and re-fitted on image_dir's
    training split, if its test accuracy is within max_drop points of the float model's. The head is
    re-fitted as `head` says, by default as the model's training record says it was trained."""
    import onnx

    from exporters.int8 import quantize_features, strip_head

    from .predictor import Predictor

    check_int8_arguments(max_drop, calibration)
    float_graph = Path(float_graph).expanduser()
    path = int8_path(float_graph)
    check_outputs({"the int8 model": path}, {"--graph": float_graph}, {"image dir": image_dir})
    contract = Predictor(float_graph, providers="cpu").contract
    if contract.quantization:
        raise FlowerxError(f"{float_graph} is already an int8 model: give the float model it was made from")
    items, y, names = labelled_split(contract, float_graph.name, image_dir, follow_links)
    model = onnx.load(str(float_graph))
    try:
        features_model = strip_head(model)
    except ExportError as e:
        raise FlowerxError(str(e)) from None
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith(HEAD_PREFIX)}
    head_cfg = head or _recorded_head(contract)
    images = calibration_set(items, names, contract.input_size, head_cfg.seed, calibration_images)
    events.info(f"int8: calibrating on {len(images)} training images ({calibration}), then correcting biases")
    quantized = quantize_features(features_model, images, calibration)
    int8_x, ok = compute_features(quantized, items, contract.input_size)
    splits = {s: np.flatnonzero((names == s) & ok) for s in ("train", "validation", "test")}
    test = splits["test"]
    if not len(test):
        raise FlowerxError("no test images to compare the int8 model with")
    float_x, _ = compute_features(features_model.SerializeToString(), [items[i] for i in test], contract.input_size)
    float_acc = accuracy_of(float_x, y[test], np.arange(len(test)), weights[HEAD_KERNEL], weights[HEAD_BIAS])
    events.info("int8: re-fitting the head on the int8 network's features")
    kernel, bias, _ = train_head(
        int8_x, y, splits, len(contract.labels), replace(head_cfg, eval_interval=head_cfg.steps)
    )
    int8_acc = accuracy_of(int8_x, y, test, kernel, bias)
    drop = (float_acc - int8_acc) * 100
    summary = (
        f"int8 test accuracy {int8_acc * 100:.1f}% vs float {float_acc * 100:.1f}% "
        f"(N={len(test)}, drop {drop:.1f} points, limit {max_drop:.1f})"
    )
    if not drop <= max_drop:  # NaN-safe: an accuracy that is not a number never passes
        return Int8Result(path, False, float_acc, int8_acc, len(test), f"{summary}: int8 model not written")
    record = {"test_accuracy": round(int8_acc, 6), "float_test_accuracy": round(float_acc, 6), "test_count": len(test)}
    _write(path, contract, {**record, "calibration": calibration}, quantized, kernel, bias, images[:8])
    return Int8Result(path, True, float_acc, int8_acc, len(test), f"{summary}: wrote {path}")


def check_int8_arguments(max_drop: float, calibration: str) -> None:
    """--max-accuracy-drop and --int8-calibration, before any work (flowerx train checks them at its start)."""
    if not math.isfinite(max_drop):  # negative is allowed: the int8 model must then be better by that much
        raise FlowerxError(f"--max-accuracy-drop must be a finite number, got {max_drop}")
    if calibration not in CALIBRATIONS or (calibration != "minmax" and not streams_histograms()):
        raise FlowerxError(
            f"--int8-calibration {calibration!r}: one of {', '.join(CALIBRATIONS)} (the histogram "
            "methods need onnxruntime 1.32 or later)"
        )


def labelled_split(
    contract: Contract, name: str, image_dir: str, follow_links: bool
) -> tuple[list[ImageItem], np.ndarray, np.ndarray]:
    """image_dir's items, their label indices in the model's order, and the training run's split of them."""
    dataset = discover(image_dir, follow_links)
    unknown = [label for label in dataset.labels if label not in contract.labels]
    if unknown:
        raise FlowerxError(f"folders {', '.join(unknown)} are not labels of {name}")
    y = np.array([contract.labels.index(dataset.labels[i.label]) for i in dataset.items])
    names = split_names(dataset.items, *(contract.split_percentages(name) or (10.0, 10.0)))
    return dataset.items, y, names


def _recorded_head(contract: Contract) -> HeadConfig:
    """The head's settings as the model's training record has them (defaults for older models)."""
    config = contract.training.get("config") or {}
    names = {
        "steps": "how_many_training_steps",
        "learning_rate": "learning_rate",
        "batch_size": "train_batch_size",
        "validation_batch_size": "validation_batch_size",
        "seed": "seed",
    }
    return HeadConfig(**{k: config[v] for k, v in names.items() if isinstance(config.get(v), (int, float))})


def calibration_set(items: list[ImageItem], names: np.ndarray, size: int, seed: int, count: int) -> np.ndarray:
    """count readable training images, picked at random (seeded), decoded on all cores."""
    train_items = [items[i] for i in np.flatnonzero(names == "train")]

    def decode(k: int) -> np.ndarray | None:
        try:
            return prepare_image(train_items[k].path, size)
        except ImageError:
            return None

    calibration = []
    with map_ahead(decode, np.random.default_rng(seed).permutation(len(train_items))) as decoded:
        for image in decoded:
            if image is not None:
                calibration.append(image)
            if len(calibration) == count:
                break
    if not calibration:
        raise FlowerxError("no readable training images to calibrate the int8 model on")
    return np.stack(calibration)


def _write(
    path: Path,
    contract: Contract,
    record: dict,
    quantized: bytes,
    kernel: np.ndarray,
    bias: np.ndarray,
    images: np.ndarray,
) -> None:
    """The int8 features plus the re-fitted head, with the float model's contract updated, checked, written."""
    import onnx

    from exporters.onnx_export import append_head, package

    from . import __version__

    combined = append_head(onnx.load_from_string(quantized), kernel, bias)
    contract = replace(
        contract,
        quantization=QUANTIZATION.format(record["calibration"]),
        training={**contract.training, **record},
        version=CONTRACT_VERSION,
    )
    data = package(combined, contract.description(__version__)).SerializeToString()
    _check_composition(data, quantized, kernel, bias, images)
    atomic_write(path, data)


def _check_composition(model: bytes, features: bytes, kernel: np.ndarray, bias: np.ndarray, images: np.ndarray) -> None:
    """The written model must equal int8 features followed by the re-fitted head."""
    got = stream_session(model)(images)
    logits = stream_session(features)(images) @ kernel + bias
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    if not np.abs(got - want).max() <= 1e-4:  # NaN-safe
        raise FlowerxError("the int8 model does not match its parts; not written")
