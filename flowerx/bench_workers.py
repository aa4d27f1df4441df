"""flowerx bench's workers, each run in its own process by `flowerx bench` (flowerx/bench.py).

  python -m flowerx.bench_workers prepare  ...  build one model in every runtime's format (TensorFlow)
  python -m flowerx.bench_workers measure  ...  time one runtime on one model; prints one JSON line
  python -m flowerx.bench_workers tf-classify  the TensorFlow counterpart of `flowerx classify one.jpg`

One process per runtime: TensorFlow loaded in the same process slows onnxruntime down, and peak memory is
only meaningful per process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from flowerx.bench import PREDICTOR_RUNTIMES, RUNTIMES


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _calibration_images(size: int, image_dir: str | None, n: int = 16) -> np.ndarray:
    """Real photos when a folder is given, else smooth random images (closer to photos than white noise)."""
    from flowerx.data import list_images, prepare_image

    if image_dir:
        found = list_images(Path(image_dir))
        paths = found[:: max(1, len(found) // n)][:n]
        if paths:
            return np.stack([prepare_image(p, size) for p in paths])
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BILINEAR)) for s in small])


def prepare(args: argparse.Namespace) -> None:
    """Write model.onnx (unless --graph), savedmodel/, model.tflite, model.int8.tflite and info.json into --out."""
    from flowerx.architectures import get_architecture
    from flowerx.backbone import build_base, build_classifier, build_feature_model, calibrate_batchnorm, count_macs, tf
    from flowerx.fileio import atomic_write

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = get_architecture(args.arch)
    weights_file = Path(args.model_dir).expanduser() / arch.weights_file if args.model_dir else None
    real = weights_file is not None and weights_file.is_file()
    features = build_feature_model(arch, build_base(arch, weights_file if real else None))
    images = _calibration_images(arch.input_size, args.image_dir)
    if not real:
        calibrate_batchnorm(features, images)
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 0.05, (arch.feature_dim, args.classes)).astype(np.float32)
    model = build_classifier(features, kernel, np.zeros(args.classes, np.float32))

    labels = [f"class_{i}" for i in range(args.classes)]
    if not args.graph:
        from exporters.onnx_export import export
        from flowerx import __version__
        from flowerx.contract import Contract

        contract = Contract(
            labels,
            arch.input_size,
            arch.name,
            input_mean=arch.mean,
            input_std=arch.std,
            flowerx_version=__version__,
            extra={"weights": "imagenet" if real else "random"},
        )
        data, _ = export(model, arch.input_size, contract.description(__version__), images[:4])
        atomic_write(out / "model.onnx", data)

    model.export(str(out / "savedmodel"), format="tf_saved_model", verbose=False)  # endpoint `serve`
    atomic_write(out / "model.tflite", tf.lite.TFLiteConverter.from_saved_model(str(out / "savedmodel")).convert())
    int8_error = None
    try:
        atomic_write(out / "model.int8.tflite", _int8_tflite(tf, out / "savedmodel", images))
    except Exception as e:  # the converter's own errors; the other runtimes' rows stand
        int8_error = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__

    info = {
        "architecture": arch.name,
        "input_size": arch.input_size,
        "weights": "imagenet" if real else "random",
        "params": int(model.count_params()),
        "macs": count_macs(model),
        "labels": labels,
        "int8_tflite": int8_error or "ok",
    }
    atomic_write(out / "info.json", json.dumps(info).encode())


def _int8_tflite(tf, savedmodel: Path, images: np.ndarray) -> bytes:
    """LiteRT's own int8: the network fully integer-quantized (int8 ops only, uint8 in and out), calibrated
    on the same images as the rest of the preparation: LiteRT's fair counterpart to flowerx's int8 model."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(savedmodel))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([images[i : i + 1]] for i in range(len(images)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.uint8
    return converter.convert()


def _load(runtime: str, path: Path, threads: int, size: int):
    """(predict(batch) -> probs, file size in bytes) for one runtime."""
    if runtime in PREDICTOR_RUNTIMES:
        from flowerx.predictor import Predictor

        predictor = Predictor(path, providers="cpu" if runtime == "onnxruntime" else runtime, threads=threads)
        return predictor.probabilities, path.stat().st_size
    if runtime == "tensorflow":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from flowerx.backbone import tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        loaded = tf.saved_model.load(str(path))  # the closure keeps it (and its variables) alive
        size_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return (lambda batch: loaded.serve(tf.constant(batch)).numpy()), size_bytes
    if runtime in ("litert", "litert-int8"):  # uint8 in either way; the int8 model's output is uint8 too
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path), num_threads=threads)  # XNNPACK is on by default
        index = interpreter.get_input_details()[0]["index"]
        output = interpreter.get_output_details()[0]["index"]
        shape = [None]

        def predict(batch: np.ndarray) -> np.ndarray:
            if shape[0] != batch.shape:
                interpreter.resize_tensor_input(index, batch.shape)
                interpreter.allocate_tensors()
                shape[0] = batch.shape
            interpreter.set_tensor(index, batch)
            interpreter.invoke()
            return interpreter.get_tensor(output)

        return predict, path.stat().st_size
    raise SystemExit(f"unknown runtime {runtime}")


def measure(args: argparse.Namespace) -> None:
    """Print one JSON line: load time, batch-1 latency percentiles, throughput at --batch, peak memory."""
    path, size = Path(args.model), args.size
    start = time.perf_counter()
    predict, file_bytes = _load(args.runtime, path, args.threads, size)
    rng = np.random.default_rng(0)
    one = rng.integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    predict(one)  # first call allocates: part of loading, as a user sees it
    load_s = time.perf_counter() - start

    for _ in range(args.warmup):
        predict(one)
    times, deadline = [], time.perf_counter() + args.seconds
    while len(times) < args.runs and (time.perf_counter() < deadline or len(times) < 5):
        t = time.perf_counter()
        predict(one)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000

    batch = rng.integers(0, 255, (args.batch, size, size, 3), dtype=np.uint8)
    predict(batch)
    count, t0 = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - t0 < args.seconds / 2:
        predict(batch)
        count += 1
    throughput = count * args.batch / (time.perf_counter() - t0)

    print(
        json.dumps(
            {
                "median_ms": float(np.median(ms)),
                "p90_ms": float(np.percentile(ms, 90)),
                "p99_ms": float(np.percentile(ms, 99)),
                "runs": len(times),
                "throughput_ips": throughput,
                "batch": args.batch,
                "file_mb": file_bytes / 1e6,
                "load_s": load_s,
                "peak_mb": _peak_mb(),
            }
        )
    )


def tf_classify(args: argparse.Namespace) -> None:
    """What `flowerx classify IMG` does, done in TensorFlow: import, load, decode, predict, print."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from flowerx.data import prepare_image

    info = json.loads((Path(args.model).parent / "info.json").read_text())
    loaded = tf.saved_model.load(args.model)  # keep a reference: its variables die with it
    probs = loaded.serve(tf.constant(prepare_image(args.image, info["input_size"])[None])).numpy()[0]
    for i in np.argsort(-probs)[:5]:
        print(f"{info['labels'][i]} {probs[i]:.5f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flowerx.bench_workers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--arch", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model-dir")
    p.add_argument("--image-dir")
    p.add_argument("--graph")
    p.add_argument("--classes", type=int, default=5)
    m = sub.add_parser("measure")
    m.add_argument("--runtime", required=True, choices=RUNTIMES)
    m.add_argument("--model", required=True)
    m.add_argument("--size", type=int, required=True)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--runs", type=int, default=100)
    m.add_argument("--seconds", type=float, default=3.0)
    m.add_argument("--warmup", type=int, default=10)
    m.add_argument("--batch", type=int, default=32)
    c = sub.add_parser("tf-classify")
    c.add_argument("--model", required=True)
    c.add_argument("image")
    args = parser.parse_args(argv)
    commands = {"prepare": prepare, "measure": measure, "tf-classify": tf_classify}
    commands[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
