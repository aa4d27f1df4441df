"""Scale: the bottleneck pass and batch classification on Ray against the same work without it.

    python -m benchmarks.scale --shared ../shared --json benchmarks/results/scale.json   (make scale-bench)

Each run is a real process of its own (TensorFlow and Ray never load in this one):
  1. `flowerx train` on the 3136 flower photos (mobilenet_1.0_224, fresh bottleneck folders): locally, with
     `--ray` (a local Ray instance: its start is part of the time) and with `--ray --cache-format shards`;
     the bottleneck pass's images/s, the features compared entry by entry, the models' probabilities compared.
  2. `classify --output` of 2,000 and 20,000 images (the photos listed again and again), locally and with
     `--ray`: images/s, the driver's peak memory (flat: rows stream to the file), identical outputs.
  3. Ray's two-node test cluster (two raylets of one CPU each on this machine): the pass over the photos into
     a sharded cache with the second node killed halfway; what each node did, and the entries compared.
  4. The projection to 10 and 100 nodes, from the per-core rates measured here (printed, in the JSON).
The feature network's one-time export to ONNX is made before the timed runs (the same for all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.train_speed import flowers_args, run_flowerx_train
from flowerx.bench import machine_info

ARCH = "mobilenet_1.0_224"

CLASSIFY = """
import json, sys, time
from flowerx.batch import classify_to_file
graph, listing, output, ray = sys.argv[1:5]
paths = open(listing).read().split()
t = time.perf_counter()
result = classify_to_file(graph, paths, output, ray=ray == "ray")
status = open("/proc/self/status").read()  # VmHWM: this process's peak (ru_maxrss would include its parent's)
peak_kb = int(status.split("VmHWM:")[1].split()[0])
print(json.dumps({"images": result.images, "failed": result.failed, "seconds": time.perf_counter() - t,
                  "peak_mb": peak_kb / 1024}))
"""

TWO_NODES = """
import json, sys, threading, time
from pathlib import Path
from ray.cluster_utils import Cluster
from flowerx.architectures import get_architecture
from flowerx.bottlenecks import ShardedCache
from flowerx.data import discover
from flowerx.onray import fill_cache
images, cache_root, features, weights_id = sys.argv[1:5]
items = discover(Path(images)).items
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
worker = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
cache = ShardedCache(Path(cache_root), get_architecture(sys.argv[5]), weights_id)
written = {}
def kill_halfway():
    while sum(1 for _ in cache.dir.glob("shard-*.npz")) < 6:  # 6 of 13 blocks of 256 written
        time.sleep(0.05)
    written.update({p.name: p.stat().st_ino for p in cache.dir.glob("shard-*.npz")})
    written["at_s"] = time.perf_counter() - t
    cluster.remove_node(worker, allow_graceful=False)
t = time.perf_counter()
threading.Thread(target=kill_halfway, daemon=True).start()
done = fill_cache(items, cache, Path(features), address=cluster.address, block=256)
seconds = time.perf_counter() - t
at = written.pop("at_s", None)
redone = sum((cache.dir / n).stat().st_ino != ino for n, ino in written.items())
cluster.shutdown()
print(json.dumps({"seconds": seconds, "killed_at_s": at, "shards_before_kill": len(written), "rewritten": redone,
                  "blocks": -(-len(items) // 256),
                  "nodes": sorted(done.nodes.values(), reverse=True), "statuses": dict(done.statuses)}))
"""


def _python(code: str, *args: str, timeout: float = 1800) -> dict:
    """Run code in a fresh interpreter; its last stdout line is JSON."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _entries(bottleneck_dir: Path) -> dict[str, np.ndarray]:
    """Every cache entry under a bottleneck folder, by key, whichever form holds it."""
    entries = {p.stem: np.load(p) for p in bottleneck_dir.rglob("*.npy")}
    for shard in bottleneck_dir.rglob("shard-*.npz"):
        with np.load(shard) as rows:
            entries.update((k.tobytes().hex(), v) for k, v in zip(rows["keys"], rows["features"]))
    return entries


def _max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise SystemExit(f"the caches hold different entries ({len(a)} vs {len(b)})")
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def train_runs(shared: Path, work: Path) -> dict:
    """flowerx train locally, on Ray, on Ray into shards: the pass's rate, features and models compared."""
    from flowerx.predictor import Predictor

    photos = shared / "flower_photos"
    modes = {"local": [], "ray": ["--ray"], "ray_shards": ["--ray", "--cache-format", "shards"]}
    runs = {}
    for mode, extra in modes.items():
        folder = work / f"train-{mode}"
        args = flowers_args(ARCH, shared, folder / "bn", folder / "model.onnx") + extra
        wall, peak_mb, result = run_flowerx_train(args, folder / "result.json")
        images, timings = result["image_count"], result["timings"]
        runs[mode] = {
            "wall_s": wall,
            "peak_mb": peak_mb,
            "bottlenecks_s": timings["bottlenecks_s"],
            "ray_fixed_s": timings.get("ray_fixed_s", 0.0),  # starting and stopping Ray
            "images_per_s": images / timings["bottlenecks_s"],
            "images_per_s_on_ray": images / (timings["bottlenecks_s"] - timings.get("ray_fixed_s", 0.0)),
            "head_s": result["timings"]["head_s"],
            "test_accuracy": result["test_accuracy"] * 100,
        }
    local = _entries(work / "train-local" / "bn")
    sample = sorted(photos.rglob("*.jpg"))[::31]
    reference = Predictor(work / "train-local" / "model.onnx").probabilities(sample)
    for mode in ("ray", "ray_shards"):
        runs[mode]["features_max_diff"] = _max_diff(local, _entries(work / f"train-{mode}" / "bn"))
        probs = Predictor(work / f"train-{mode}" / "model.onnx").probabilities(sample)
        runs[mode]["probs_max_diff"] = float(np.abs(probs - reference).max())
        runs[mode]["vs_local"] = runs[mode]["images_per_s"] / runs["local"]["images_per_s"]
        runs[mode]["vs_local_on_ray"] = runs[mode]["images_per_s_on_ray"] / runs["local"]["images_per_s"]
    runs["entries"] = len(local)
    runs["mean_photo_bytes"] = float(np.mean([p.stat().st_size for p in photos.rglob("*.jpg")]))
    return runs


def ray_start_seconds() -> float:
    """A local Ray instance's start and stop alone, with Ray's import (part of every --ray run on one machine)."""
    code = "import json, time; t = time.perf_counter(); import ray; ray.init(logging_level='ERROR', "
    code += "include_dashboard=False); ray.shutdown(); print(json.dumps(time.perf_counter() - t))"
    return float(_python(code))


def classify_runs(shared: Path, graph: Path, work: Path, counts: tuple[int, ...]) -> dict:
    photos = [str(p) for p in sorted((shared / "flower_photos").rglob("*.jpg"))]
    runs: dict = {}
    for count in counts:
        listing = work / f"list-{count}.txt"
        listing.write_text("\n".join((photos * (count // len(photos) + 1))[:count]) + "\n")
        for mode in ("local", "ray"):
            output = work / f"rows-{mode}-{count}.jsonl"
            result = _python(CLASSIFY, str(graph), str(listing), str(output), mode)
            result["images_per_s"] = result["images"] / result["seconds"]
            runs[f"{mode}_{count}"] = result
        same = (work / f"rows-local-{count}.jsonl").read_bytes() == (work / f"rows-ray-{count}.jsonl").read_bytes()
        runs[f"identical_{count}"] = same
    return runs


def two_nodes(shared: Path, work: Path) -> dict:
    from flowerx.architectures import feature_export_path, get_architecture, resolve_weights, weights_fingerprint

    arch = get_architecture(ARCH)
    weights_id = weights_fingerprint(resolve_weights(arch, shared / "models"))
    features = feature_export_path(arch, weights_id)
    root = work / "two-nodes"
    result = _python(TWO_NODES, str(shared / "flower_photos"), str(root), str(features), weights_id, ARCH)
    result["features_max_diff"] = _max_diff(_entries(work / "train-local" / "bn"), _entries(root))
    return result


def projection(report: dict, cores_per_node: int = 16) -> dict:
    """Expected images/s on N nodes of `cores_per_node` cores, from this run's per-core rates."""
    train, cores = report["train"], report["machine"]["cores"]
    per_core = train["local"]["images_per_s"] / cores * min(1.0, train["ray"]["vs_local_on_ray"])
    rows = {}
    for nodes in (10, 100):
        rate = per_core * cores_per_node * nodes
        rows[str(nodes)] = {
            "images_per_s": rate,
            "storage_mb_per_s": rate * train["mean_photo_bytes"] / 1e6,  # each image read once
            "hours_per_million": 1e6 / rate / 3600,
        }
    return {"cores_per_node": cores_per_node, "per_core_images_per_s": per_core, "nodes": rows}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    train, classify, two = report["train"], report["classify"], report["two_nodes"]
    table = Table(title=f"Bottleneck pass, {ARCH}, {train['entries']} photos")
    for column in ("run", "pass s", "Ray start+stop s", "images/s", "x local", "x local on Ray", "features diff",
                   "probs diff"):  # fmt: skip
        table.add_column(column, justify="left" if column == "run" else "right")
    for mode, row in ((m, train[m]) for m in ("local", "ray", "ray_shards")):
        table.add_row(
            mode,
            f"{row['bottlenecks_s']:.1f}",
            f"{row['ray_fixed_s']:.1f}",
            f"{row['images_per_s']:.0f}",
            f"{row.get('vs_local', 1):.2f}",
            f"{row.get('vs_local_on_ray', 1):.2f}",
            f"{row.get('features_max_diff', 0):.1e}",
            f"{row.get('probs_max_diff', 0):.1e}",
        )
    Console(width=120).print(table)
    print(f"Ray start and stop alone: {report['ray_start_s']:.1f} s")
    for key, row in classify.items():
        if isinstance(row, dict):
            print(f"classify {key}: {row['images_per_s']:.0f} images/s, driver peak {row['peak_mb']:.0f} MB")
    print(f"two nodes: {two}")
    print(f"projection: {report['projection']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared", help="folder with flower_photos/ and models/")
    parser.add_argument("--classify-graph", default="runs/mobilenet_0.25_224/model.onnx")
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000], help="images classified per run")
    parser.add_argument("--json", default="benchmarks/results/scale.json")
    args = parser.parse_args(argv)
    shared = Path(args.shared).resolve()
    report: dict = {"machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="flowerx-scale-") as tmp:
        work = Path(tmp)
        os.environ["FLOWERX_CACHE_DIR"] = str(work / "user-cache")
        warm = work / "warm"  # the one-time export, outside the timed runs
        subset = warm / "photos"
        for folder in sorted(p for p in (shared / "flower_photos").iterdir() if p.is_dir())[:2]:
            (subset / folder.name).mkdir(parents=True)
            for photo in sorted(folder.glob("*.jpg"))[:6]:
                shutil.copy(photo, subset / folder.name / photo.name)
        run_flowerx_train(
            flowers_args(ARCH, shared, warm / "bn", warm / "model.onnx")[2:] + ["--image-dir", str(subset)],
            warm / "result.json",
        )
        start = time.perf_counter()
        report["train"] = train_runs(shared, work)
        report["ray_start_s"] = ray_start_seconds()
        report["classify"] = classify_runs(shared, Path(args.classify_graph).resolve(), work, tuple(args.counts))
        report["classify"]["graph"] = args.classify_graph
        report["two_nodes"] = two_nodes(shared, work)
        report["seconds"] = time.perf_counter() - start
    report["projection"] = projection(report)
    print_report(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
