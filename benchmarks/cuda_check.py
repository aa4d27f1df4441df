"""The CUDA provider on a real GPU: does `Predictor(providers="cuda"/"auto")` run there, agree with the CPU,
and how much faster is it? Needs onnxruntime-gpu and a GPU; never TensorFlow.

    python -m benchmarks.cuda_check --graph runs/mobilenet_1.0_224/model.onnx --image-dir DIR \
        --json benchmarks/results/cuda.json

Exits non-zero when CUDA does not start, when "auto" does not pick it, or when CUDA and CPU disagree: a
different top-1 label on any photo, or, for float models, probabilities further apart than 1e-2 (onnxruntime's
CUDA convolutions use TF32 by default, which rounds to 10 mantissa bits: measured 3.6e-3 on an H200). int8
models are held to top-1 agreement only: the providers' integer kernels round differently. Latencies are
medians, reported as ratios against the CPU measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from flowerx.data import list_images, prepare_image
from flowerx.predictor import Predictor

PROB_ATOL = 1e-2  # float models; see the module docstring


def median_ms(fn, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def check(graph: Path, images: np.ndarray, runs: int) -> dict:
    cpu, gpu, auto = (Predictor(graph, providers=p) for p in ("cpu", "cuda", "auto"))
    p_cpu, p_gpu = cpu.probabilities(images), gpu.probabilities(images)
    row = {
        "graph": graph.name,
        "int8": "quantization" in cpu.metadata,
        "cuda_provider": gpu.session.get_providers(),
        "auto_provider": auto.provider,
        "max_prob_diff": float(np.abs(p_cpu - p_gpu).max()),
        "top1_agree": float((p_cpu.argmax(1) == p_gpu.argmax(1)).mean()),
    }
    for batch in (1, 32):
        x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
        cpu_ms = median_ms(lambda x=x: cpu.probabilities(x), runs)
        gpu_ms = median_ms(lambda x=x: gpu.probabilities(x), runs)
        row[f"batch{batch}"] = {"cpu_ms": cpu_ms, "cuda_ms": gpu_ms, "cuda_speedup": cpu_ms / gpu_ms}
    row["ok"] = (
        gpu.provider == "CUDAExecutionProvider"
        and auto.provider == "CUDAExecutionProvider"
        and row["top1_agree"] == 1.0
        and (row["int8"] or row["max_prob_diff"] <= PROB_ATOL)
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", nargs="+", required=True, type=Path)
    parser.add_argument("--image-dir", required=True, type=Path)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, providers available: {ort.get_available_providers()}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("error: onnxruntime has no CUDA provider here (install onnxruntime-gpu on a machine with a GPU)")
        return 2
    paths = list_images(args.image_dir)[:32]
    rows = []
    for graph in args.graph:
        size = Predictor(graph, providers="cpu").input_size
        images = np.stack([prepare_image(p, size) for p in paths])
        rows.append(check(graph, images, args.runs))
        r = rows[-1]
        print(
            f"{graph.name}: CUDA {'OK' if r['ok'] else 'FAILED'} (providers {r['cuda_provider']}, auto -> "
            f"{r['auto_provider']}); max |p_cpu - p_cuda| {r['max_prob_diff']:.2e}, top-1 agree "
            f"{r['top1_agree'] * 100:.0f}% on {len(images)} photos"
        )
        for b in (1, 32):
            m = r[f"batch{b}"]
            print(
                f"  batch {b:>2}: CPU {m['cpu_ms']:7.2f} ms, CUDA {m['cuda_ms']:7.2f} ms -> "
                f"CUDA {m['cuda_speedup']:.1f}x the CPU"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": platform.node(), "onnxruntime": ort.__version__, "rows": rows}, indent=1)
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
