"""Training speed on the flower photos: how close the bottleneck pass gets to this machine's limit.

    python -m benchmarks.train_speed --shared ../shared --json benchmarks/results/train_speed.json

For each architecture, in this order (TensorFlow never runs in this process, so it slows nothing here):
  1. `flowerx train` cold (empty bottleneck cache, fresh user cache), warm (all cached) and in a new
     bottleneck folder (the network's export cached on the machine), wall time and peak memory;
  2. the decode floor: decode + resize alone, on all cores, and its cost in core-seconds per image;
  3. the network alone on pre-decoded batches (onnxruntime, the engine flowerx uses): core-seconds per image;
  4. the hardware limit, cores / (decode + network core-seconds per image), and flowerx's cold bottleneck
     pass (a fresh cache) against it;
  5. the baseline: retrain.py's loop (per image: read, decode, one TensorFlow model call), in its own process;
  6. how the cold pass grows with the image count (a quarter, half and all of the photos).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flowerx.architectures import feature_export_path, get_architecture, weights_fingerprint
from flowerx.bench import machine_info
from flowerx.bottlenecks import BottleneckCache, get_bottlenecks, stream_session
from flowerx.data import discover, prepare_image

ARCHITECTURES = ("mobilenet_0.25_224", "mobilenet_1.0_224")
PEAK_RSS = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def run_flowerx_train(args: list[str], result_json: Path) -> tuple[float, float, dict]:
    """`flowerx train ARGS --json RESULT_JSON` in a real process: (wall seconds, peak RSS in MB, the run's
    result as flowerx wrote it); exits on failure."""
    cmd = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "flowerx", "train", *args, "--json", str(result_json)]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"))
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"flowerx train {' '.join(args)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    peak_mb = int(re.search(r"PEAK_KB (\d+)", result.stdout).group(1)) / 1024  # our own wrapper's line
    return wall, peak_mb, json.loads(result_json.read_text())


def flowers_args(
    arch: str, shared: Path, bottlenecks: Path, graph: Path, summaries: str = "", head_only: bool = True
) -> list[str]:
    """`flowerx train` flags for all the flower photos with the real weights (the head alone unless told:
    these benchmarks time the bottleneck pass and the head, retrain.py's job)."""
    return [
        "--image-dir", str(shared / "flower_photos"), "--architecture", arch, "--model-dir", str(shared / "models"),
        "--bottleneck-dir", str(bottlenecks), "--summaries-dir", summaries, "--output-graph", str(graph),
        *(["--head-only"] if head_only else []),
    ]  # fmt: skip


def flowerx_train(arch: str, shared: Path, work: Path) -> dict:
    """One `flowerx train` run: wall time, peak RSS, and its phase times."""
    args = flowers_args(arch, shared, work / "bottlenecks", work / "model.onnx", str(work / "summaries"))
    wall, peak_mb, result = run_flowerx_train(args, work / "result.json")
    timings = result["timings"]
    return {
        "wall_s": wall,
        "peak_mb": peak_mb,
        "bottlenecks_s": timings["bottlenecks_s"],
        "head_s": timings["head_s"],
        "export_s": timings["export_s"],
        "test_accuracy": result["test_accuracy"] * 100,
    }


def decode_rates(paths: list[Path], size: int, cores: int) -> tuple[float, float]:
    """(core-seconds per image on one thread, images/s on all cores) of decode + resize."""
    sample = paths[:: max(1, len(paths) // 400)]
    start = time.perf_counter()
    for path in sample:
        prepare_image(path, size)
    per_image = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(lambda p: prepare_image(p, size), paths))
    return per_image, len(paths) / (time.perf_counter() - start)


def network_rates(features_onnx: Path, size: int, cores: int, batch: int = 32) -> tuple[float, float]:
    """(core-seconds per image on one thread, images/s with one single-threaded stream per core)."""
    network = stream_session(features_onnx)  # the session flowerx's own pass uses
    images = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    network(images)

    def stream(rounds: int) -> None:
        for _ in range(rounds):
            network(images)

    start = time.perf_counter()
    stream(4)
    per_image = (time.perf_counter() - start) / (4 * batch)
    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(stream, [4] * cores))
    return per_image, 4 * batch * cores / (time.perf_counter() - start)


def cold_pass(items, arch, weights: Path, features_onnx: Path, root: Path) -> float:
    """Seconds of flowerx's bottleneck pass into an empty cache (the network already converted)."""
    shutil.rmtree(root, ignore_errors=True)
    cache = BottleneckCache(root, arch, weights_fingerprint(weights))
    cache.dir.mkdir(parents=True)
    shutil.copy(features_onnx, cache.dir / "features.onnx")
    start = time.perf_counter()
    get_bottlenecks(items, cache, lambda: stream_session(cache.dir / "features.onnx"))  # what training runs
    return time.perf_counter() - start


def per_image_baseline(arch: str, shared: Path, count: int) -> float:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.per_image_loop",
            "--arch",
            arch,
            "--model-dir",
            str(shared / "models"),
            "--image-dir",
            str(shared / "flower_photos"),
            "--count",
            str(count),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    if result.returncode != 0:
        raise SystemExit(f"baseline failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["images_per_s"]


def bench_architecture(name: str, shared: Path, work: Path, baseline_count: int) -> dict:
    arch = get_architecture(name)
    cores = os.cpu_count() or 1
    print(f"== {name}", flush=True)
    cold = flowerx_train(name, shared, work / name)  # a fresh machine: the network's export is made
    warm = flowerx_train(name, shared, work / name)
    new_dir = flowerx_train(name, shared, work / name / "new-dir")  # a new --bottleneck-dir, export cached
    dataset = discover(shared / "flower_photos")
    paths = [item.path for item in dataset.items]
    weights = shared / "models" / arch.weights_file
    features_onnx = feature_export_path(arch, weights_fingerprint(weights))  # the one flowerx train exported
    decode_core_s, decode_ips = decode_rates(paths, arch.input_size, cores)
    network_core_s, network_ips = network_rates(features_onnx, arch.input_size, cores)
    limit_ips = cores / (decode_core_s + network_core_s)
    pass_s = cold_pass(dataset.items, arch, weights, features_onnx, work / name / "pass")
    pass_ips = len(paths) / pass_s
    scaling = []
    for fraction in (0.25, 0.5):
        subset = dataset.items[:: int(1 / fraction)]
        seconds = cold_pass(subset, arch, weights, features_onnx, work / name / "pass")
        scaling.append({"images": len(subset), "seconds": seconds, "images_per_s": len(subset) / seconds})
    scaling.append({"images": len(paths), "seconds": pass_s, "images_per_s": pass_ips})
    baseline_ips = per_image_baseline(name, shared, baseline_count)
    return {
        "architecture": name,
        "images": len(paths),
        "cores": cores,
        "decode_core_ms_per_image": decode_core_s * 1000,
        "decode_only_images_per_s": decode_ips,
        "network_core_ms_per_image": network_core_s * 1000,
        "network_only_images_per_s": network_ips,
        "hardware_limit_images_per_s": limit_ips,
        "cold_pass_images_per_s": pass_ips,
        "cold_pass_fraction_of_limit": pass_ips / limit_ips,
        "per_image_loop_images_per_s": baseline_ips,
        "cold_pass_speedup_vs_per_image_loop": pass_ips / baseline_ips,
        "head_training_s": warm["head_s"],
        # what a first run pays over a warm one, as images/s: a new --bottleneck-dir / a fresh machine
        "new_dir_minus_warm_images_per_s": len(paths) / (new_dir["wall_s"] - warm["wall_s"]),
        "cold_minus_warm_images_per_s": len(paths) / (cold["wall_s"] - warm["wall_s"]),
        "new_dir_minus_warm_vs_per_image_loop": len(paths) / (new_dir["wall_s"] - warm["wall_s"]) / baseline_ips,
        "train_new_dir": new_dir,
        "train_cold": cold,
        "train_warm": warm,
        "scaling": scaling,
    }


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="flowerx train speed on the flower photos (images/s unless marked)")
    rows = [
        ("decode + resize only (all cores)", "decode_only_images_per_s", ".0f"),
        ("network only (all cores)", "network_only_images_per_s", ".0f"),
        ("hardware limit: cores / (decode + network core-s)", "hardware_limit_images_per_s", ".0f"),
        ("flowerx cold bottleneck pass", "cold_pass_images_per_s", ".0f"),
        ("  fraction of the limit", "cold_pass_fraction_of_limit", ".0%"),
        ("retrain.py-style per-image loop (TF)", "per_image_loop_images_per_s", ".0f"),
        ("  flowerx speedup over it", "cold_pass_speedup_vs_per_image_loop", ".1f"),
        ("head training, 4000 steps (s)", "head_training_s", ".1f"),
    ]
    table.add_column("")
    for r in results:
        table.add_column(r["architecture"], justify="right")
    for label, key, fmt in rows:
        table.add_row(label, *[format(r[key], fmt) for r in results])
    for label, key in (("flowerx train, cold (s)", "train_cold"), ("flowerx train, warm (s)", "train_warm")):
        table.add_row(label, *[f"{r[key]['wall_s']:.1f}" for r in results])
        table.add_row("  peak memory (MB)", *[f"{r[key]['peak_mb']:.0f}" for r in results])
    for i in range(3):
        table.add_row(
            f"cold pass, {results[0]['scaling'][i]['images']} images (s)",
            *[f"{r['scaling'][i]['seconds']:.1f}" for r in results],
        )
    Console(width=120).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared", help="folder with flower_photos/ and models/")
    parser.add_argument("--json", default="benchmarks/results/train_speed.json")
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--baseline-images", type=int, default=300, help="images timed in the per-image loop")
    args = parser.parse_args(argv)
    shared = Path(args.shared).resolve()
    with tempfile.TemporaryDirectory(prefix="flowerx-train-speed-") as work:
        os.environ["FLOWERX_CACHE_DIR"] = str(Path(work) / "user-cache")  # a fresh machine: the cold run exports
        results = [bench_architecture(a, shared, Path(work), args.baseline_images) for a in args.architectures]
    print_table(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine_info(), "results": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
