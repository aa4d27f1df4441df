"""`flowerx bench`: latency, throughput, size, load time and memory per model and runtime.

Each measurement runs in its own process (flowerx/bench_workers.py): TensorFlow loaded beside onnxruntime
slows it down, and peak memory means something only per process. Results come back as data
(`BenchReport`); the CLI prints them as a table. This module itself imports neither TF nor onnxruntime.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from .architectures import ARCHITECTURES, default_model_dir, get_architecture
from .errors import FlowerxError
from .fileio import atomic_write

RUNTIMES = ("onnxruntime", "openvino", "openvino-bf16", "tensorflow", "litert", "litert-int8")
OPENVINO_RUNTIMES = ("openvino", "openvino-bf16")  # flowerx's Predictor on onnxruntime-openvino's provider
PREDICTOR_RUNTIMES = ("onnxruntime", *OPENVINO_RUNTIMES)  # the rows timed through flowerx's Predictor
RUNTIME_MODULE = {
    "onnxruntime": "onnxruntime",
    "openvino": "onnxruntime",
    "openvino-bf16": "onnxruntime",
    "tensorflow": "tensorflow",
    "litert": "ai_edge_litert",
    "litert-int8": "ai_edge_litert",
}
RUNTIME_FILE = {
    "onnxruntime": "model.onnx",
    "openvino": "model.onnx",
    "openvino-bf16": "model.onnx",
    "tensorflow": "savedmodel",
    "litert": "model.tflite",
    "litert-int8": "model.int8.tflite",  # LiteRT's own full-integer model, the fair match for flowerx's int8
}
INSTALL_HINT = {
    "openvino": "pip install onnxruntime-openvino in place of onnxruntime",
    "openvino-bf16": "pip install onnxruntime-openvino in place of onnxruntime",
    "tensorflow": "pip install 'flowerx[train]'",
    "litert": "pip install 'flowerx[bench]'",
    "litert-int8": "pip install 'flowerx[bench]'",
}
DEFAULT_ARCHITECTURES = ["mobilenet_1.0_224", "mobilenet_0.75_224", "mobilenet_0.50_224", "mobilenet_0.25_224"]
FULL_ARCHITECTURES = list(ARCHITECTURES)  # the 16 MobileNets and Inception V3


@dataclass
class BenchConfig:
    architectures: list[str] = field(default_factory=lambda: list(DEFAULT_ARCHITECTURES))
    graphs: tuple[str, ...] = ()  # trained flowerx models (float, int8) to bench as well
    image_dir: str | None = None  # labelled folder: accuracy column for the trained model
    model_dir: str = str(default_model_dir())  # real weights where present, else random (same latency)
    work_dir: str = ".flowerx/bench"  # prepared models, reused by later runs
    runtimes: tuple[str, ...] = field(default_factory=lambda: default_runtimes())
    threads: tuple[int, ...] = (1, os.cpu_count() or 1)
    runs: int = 100  # batch-1 timed runs (at most)
    seconds: float = 3.0  # time budget per batch-1 measurement
    batch: int = 32  # batch size of the throughput measurement
    end_to_end_repeats: int = 3
    # Each measurement this many times, each time in a new process, the rounds interleaved (every runtime of a
    # model, then again): on a shared host one process's thread placement can double a latency.
    rounds: int = 1

    @classmethod
    def quick(cls, **overrides) -> BenchConfig:
        """A smoke test that finishes in well under a minute."""
        base = dict(
            architectures=["mobilenet_0.25_128"], threads=(1,), runs=20, seconds=0.5, batch=4, end_to_end_repeats=1
        )
        return cls(**{**base, **overrides})


@dataclass
class Row:
    model: str
    runtime: str
    threads: int
    weights: str  # imagenet, random or trained
    status: str = "ok"  # or "skipped: why" / "failed: why"
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    throughput_ips: float | None = None
    batch: int | None = None
    file_mb: float | None = None
    params: int | None = None
    macs: int | None = None
    load_s: float | None = None
    peak_mb: float | None = None
    ratio: float | None = None  # this runtime's median latency / flowerx's (onnxruntime), same model and threads
    accuracy: float | None = None
    rounds_ms: list[float] = field(default_factory=list)  # each round's median latency, in the order measured


@dataclass
class BenchReport:
    machine: dict
    rows: list[Row]
    end_to_end: list[dict]
    config: dict

    def to_json(self) -> str:
        return json.dumps(
            {
                "machine": self.machine,
                "config": self.config,
                "rows": [asdict(r) for r in self.rows],
                "end_to_end": self.end_to_end,
            },
            indent=2,
        )

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(asdict(self.rows[0])) if self.rows else ["model"])
        writer.writeheader()
        for row in self.rows:
            writer.writerow(asdict(row))
        return buffer.getvalue()


# The instruction sets that move these figures: int8 kernels without VNNI add products in 16 bits (slower, and
# they can saturate); AMX and AVX-512 BF16 are what bf16 inference uses.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_label(machine: dict) -> str:
    """A machine_info's CPU in words: model, cores and instruction sets (older reports have none)."""
    isa = f" ({', '.join(machine['isa'])})" if machine.get("isa") else ""
    return f"{machine['cpu']}, {machine['cores']} cores{isa}"


def machine_info() -> dict:
    """The machine a benchmark ran on: CPU model, cores, its ISA_FLAGS, Python and package versions."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    versions = {}
    for package in (
        "flowerx",
        "onnxruntime",
        "onnxruntime-gpu",
        "tensorflow-cpu",
        "tensorflow",
        "ai-edge-litert",
        "tf2onnx",
        "numpy",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _worker(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "flowerx.bench_workers", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _why(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr or result.stdout).strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else f"exit code {result.returncode}"


@dataclass
class _Model:
    name: str
    arch: str
    dir: Path
    onnx: Path
    info: dict = field(default_factory=dict)
    trained: bool = False


def _openvino() -> bool:
    """Whether onnxruntime here is onnxruntime-openvino (which installs in place of onnxruntime)."""
    import onnxruntime

    return "OpenVINOExecutionProvider" in onnxruntime.get_available_providers()


def default_runtimes() -> tuple[str, ...]:
    """Every runtime, the OpenVINO rows only where its provider is installed (else they would all say so)."""
    has = importlib.util.find_spec("onnxruntime") is not None and _openvino()
    return tuple(r for r in RUNTIMES if has or r not in OPENVINO_RUNTIMES)


def _plan_models(cfg: BenchConfig) -> list[_Model]:
    work = Path(cfg.work_dir).expanduser()
    models = []
    for name in cfg.architectures:
        arch = get_architecture(name)
        weights = "imagenet" if (Path(cfg.model_dir).expanduser() / arch.weights_file).is_file() else "random"
        folder = work / f"{arch.name}-{weights}"
        models.append(_Model(arch.name, arch.name, folder, folder / "model.onnx"))
    for graph in map(Path, cfg.graphs):
        from .contract import NoMetadataError
        from .predictor import Predictor

        try:
            predictor = Predictor(graph, providers="cpu")
        except NoMetadataError:
            raise FlowerxError(
                f"{graph} has no flowerx metadata: bench --graph times models written by flowerx "
                "train (it reads their architecture); time the network by name with "
                "--architectures instead"
            ) from None
        arch = predictor.contract.architecture
        if arch not in ARCHITECTURES:
            raise FlowerxError(f"{graph} does not say which architecture it is (metadata 'architecture')")
        kind = "int8" if predictor.contract.quantization else "fp32"
        # The other runtimes run the same float network; one prepared copy serves every graph of it.
        folder = work / f"trained-{arch}-{len(predictor.labels)}"
        models.append(
            _Model(
                f"{graph.name} ({arch}, {kind})",
                arch,
                folder,
                graph,
                trained=True,
                info={"classes": len(predictor.labels)},
            )
        )
    return models


def _prepare(model: _Model, cfg: BenchConfig) -> str | None:
    """Build the model's files for every runtime once (needs TensorFlow); None on success, else why not."""
    done = model.dir / "info.json"
    if not done.is_file() or "int8_tflite" not in json.loads(done.read_text()):  # prepared before litert-int8
        if importlib.util.find_spec("tensorflow") is None:
            return f"TensorFlow not installed ({INSTALL_HINT['tensorflow']})"
        args = ["prepare", "--arch", model.arch, "--out", str(model.dir), "--model-dir", cfg.model_dir]
        if cfg.image_dir:
            args += ["--image-dir", cfg.image_dir]
        if model.trained:
            args += ["--graph", str(model.onnx), "--classes", str(model.info["classes"])]
        result = _worker(*args)
        if result.returncode != 0 or not done.is_file():
            return f"could not build the model: {_why(result)}"
    model.info.update(json.loads(done.read_text()))
    return None


def _measure(model: _Model, runtime: str, threads: int, cfg: BenchConfig) -> Row:
    # A trained model's other runtimes run the same network with stand-in weights (same latency).
    ours = runtime in PREDICTOR_RUNTIMES
    weights = "trained" if model.trained and ours else model.info.get("weights", "?")
    row = Row(model.name, runtime, threads, weights)
    if importlib.util.find_spec(RUNTIME_MODULE[runtime]) is None or (runtime in OPENVINO_RUNTIMES and not _openvino()):
        row.status = f"skipped: {RUNTIME_MODULE[runtime]} not installed ({INSTALL_HINT.get(runtime, '')})"
        return row
    if runtime == "openvino-bf16":
        from .predictor import openvino_has_bf16

        if openvino_has_bf16() is False:  # the row would time fp32 under a bf16 name
            row.status = "skipped: OpenVINO has no bf16 on this CPU: it runs fp32, the openvino row"
            return row
    path = model.onnx if ours else model.dir / RUNTIME_FILE[runtime]
    if not path.exists():
        why = model.info.get("prepare_error", "not prepared")
        if runtime == "litert-int8" and model.info.get("int8_tflite", "ok") != "ok":
            why = f"LiteRT's int8 conversion failed: {model.info['int8_tflite']}"
        row.status = f"skipped: no {RUNTIME_FILE[runtime]} ({why})"
        return row
    size = get_architecture(model.arch).input_size
    result = _worker(
        "measure",
        "--runtime",
        runtime,
        "--model",
        str(path),
        "--size",
        str(size),
        "--threads",
        str(threads),
        "--runs",
        str(cfg.runs),
        "--seconds",
        str(cfg.seconds),
        "--batch",
        str(cfg.batch),
    )
    try:
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        row.status = f"failed: {_why(result)}"
        return row
    for key, value in figures.items():
        if hasattr(row, key) and key != "runs":
            setattr(row, key, value)
    row.params, row.macs = model.info.get("params"), model.info.get("macs")
    return row


def _timed(cmd: list[str], repeats: int, env: dict | None = None) -> tuple[float | None, str]:
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, env=dict(env or os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        )
        if result.returncode != 0:
            return None, _why(result)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), "ok"


def _end_to_end(model: _Model, image: Path, cfg: BenchConfig) -> dict:
    """Wall time of classifying one image from process start, flowerx vs. the same in TensorFlow. flowerx's
    first run on a machine (an empty user cache: it keeps the optimised session) is timed on its own."""
    classify = [sys.executable, "-m", "flowerx", "classify", str(image), "--graph", str(model.onnx)]
    with tempfile.TemporaryDirectory(prefix="flowerx-bench-cache-") as cache:
        env = dict(os.environ, FLOWERX_CACHE_DIR=cache)
        first_s, status = _timed(classify, 1, env)
        flowerx_s, status = _timed(classify, cfg.end_to_end_repeats, env) if first_s else (None, status)
    entry = {
        "model": model.name,
        "image": str(image),
        "flowerx_first_s": first_s,
        "flowerx_s": flowerx_s,
        "flowerx_status": status,
    }
    savedmodel = model.dir / "savedmodel"
    if importlib.util.find_spec("tensorflow") is None or not savedmodel.exists():
        entry.update(tensorflow_s=None, tensorflow_status="skipped: TensorFlow not installed or no SavedModel")
    else:
        tf_s, tf_status = _timed(
            [sys.executable, "-m", "flowerx.bench_workers", "tf-classify", "--model", str(savedmodel), str(image)],
            cfg.end_to_end_repeats,
        )
        entry.update(tensorflow_s=tf_s, tensorflow_status=tf_status)
    if entry["flowerx_s"] and entry.get("tensorflow_s"):
        entry["speedup"] = entry["tensorflow_s"] / entry["flowerx_s"]
    return entry


def _sample_image(cfg: BenchConfig) -> Path:
    if cfg.image_dir:
        from .data import list_images

        images = list_images(Path(cfg.image_dir))
        if images:
            return images[0]
    path = Path(cfg.work_dir).expanduser() / "sample.jpg"
    if not path.is_file():
        import numpy as np
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(path)
    return path


def run(cfg: BenchConfig, on_step: Callable[[str, int, int], None] = lambda s, done, total: None) -> BenchReport:
    """Prepare every model, measure every (model, runtime, threads), then accuracy and end to end.
    The work is planned first as a list of steps, so on_step(description, steps done, total) always adds up."""
    if cfg.runs <= 0 or cfg.rounds <= 0 or cfg.batch <= 0 or any(t <= 0 for t in cfg.threads):
        raise FlowerxError("--runs, --rounds, --batch and --threads must be positive")
    if not 0 < cfg.seconds < 3600:
        raise FlowerxError("--seconds must be from 0 to 3600")
    models = _plan_models(cfg)
    rows: list[Row] = []
    end_to_end: list[dict] = []
    plan = _plan(cfg, models, rows, end_to_end)
    for done, (description, step) in enumerate(plan):
        on_step(description, done, len(plan))
        step()
    on_step("done", len(plan), len(plan))
    rows[:] = merge_rounds(rows)
    _set_ratios(rows)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    return BenchReport(machine_info(), rows, end_to_end, config)


def _plan(
    cfg: BenchConfig, models: list[_Model], rows: list[Row], end_to_end: list[dict]
) -> list[tuple[str, Callable]]:
    """Every step of a run as (description, function): its results land in rows and end_to_end."""
    plan: list[tuple[str, Callable]] = []
    for model in models:
        plan.append((f"preparing {model.name}", partial(_prepare_step, model, cfg)))
        for round_ in range(cfg.rounds):
            for runtime in cfg.runtimes:
                for threads in cfg.threads:
                    what = f"{model.name}: {runtime}, {threads} thread{'s' if threads > 1 else ''}"
                    what += f" (round {round_ + 1} of {cfg.rounds})" if cfg.rounds > 1 else ""
                    plan.append((what, partial(_measure_step, rows, model, runtime, threads, cfg)))
    for model in (m for m in models if m.trained and cfg.image_dir):
        plan.append((f"accuracy of {model.name}", partial(_set_accuracy, model, rows, cfg)))
    if cfg.end_to_end_repeats > 0 and models:
        trained = [m for m in models if m.trained]
        target = trained[0] if trained else next((m for m in models if m.arch == "mobilenet_0.50_224"), models[0])
        plan.append(
            (f"end to end: classify one image with {target.name}", partial(_end_to_end_step, end_to_end, target, cfg))
        )
    return plan


def _prepare_step(model: _Model, cfg: BenchConfig) -> None:
    problem = _prepare(model, cfg)
    if problem:
        model.info["prepare_error"] = problem


def _measure_step(rows: list[Row], model: _Model, runtime: str, threads: int, cfg: BenchConfig) -> None:
    rows.append(_measure(model, runtime, threads, cfg))  # says "skipped: ..." for what is missing


def _end_to_end_step(end_to_end: list[dict], model: _Model, cfg: BenchConfig) -> None:
    if model.onnx.exists():
        end_to_end.append(_end_to_end(model, _sample_image(cfg), cfg))


def merge_rounds(rows: list[Row]) -> list[Row]:
    """One row per (model, runtime, threads), in the order first measured: of its rounds, the process with
    the median latency (its other figures come with it), every round's median in rounds_ms. Rounds that
    failed are dropped where another ran; where none ran, the first one's status stands."""
    groups: dict[tuple[str, str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.model, row.runtime, row.threads), []).append(row)
    merged = []
    for group in groups.values():
        ran = [r for r in group if r.status == "ok" and r.median_ms is not None]
        if not ran:
            merged.append(group[0])
            continue
        pick = sorted(ran, key=lambda r: r.median_ms)[(len(ran) - 1) // 2]
        pick.rounds_ms = [r.median_ms for r in ran]
        merged.append(pick)
    return merged


def latency_ratio(ms: list[float], base_ms: list[float]) -> float:
    """Latency against a baseline's: the median of the rounds' ratios, each round paired with the baseline's
    round measured beside it (seconds apart), or the ratio of the medians where the rounds do not pair up."""
    if len(ms) == len(base_ms) > 0:
        return statistics.median(a / b for a, b in zip(ms, base_ms))
    return statistics.median(ms) / statistics.median(base_ms)


def _set_ratios(rows: list[Row]) -> None:
    """Each row's latency against flowerx's predictor on the same model and threads, in the same run (the
    rounds paired: latency_ratio)."""
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r.model == row.model and r.threads == row.threads and r.runtime == "onnxruntime" and r.median_ms
            ),
            None,
        )
        if base and row.median_ms:
            row.ratio = latency_ratio(row.rounds_ms, base.rounds_ms)  # merge_rounds filled them


def _set_accuracy(model: _Model, rows: list[Row], cfg: BenchConfig) -> None:
    """The trained model's accuracy on its test split (all images if it records none), on its own row."""
    from .evaluate import evaluate
    from .predictor import Predictor

    predictor = Predictor(model.onnx, providers="cpu")
    contract = predictor.contract
    split = "test" if contract.split_percentages(model.onnx.name) or contract.split_by_folders else "all"
    accuracy = evaluate(predictor, cfg.image_dir, split).accuracy
    for row in rows:
        if row.model == model.name and row.runtime == "onnxruntime" and row.status == "ok":
            row.accuracy = accuracy


PLOT_FORMATS = (".png", ".svg", ".pdf")


def plot(report: BenchReport, path: str | os.PathLike) -> None:
    """Latency (batch 1, all threads) vs. accuracy where measured, else vs. MACs; circle area = file size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlowerxError("--plot needs matplotlib (pip install 'flowerx[bench]')") from None
    threads = max(r.threads for r in report.rows)
    rows = [r for r in report.rows if r.status == "ok" and r.threads == threads and r.median_ms]
    use_accuracy = any(r.accuracy is not None for r in rows)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    colours = {
        "onnxruntime": "tab:blue",
        "openvino": "tab:purple",
        "openvino-bf16": "tab:pink",
        "tensorflow": "tab:orange",
        "litert": "tab:green",
        "litert-int8": "tab:olive",
    }
    for runtime in RUNTIMES:
        mine = [r for r in rows if r.runtime == runtime and (r.accuracy is not None if use_accuracy else r.macs)]
        if not mine:
            continue
        ys = [r.accuracy * 100 if use_accuracy else r.macs / 1e6 for r in mine]
        ax.scatter(
            [r.median_ms for r in mine],
            ys,
            s=[max(20, 25 * r.file_mb) for r in mine],
            alpha=0.5,
            color=colours[runtime],
            label=runtime if runtime != "onnxruntime" else "flowerx (onnxruntime)",
        )
        if runtime == "onnxruntime":
            for r, y in zip(mine, ys):
                ax.annotate(
                    r.model.replace("mobilenet_", "mn_"),
                    (r.median_ms, y),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
    ax.set_xscale("log")
    if not use_accuracy:
        ax.set_yscale("log")
    ax.set_xlabel(f"batch-1 latency, ms ({threads} threads, median; log scale)")
    ax.set_ylabel("test accuracy, %" if use_accuracy else "MACs per image, millions (log scale)")
    ax.set_title(
        f"flowerx bench on {report.machine['cpu']} ({report.machine['cores']} cores); circle area = model size"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", markerscale=0.5)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=Path(path).suffix.lower().lstrip("."), dpi=110)
    plt.close(fig)
    atomic_write(path, image.getvalue())
