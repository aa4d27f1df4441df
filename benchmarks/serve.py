"""flowerx serve against the in-process Predictor (issue 13's targets), on loopback, bounded request counts.

    python -m benchmarks.serve --graph runs/mobilenet_1.0_224/model.onnx --image-dir ../shared/flower_photos \
        [--soak-graph runs/mobilenet_0.25_224/model.onnx] [--json benchmarks/results/serve.json]

- Throughput at 32 concurrent clients: the server (batching on, and --max-batch 1) against
  `Predictor.predict_batch` on the same pre-encoded JPEGs, decode included on both sides. Targets: >= 80% of
  in-process, >= 3x batching off.
- p50 / p99 latency at 1, 8 and 32 concurrent clients, beside the in-process Predictor called from as many
  threads.
- Soak: 20,000 requests (by default on --soak-graph, else --graph) at 16 clients; the server's resident memory
  sampled every 1,000; target: under 5% growth over the last quarter, zero 5xx.
The in-process figures come from a process of their own, and each server is its own process; the clients
(httpx, asyncio) share the machine's cores with the server, as clients on one host do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CONCURRENCY = (1, 8, 32)
TARGET_VS_IN_PROCESS, TARGET_VS_UNBATCHED, TARGET_SOAK_GROWTH = 0.8, 3.0, 0.05


def photos(image_dir: Path, count: int = 128) -> list[bytes]:
    """count JPEGs spread over the folder, as their bytes."""
    paths = sorted(Path(image_dir).rglob("*.jpg"))
    return [p.read_bytes() for p in paths[:: max(1, len(paths) // count)][:count]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A `flowerx serve` process for one model; ready when /readyz answers 200."""

    def __init__(self, graph: Path, *args: str):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "flowerx", "-q", "serve", "--graph", f"m={graph}", "--port", str(self.port)]
        self.process = subprocess.Popen([*command, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise SystemExit("the server never became ready")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


async def _load(url: str, images: list[bytes], concurrency: int, requests: int, on_done=None) -> dict:
    """requests POSTs of the photos from `concurrency` clients; latencies, throughput, status counts."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def worker() -> None:
            for i in counter:
                start = time.perf_counter()
                response = await client.post(
                    url + "/classify", content=images[i % len(images)], headers={"Content-Type": "image/jpeg"}
                )
                latencies.append(time.perf_counter() - start)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if on_done:
                    on_done(i)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return _summary(latencies, requests / wall, statuses)


def _summary(latencies: list[float], throughput: float, statuses: dict | None = None) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "images_per_s": throughput,
        **({"statuses": {str(k): v for k, v in statuses.items()}} if statuses is not None else {}),
    }


def in_process(graph: Path, images: list[bytes], requests: int) -> dict:
    """The Predictor in this process: predict_batch throughput, and predict() latency from 1, 8, 32 threads."""
    from flowerx.predictor import Predictor

    predictor = Predictor(graph, providers="cpu")
    predictor.predict_batch(images[:32])  # warm
    start = time.perf_counter()
    rounds = max(1, requests // len(images))
    for _ in range(rounds):
        predictor.predict_batch(images, top_k=5, batch_size=32)
    result = {"predict_batch_images_per_s": rounds * len(images) / (time.perf_counter() - start)}
    for concurrency in CONCURRENCY:
        result[f"threads_{concurrency}"] = _threaded(predictor, images, concurrency, min(requests, 60 * concurrency))
    return result


def _threaded(predictor, images: list[bytes], concurrency: int, count: int) -> dict:
    """predict() on count photos from `concurrency` threads at once: latencies and throughput."""
    latencies, counter, lock = [], iter(range(count)), threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            predictor.predict(images[i % len(images)], top_k=5)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(work)
    return _summary(latencies, len(latencies) / (time.perf_counter() - start))


def soak(graph: Path, images: list[bytes], requests: int = 20_000, concurrency: int = 16) -> dict:
    served = Served(graph)
    samples: list[tuple[int, float]] = []

    def sample(i: int) -> None:
        if i % 1000 == 999:
            samples.append((i + 1, served.rss_mb()))

    try:
        result = asyncio.run(_load(served.url, images, concurrency, requests, sample))
    finally:
        exit_code = served.stop()
    rss = [mb for _, mb in samples]
    quarter = rss[len(rss) * 3 // 4 - 1] if len(rss) >= 4 else float("nan")
    growth = (rss[-1] - quarter) / quarter if rss else float("nan")
    server_errors = sum(v for k, v in result["statuses"].items() if k.startswith("5"))
    return {**result, "requests": requests, "rss_mb": samples, "last_quarter_growth": growth,
            "server_errors": server_errors, "exit_code": exit_code}  # fmt: skip


def run(graph: Path, image_dir: Path, soak_graph: Path | None, requests: int = 640) -> dict:
    images = photos(image_dir)
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve", "--in-process", "--graph", str(graph), "--image-dir",
         str(image_dir), "--requests", str(requests)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = {
        "graph": str(graph),
        "photos": len(images),
        "cores": os.cpu_count(),
        "in_process": json.loads(child.stdout),
    }
    for name, args in (("batched", ()), ("unbatched", ("--max-batch", "1"))):
        served = Served(graph, *args)
        try:
            asyncio.run(_load(served.url, images, 8, 64))  # warm
            levels = CONCURRENCY if name == "batched" else (32,)
            report[name] = {f"clients_{c}": asyncio.run(_load(served.url, images, c, requests)) for c in levels}
        finally:
            served.stop()
    batched = report["batched"]["clients_32"]["images_per_s"]
    report["ratios"] = {
        "vs_in_process": batched / report["in_process"]["predict_batch_images_per_s"],
        "vs_unbatched": batched / report["unbatched"]["clients_32"]["images_per_s"],
    }
    report["soak"] = soak(soak_graph or graph, images)
    return report


def print_table(report: dict) -> None:
    ip, ratios, s = report["in_process"], report["ratios"], report["soak"]
    print(f"flowerx serve, {Path(report['graph']).name}, {report['photos']} JPEGs, {report['cores']} cores, loopback")
    print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8} {'img/s':>8}")

    def row(name: str, r: dict) -> None:
        p50, p99 = r.get("p50_ms", float("nan")), r.get("p99_ms", float("nan"))
        print(f"{name:28} {p50:8.1f} {p99:8.1f} {r['images_per_s']:8.1f}")

    for c in CONCURRENCY:
        row(f"server, {c} clients", report["batched"][f"clients_{c}"])
        row(f"in-process, {c} threads", ip[f"threads_{c}"])
    row("server, batching off, 32", report["unbatched"]["clients_32"])
    row("in-process predict_batch", {"images_per_s": ip["predict_batch_images_per_s"]})
    print(
        f"throughput at 32 clients: {ratios['vs_in_process']:.2f}x in-process predict_batch (target >= "
        f"{TARGET_VS_IN_PROCESS}), {ratios['vs_unbatched']:.2f}x batching off (target >= {TARGET_VS_UNBATCHED})"
    )
    first, last = s["rss_mb"][0][1], s["rss_mb"][-1][1]
    print(
        f"soak: {s['requests']} requests, {s['images_per_s']:.0f} img/s, statuses {s['statuses']}, memory "
        f"{first:.0f} -> {last:.0f} MB, last quarter {s['last_quarter_growth'] * 100:+.1f}% "
        f"(target < {TARGET_SOAK_GROWTH * 100:.0f}%), exit code {s['exit_code']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graph", required=True, type=Path)
    parser.add_argument("--image-dir", required=True, type=Path)
    parser.add_argument("--soak-graph", type=Path)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(in_process(args.graph, photos(args.image_dir), args.requests)))
        return
    report = run(args.graph, args.image_dir, args.soak_graph, args.requests)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
