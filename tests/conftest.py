"""Shared fixtures. Tests that need the real photos and weights read them from $FLOWERX_SHARED
(.ci/run points it at ../shared): unset -> skipped with the reason; set but incomplete -> failed."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_ENV = "FLOWERX_SHARED"
# flowerx's per-user cache (the feature networks' ONNX exports) in a folder of this test session, inherited by
# every `flowerx` process the tests start: no test reads or fills the user's own ~/.cache/flowerx.
if "FLOWERX_CACHE_DIR" not in os.environ:
    os.environ["FLOWERX_CACHE_DIR"] = tempfile.mkdtemp(prefix="flowerx-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FLOWERX_CACHE_DIR"], True)  # ours: made just above
DAISY = "flower_photos/daisy/21652746_cc379e0eea_m.jpg"
NEEDED = (
    "flower_photos/LICENSE.txt",
    DAISY,
    "models/mobilenet_2_5_224_tf_no_top.h5",
    "models/mobilenet_1_0_224_tf_no_top.h5",
)


@pytest.fixture(scope="session")
def shared() -> Path:
    value = os.environ.get(SHARED_ENV)
    if not value:
        pytest.skip(f"{SHARED_ENV} is not set: point it at the folder with flower_photos/ and models/")
    root = Path(value)
    missing = [p for p in NEEDED if not (root / p).exists()]
    if missing:
        pytest.fail(f"{SHARED_ENV}={root} is set but lacks {', '.join(missing)}")
    return root


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m flowerx ARGS` in a real process, as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "flowerx", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def subset(shared: Path, dest: Path, per_class: int, classes: tuple[str, ...] = ("daisy", "roses", "tulips")) -> Path:
    """Copy the first per_class photos of some classes (a small real dataset)."""
    for label in classes:
        (dest / label).mkdir(parents=True)
        for src in sorted((shared / "flower_photos" / label).glob("*.jpg"))[:per_class]:
            shutil.copy(src, dest / label / src.name)
    return dest


def small_train_args(shared: Path, data: Path, work: Path, graph: Path | None = None, steps: str = "200") -> list[str]:
    """`flowerx train` on a small real dataset with mobilenet_0.25_224 and the real weights, no summaries."""
    return [
        "train", "--image-dir", str(data), "--architecture", "mobilenet_0.25_224", "--model-dir",
        str(shared / "models"), "--bottleneck-dir", str(work / "bn"), "--summaries-dir", "", "--output-graph",
        str(graph or work / "model.onnx"), "--how-many-training-steps", steps,
    ]  # fmt: skip


def make_image(path: Path, size=(64, 48), mode="RGB", fmt=None, seed=0, **save) -> Path:
    """A random-noise image in any mode/format."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path, fmt, **save)
    return path


@pytest.fixture(scope="session")
def trained(shared: Path, tmp_path_factory) -> dict:
    """mobilenet_0.25_224 trained on all the flower photos with the real weights: cold run, then warm rerun."""
    work = tmp_path_factory.mktemp("trained")
    args = (
        "train",
        "--image_dir",
        str(shared / "flower_photos"),
        "--architecture",
        "mobilenet_0.25_224",
        "--model-dir",
        str(shared / "models"),
        "--bottleneck-dir",
        str(work / "bottlenecks"),
        "--summaries-dir",
        str(work / "summaries"),
        "--output-graph",
        str(work / "out" / "model.onnx"),
        "--print-misclassified-test-images",
        "--head-only",  # retrain.py's job; fine-tuning has tests of its own
    )
    cold = run_cli(*args)
    assert cold.returncode == 0, cold.stderr + cold.stdout
    warm = run_cli(*args)
    assert warm.returncode == 0, warm.stderr + warm.stdout
    return {
        "dir": work,
        "model": work / "out" / "model.onnx",
        "labels": work / "out" / "model.labels.txt",
        "cold": cold,
        "warm": warm,
    }


def write_tiny_model(
    path: Path, labels=("red", "green", "blue"), size: int = 8, metadata: dict | None = None, input_shape=None
) -> Path:
    """A flowerx-contract ONNX model built by hand (no TensorFlow): the label is the dominant colour."""
    import json

    import onnx
    from onnx import TensorProto, helper

    k = len(labels)
    weights = np.eye(3, k, dtype=np.float32) * 0.1  # logits = 0.1 * mean channel value
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, input_shape or ["N", size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, k], weights.flatten())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    meta = (
        {"labels": json.dumps(list(labels)), "input_size": str(size), "resize": "bilinear", "architecture": "tiny"}
        if metadata is None
        else metadata
    )
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def write_tiny_v2_model(path: Path, labels=("red", "green", "blue"), training: dict | None = None) -> Path:
    """write_tiny_model's network as flowerx exports it (contract 2: any size in, labels out); needs onnx."""
    onnx = pytest.importorskip("onnx")
    from exporters.onnx_export import package
    from flowerx.contract import Contract

    proto = onnx.load(write_tiny_model(path.with_name(f".{path.stem}.v1.onnx"), labels))
    contract = Contract(list(labels), 8, "tiny", training=training or {})
    onnx.save(package(proto, contract.description("test")), path)
    return path


def solid(path: Path, colour, size=(30, 20)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path
