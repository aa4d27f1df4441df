"""`flowerx serve`: flowerx models behind HTTP (Starlette under uvicorn), micro-batched, observable, bounded.

Routes (README "flowerx serve" has curl examples):
  POST /v1/models/{name}:classify, POST /classify   an image as the body, or multipart files; ?top_k=
  GET  /v1/models                                   each model's contract
  Open Inference Protocol (KServe v2): GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{name},
       /v2/models/{name}/ready; POST /v2/models/{name}/infer (JSON or binary tensor data, `image` UINT8)
  GET  /healthz, /readyz, /metrics (Prometheus), / (a page to drop a photo on)

Models load in the background: /healthz answers at once, /readyz once every model has loaded and answered
a warm-up batch. Nothing here imports TensorFlow or onnx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from . import __version__
from .batching import Batcher, Overloaded
from .data import resize
from .errors import FlowerxError, ImageError
from .events import printable
from .predictor import Predictor

log = logging.getLogger("flowerx.serve")
RAW_TYPES = ("image/", "application/octet-stream")
MAX_FILES = 64  # images in one multipart request
V2_DATATYPES = {"UINT8": np.uint8}


@dataclass
class ServeConfig:
    """Every setting of `flowerx serve` (the CLI's flags)."""

    graphs: list[str]  # model files, each optionally NAME=PATH (default name: the file's stem)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int = 0  # onnxruntime threads per model (0: onnxruntime's default, as Predictor)
    decode_threads: int = 0  # image decoding threads (0: one per core)
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images queued per model before 503
    max_requests: int = 64  # classify/infer requests in progress (bodies held in memory) before 503
    max_body_mb: float = 20.0
    request_timeout_s: float = 30.0  # reading a request's body
    top_k: int = 5  # default ?top_k=
    watch: bool = False
    log_format: str = "text"
    log_level: str = "info"  # "warning" with -q

    def check(self) -> None:
        if not self.graphs:
            raise FlowerxError("give at least one model (--graph model.onnx)")
        counts = (
            ("--max-batch", self.max_batch),
            ("--max-queue", self.max_queue),
            ("--max-requests", self.max_requests),
        )
        for name, value in (*counts, ("--top-k", self.top_k)):
            if value < 1:
                raise FlowerxError(f"{name} must be at least 1, got {value}")
        for name, value in (("--max-wait-ms", self.max_wait_ms), ("--request-timeout", self.request_timeout_s)):
            if not 0 <= value < float("inf"):
                raise FlowerxError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 < self.max_body_mb < float("inf"):
            raise FlowerxError(f"--max-body-mb must be positive, got {self.max_body_mb}")
        if self.workers < 1 or self.threads < 0 or self.decode_threads < 0:
            raise FlowerxError("--workers must be at least 1, --threads and --decode-threads at least 0")
        if not 0 <= self.port <= 65535:
            raise FlowerxError(f"--port must be 0-65535, got {self.port}")
        if self.log_format not in ("text", "json"):
            raise FlowerxError(f"--log-format must be text or json, not {self.log_format!r}")
        self.models()

    def models(self) -> dict[str, Path]:
        """{name: path}, names checked: distinct, URL-safe."""
        named: dict[str, Path] = {}
        for spec in self.graphs:
            name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
            path = Path(path).expanduser()
            name = name or path.stem
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise FlowerxError(f"model name {name!r} must be letters, digits, '-', '_' or '.' (NAME=PATH)")
            if name in named:
                raise FlowerxError(f"two models named {name!r}: name them (--graph NAME=PATH)")
            named[name] = path
        return named


class HTTPProblem(Exception):
    """A request that gets a 4xx/5xx answer: status, a one-line reason, extra headers."""

    def __init__(self, status: int, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


def _problem(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status, headers=headers)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (importing flowerx registers nothing)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("flowerx_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram(
            "flowerx_request_seconds",
            "Request latency",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch = Histogram(
            "flowerx_batch_size", "Images per onnxruntime call", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.queue = Gauge("flowerx_queue_depth", "Images queued or running", ["model"], registry=r)
        self.images = Counter(
            "flowerx_images", "Images classified (rate() for images per second)", ["model"], registry=r
        )
        self.load = Gauge(
            "flowerx_model_load_seconds", "Time the model took to load and warm up", ["model"], registry=r
        )
        self.reloads = Counter("flowerx_model_reloads", "Model reloads", ["model", "result"], registry=r)


@dataclass
class ServedModel:
    name: str
    path: Path
    predictor: Predictor | None = None
    batcher: Batcher | None = None
    stat: tuple = ()  # (inode, size, mtime_ns) of the file loaded, to see it replaced
    load_s: float = 0.0
    error: str = ""

    def contract(self) -> dict:
        p = self.predictor
        c = p.contract
        return {
            "name": self.name,
            "labels": p.labels,
            "input": {"name": "image", "dtype": "uint8", "shape": ["N", "H", "W", 3] if p.any_size else
                      ["N", p.input_size, p.input_size, 3], "input_size": p.input_size},
            "contract": c.version,
            "architecture": c.architecture,
            "test_accuracy": c.training.get("test_accuracy"),
            "quantization": c.quantization,
            "flowerx_version": c.flowerx_version,
            "provider": p.provider,
        }  # fmt: skip


def _stat(path: Path) -> tuple:
    info = os.stat(path)
    return (info.st_ino, info.st_size, info.st_mtime_ns)


class Server:
    """The models, their batchers and the thread pools; the Starlette app's state."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.models = {name: ServedModel(name, path) for name, path in cfg.models().items()}
        cores = os.cpu_count() or 1
        self.decode_pool = ThreadPoolExecutor(cfg.decode_threads or cores, thread_name_prefix="flowerx-decode")
        self.infer_pool = ThreadPoolExecutor(max(1, len(self.models)), thread_name_prefix="flowerx-infer")
        self.load_pool = ThreadPoolExecutor(1, thread_name_prefix="flowerx-load")  # reloads never stall serving
        self.ready = False
        self.active = 0  # classify/infer requests in progress
        self._tasks: list[asyncio.Task] = []

    @contextlib.contextmanager
    def admit(self):
        """Around a classify or infer request: past --max-requests at once, 503 before its body is read."""
        if self.active >= self.cfg.max_requests:
            raise Overloaded(f"{self.active} requests in progress (the limit is {self.cfg.max_requests})")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    # -- loading, warm-up, reload --------------------------------------------------------------------------
    def _load(self, path: Path) -> tuple[Predictor, float, tuple]:
        start, stat = time.perf_counter(), _stat(path)
        predictor = Predictor(path, threads=self.cfg.threads)  # checks the contract, runs a warm-up
        return predictor, time.perf_counter() - start, stat

    async def _install(self, model: ServedModel, predictor: Predictor, load_s: float, stat: tuple) -> None:
        """Swap a loaded predictor in, after one batch through the batcher answers (the warm-up)."""
        loop = asyncio.get_running_loop()
        grey = np.full((self.cfg.max_batch, predictor.input_size, predictor.input_size, 3), 128, np.uint8)
        await loop.run_in_executor(self.load_pool, predictor.probabilities, grey)  # a full batch, once
        model.predictor, model.load_s, model.stat, model.error = predictor, load_s, stat, ""
        if model.batcher is None:
            model.batcher = Batcher(
                lambda predictor, batch: predictor.probabilities(batch),  # the one the images were decoded for
                self.infer_pool,
                self.cfg.max_batch,
                self.cfg.max_wait_ms / 1000,
                self.cfg.max_queue,
                on_batch=lambda size: self.metrics.batch.labels(model.name).observe(size),
            )
            model.batcher.start()
        self.metrics.load.labels(model.name).set(load_s)

    async def load_all(self) -> None:
        loop = asyncio.get_running_loop()
        for model in self.models.values():
            try:
                predictor, load_s, stat = await loop.run_in_executor(self.load_pool, self._load, model.path)
                await self._install(model, predictor, load_s, stat)
                log.info("loaded %s from %s in %.2f s", model.name, model.path, load_s)
            except (FlowerxError, OSError) as e:
                model.error = str(e)
                log.error("cannot load %s: %s", model.name, e)
        self.ready = all(m.predictor is not None for m in self.models.values())

    async def reload(self, model: ServedModel) -> bool:
        """Load the model's file again and swap it in if it loads and warms up; else keep serving the old."""
        loop = asyncio.get_running_loop()
        try:
            predictor, load_s, stat = await loop.run_in_executor(self.load_pool, self._load, model.path)
            await self._install(model, predictor, load_s, stat)
        except Exception as e:  # a broken or half-copied file: the old model keeps serving
            try:
                model.stat = _stat(model.path)  # do not retry until the file changes again
            except OSError:
                pass
            self.metrics.reloads.labels(model.name, "failed").inc()
            log.error("reload of %s failed, still serving the previous model: %s", model.name, str(e)[:300])
            return False
        self.metrics.reloads.labels(model.name, "ok").inc()
        log.info("reloaded %s from %s in %.2f s", model.name, model.path, load_s)
        self.ready = all(m.predictor is not None for m in self.models.values())
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for model in self.models.values():
                try:
                    changed = _stat(model.path) != model.stat
                except OSError:
                    continue  # being replaced (or gone): the old model keeps serving
                if changed:
                    await self.reload(model)

    async def startup(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self.load_all()))
        if self.cfg.watch:
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch()))
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_all)
        except (NotImplementedError, RuntimeError, AttributeError):  # not the main thread, or Windows
            pass

    def _reload_all(self) -> None:
        for model in self.models.values():
            self._tasks.append(asyncio.get_running_loop().create_task(self.reload(model)))

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for model in self.models.values():
            if model.batcher:
                await model.batcher.stop()
        for pool in (self.decode_pool, self.infer_pool, self.load_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) != 1:
                raise HTTPProblem(404, f"{len(self.models)} models are served: use /v1/models/NAME:classify")
            name = next(iter(self.models))
        model = self.models.get(name)
        if model is None:
            raise HTTPProblem(404, f"no model named {name!r} (GET /v1/models lists them)")
        if model.predictor is None:
            raise HTTPProblem(503, f"model {name!r} is not loaded" + (f": {model.error}" if model.error else ""))
        return model

    # -- classifying ---------------------------------------------------------------------------------------
    async def classify_images(
        self, model: ServedModel, images: list[bytes], names: list[str]
    ) -> tuple[Predictor, list[np.ndarray]]:
        """Decode each image on the pool and run it through the batcher: (the predictor that ran them, their
        probabilities); 4xx for a bad one (named)."""
        model.batcher.check_room(len(images))
        self.metrics.queue.labels(model.name).set(model.batcher.queued)

        predictor = model.predictor  # for this request, whatever a reload swaps in meanwhile

        async def one(data: bytes) -> np.ndarray:
            with model.batcher.decoding_one():
                loop = asyncio.get_running_loop()
                pixels = await loop.run_in_executor(self.decode_pool, predictor.preprocess, data)
            return await model.batcher.submit(predictor, pixels)

        results = await asyncio.gather(*(one(d) for d in images), return_exceptions=True)
        self.metrics.queue.labels(model.name).set(model.batcher.queued)
        for result, name in zip(results, names):
            if isinstance(result, ImageError):
                raise _image_problem(name, result)
            if isinstance(result, BaseException):  # Overloaded: 503 (build_app's handler)
                raise result
        self.metrics.images.labels(model.name).inc(len(images))
        return predictor, results


def _image_problem(name: str, e: ImageError) -> HTTPProblem:
    reason = e.reason
    if "unrecognised format" in reason:
        return HTTPProblem(415, f"{name}: unsupported image format (JPEG, PNG, GIF, BMP, WebP, TIFF)")
    return HTTPProblem(422, f"{name}: {reason}")


async def _body(request: Request, cfg: ServeConfig) -> bytes:
    """The request body, refused past the size limit (413) or when it comes too slowly (408)."""
    limit = int(cfg.max_body_mb * 2**20)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPProblem(400, "bad Content-Length")
        if int(declared) > limit:
            raise HTTPProblem(413, f"body of {int(declared)} bytes is over the limit of {limit} (--max-body-mb)")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPProblem(413, f"body over the limit of {limit} bytes (--max-body-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), cfg.request_timeout_s)
    except asyncio.TimeoutError:
        raise HTTPProblem(408, f"the body did not arrive within {cfg.request_timeout_s:g} s") from None
    except ClientDisconnect:
        raise HTTPProblem(400, "the client went away before its body arrived") from None


async def _images_of(request: Request, body: bytes) -> tuple[list[bytes], list[str]]:
    """(image bytes, names) of a request: the raw body, or each file of a multipart form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":

        async def stream():
            yield body

        try:
            parser = MultiPartParser(
                request.headers, stream(), max_files=MAX_FILES, max_fields=MAX_FILES, max_part_size=len(body) + 1
            )
            form = await parser.parse()
        except MultiPartException as e:
            raise HTTPProblem(400, f"malformed multipart body: {e.message}") from None
        files = [(key, value) for key, value in form.multi_items() if hasattr(value, "read")]
        if not files:
            raise HTTPProblem(400, "the multipart form has no files")
        images = [await value.read() for _, value in files]
        await form.close()
        return images, [value.filename or key for key, value in files]
    if not kind.startswith(RAW_TYPES):
        raise HTTPProblem(415, f"Content-Type {kind or 'none'!r}: send an image/* body or multipart/form-data")
    if not body:
        raise HTTPProblem(400, "empty body: send the image's bytes")
    return [body], ["body"]


def _top_k(request: Request, default: int) -> int:
    value = request.query_params.get("top_k", str(default))
    if not value.isdigit() or int(value) < 1:
        raise HTTPProblem(400, f"top_k must be a whole number >= 1, got {value[:20]!r}")
    return int(value)


def _ranked(labels: list[str], probs: np.ndarray, top_k: int) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:top_k]
    return [{"label": labels[i], "score": round(float(probs[i]), 6)} for i in order]


# -- routes --------------------------------------------------------------------------------------------------
async def classify(request: Request) -> Response:
    server: Server = request.app.state.server
    start = time.perf_counter()
    model = server.model(request.path_params.get("name"))  # none: /classify, for a server of one model
    top_k = _top_k(request, server.cfg.top_k)
    with server.admit():
        body = await _body(request, server.cfg)
        images, names = await _images_of(request, body)
        request.state.model, request.state.images = model.name, len(images)
        predictor, probs = await server.classify_images(model, images, names)
    labels = predictor.labels
    return JSONResponse(
        {
            "model": model.name,
            "predictions": [_ranked(labels, p, top_k) for p in probs],
            "time_ms": round((time.perf_counter() - start) * 1000, 2),
        }
    )


async def list_models(request: Request) -> Response:
    server: Server = request.app.state.server
    return JSONResponse(
        {"models": [m.contract() if m.predictor else {"name": m.name, "error": m.error or "loading"}
                    for m in server.models.values()]}
    )  # fmt: skip


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


async def readyz(request: Request) -> Response:
    server: Server = request.app.state.server
    states = {m.name: "ready" if m.predictor else (m.error or "loading") for m in server.models.values()}
    return JSONResponse({"ready": server.ready, "models": states}, 200 if server.ready else 503)


async def metrics(request: Request) -> Response:
    server: Server = request.app.state.server
    for model in server.models.values():
        if model.batcher:
            server.metrics.queue.labels(model.name).set(model.batcher.queued)
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def page(request: Request) -> Response:
    return HTMLResponse(resources.files("flowerx").joinpath("web/serve.html").read_text("utf-8"))


ASSETS = {"flowerx.css": "text/css", "page.js": "text/javascript"}  # the page's own files, shared with export web


async def asset(request: Request) -> Response:
    name = request.url.path.lstrip("/")
    return Response(resources.files("flowerx").joinpath("web", name).read_bytes(), media_type=ASSETS[name])


# -- the Open Inference Protocol (KServe v2) -----------------------------------------------------------------
async def v2_server(request: Request) -> Response:
    return JSONResponse({"name": "flowerx", "version": __version__, "extensions": ["binary_tensor_data"]})


async def v2_live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def v2_ready(request: Request) -> Response:
    ready = request.app.state.server.ready
    return JSONResponse({"ready": ready}, 200 if ready else 503)


async def v2_model(request: Request) -> Response:
    model = request.app.state.server.model(request.path_params["name"])
    p = model.predictor
    size = -1 if p.any_size else p.input_size
    return JSONResponse(
        {
            "name": model.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, size, size, 3]}],
            "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, len(p.labels)]}],
            "parameters": {"labels": p.labels},
        }
    )


async def v2_model_ready(request: Request) -> Response:
    model = request.app.state.server.models.get(request.path_params["name"])
    if model is None:
        raise HTTPProblem(404, f"no model named {request.path_params['name']!r}")
    ready = model.predictor is not None
    return JSONResponse({"name": model.name, "ready": ready}, 200 if ready else 503)


def _v2_tensor(body: bytes, header_length: str | None) -> tuple[dict, np.ndarray]:
    """The request's JSON and its `image` tensor, from JSON data or the binary tensor data extension."""
    try:
        split = int(header_length) if header_length else len(body)
        request = json.loads(body[:split])
        (spec,) = [i for i in request["inputs"] if i["name"] == "image"]
        shape, datatype = [int(d) for d in spec["shape"]], spec["datatype"]
    except (ValueError, KeyError, TypeError) as e:
        raise HTTPProblem(400, f"not an inference request with one `image` input ({type(e).__name__})") from None
    if datatype not in V2_DATATYPES or len(shape) != 4 or shape[3] != 3 or min(shape) < 1:
        raise HTTPProblem(400, f"`image` must be UINT8 [N, H, W, 3], got {datatype} {shape}")
    count = int(np.prod(shape))
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        data = body[split : split + int(size)]
        if len(data) != count:
            raise HTTPProblem(400, f"binary `image` data has {len(data)} bytes, its shape needs {count}")
        return request, np.frombuffer(data, np.uint8).reshape(shape)
    values = np.asarray(spec.get("data", []))
    if values.size != count or (values.size and (values.min() < 0 or values.max() > 255)):
        raise HTTPProblem(400, f"`image` data must be {count} values from 0 to 255")
    return request, values.astype(np.uint8).reshape(shape)


async def v2_infer(request: Request) -> Response:
    server: Server = request.app.state.server
    model = server.model(request.path_params["name"])
    with server.admit():
        return await _v2_infer(server, model, request)


async def _v2_infer(server: Server, model: ServedModel, request: Request) -> Response:
    body = await _body(request, server.cfg)
    infer, images = _v2_tensor(body, request.headers.get("inference-header-content-length"))
    p, loop = model.predictor, asyncio.get_running_loop()  # p: this request's, whatever a reload swaps in
    request.state.model, request.state.images = model.name, len(images)
    if not p.any_size and images.shape[1:3] != (p.input_size, p.input_size):
        raise HTTPProblem(400, f"this model takes [N, {p.input_size}, {p.input_size}, 3]")
    model.batcher.check_room(len(images))

    async def one(image: np.ndarray) -> np.ndarray:
        with model.batcher.decoding_one():
            pixels = await loop.run_in_executor(server.decode_pool, resize_array, image, p.input_size)
        return await model.batcher.submit(p, pixels)

    probs = np.stack(await asyncio.gather(*(one(image) for image in images)))
    server.metrics.images.labels(model.name).inc(len(images))
    output = {"name": "probs", "datatype": "FP32", "shape": list(probs.shape), "data": probs.ravel().tolist()}
    answer = {"model_name": model.name, "model_version": "1", "outputs": [output]}
    if "id" in infer:
        answer["id"] = infer["id"]
    return JSONResponse(answer)


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """An [H, W, 3] uint8 array to [S, S, 3] by the contract's resize."""
    from PIL import Image

    return image if image.shape[:2] == (size, size) else resize(Image.fromarray(np.ascontiguousarray(image)), size)


# -- the app -------------------------------------------------------------------------------------------------
ROUTES = [
    Route("/", page),
    *(Route(f"/{name}", asset) for name in ASSETS),
    Route("/classify", classify, methods=["POST"]),
    Route("/v1/models", list_models),
    Route("/v1/models/{name}:classify", classify, methods=["POST"]),
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
    Route("/v2", v2_server),
    Route("/v2/health/live", v2_live),
    Route("/v2/health/ready", v2_ready),
    Route("/v2/models/{name}", v2_model),
    Route("/v2/models/{name}/ready", v2_model_ready),
    Route("/v2/models/{name}/infer", v2_infer, methods=["POST"]),
]


class _Observed:
    """ASGI wrapper: every answer counted and timed by route, one log line per request (no image data), and
    any failure answered as one JSON line (never a traceback)."""

    def __init__(self, app: Starlette, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # answered by the app's handler for Exception (a JSON line) unless it had begun
            log.error("unexpected %s on %s: %s", type(e).__name__, scope.get("path"), str(e)[:200])
            if not status[0]:
                await _problem(500, f"internal error ({type(e).__name__})")(scope, receive, sending)
        route = _route_of(scope)
        seconds = time.perf_counter() - start
        self.server.metrics.requests.labels(route, str(status[0])).inc()
        self.server.metrics.latency.labels(route).observe(seconds)
        state = scope.get("state", {})
        log.info(
            "request",
            extra={
                "http": {
                    "method": scope["method"],
                    "route": route,
                    "status": status[0],
                    "ms": round(seconds * 1000, 2),
                    "model": state.get("model"),
                    "images": state.get("images"),
                    "client": (scope.get("client") or ("", 0))[0],
                }
            },
        )


def _route_of(scope) -> str:
    """The route's template (a bounded label), not the raw path."""
    for route in ROUTES:
        match, _ = route.matches(scope)
        if match.name == "FULL":
            return route.path
    return "unmatched"


class LogLine(logging.Formatter):
    """flowerx serve's log lines: text, or one JSON object a line; a request's fields as they are (no image
    data ever reaches a log)."""

    def __init__(self, as_json: bool):
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        http = getattr(record, "http", None)
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        if self.as_json:
            return json.dumps({"time": when, "level": record.levelname.lower(), "message": record.getMessage(),
                               **(http or {})})  # fmt: skip
        if http:
            extra = " ".join(f"{k}={v}" for k, v in http.items() if k not in ("method", "route", "status", "ms") and v)
            text = f"{http['method']} {http['route']} {http['status']} {http['ms']:.1f} ms {extra}".rstrip()
        else:
            text = record.getMessage()
        return printable(f"{when} {record.levelname.lower()} {text}")


def configure_logging(cfg: ServeConfig) -> None:
    """The server's log: flowerx's and uvicorn's lines on stderr, one a line (in every worker process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogLine(cfg.log_format == "json"))
    for name in ("flowerx", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(cfg.log_level.upper())
        logger.propagate = False


def build_app(cfg: ServeConfig) -> _Observed:
    """The ASGI app for cfg (models load in the background once it starts)."""
    cfg.check()
    server = Server(cfg)

    async def problem(request: Request, e: HTTPProblem) -> Response:
        return _problem(e.status, e.reason, e.headers)

    async def not_found(request: Request, e: Exception) -> Response:
        return _problem(getattr(e, "status_code", 404), getattr(e, "detail", None) or "not found")

    async def overloaded(request: Request, e: Overloaded) -> Response:
        return _problem(503, f"overloaded: {e}", {"Retry-After": "1"})

    async def internal(request: Request, e: Exception) -> Response:
        return _problem(500, f"internal error ({type(e).__name__})")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await server.startup()
        yield
        await server.shutdown()

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={
            HTTPProblem: problem,
            Overloaded: overloaded,
            404: not_found,
            405: not_found,
            Exception: internal,
        },
    )
    app.state.server = server
    return _Observed(app, server)


def app_from_env() -> _Observed:
    """For uvicorn's workers (--workers > 1): the config as the CLI left it in FLOWERX_SERVE_CONFIG."""
    cfg = ServeConfig(**json.loads(os.environ["FLOWERX_SERVE_CONFIG"]))
    configure_logging(cfg)
    return build_app(cfg)


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGTERM or Ctrl-C: then it stops accepting, finishes what is in flight, returns."""
    import uvicorn

    cfg.check()
    configure_logging(cfg)
    options = dict(host=cfg.host, port=cfg.port, log_config=None, access_log=False, timeout_graceful_shutdown=30)
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again under the handlers it found, which would
    # kill the process after a clean drain: with these, a drained server returns and the process exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if cfg.workers > 1:
            os.environ["FLOWERX_SERVE_CONFIG"] = json.dumps(asdict(cfg))
            uvicorn.run("flowerx.serve:app_from_env", factory=True, workers=cfg.workers, **options)
        else:
            uvicorn.run(build_app(cfg), **options)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["ServeConfig", "build_app", "serve"]
