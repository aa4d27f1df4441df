"""The bottleneck cache: each image's pooled features, computed once per architecture and reused.

An entry is keyed by a hash of the image's bytes (so an edited image is recomputed and a moved one is
not), stored as a plain .npy file (never pickled), written atomically (an interrupted run leaves no
corrupt entry and resumes where it stopped), and checked when read.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .architectures import Architecture
from .contract import INPUT
from .data import Distortion, ImageItem, max_image_bytes, prepare_image
from .errors import FlowerxError, ImageError
from .fileio import RefusedFile, read_regular
from .parallel import chunked, map_ahead

# Bump when the decode rule or the features change, so old entries are never mixed with new ones.
# v2: embedded ICC profiles converted to sRGB; v3: the contract's own resize (onnxruntime), and large JPEGs
# decoded at >= 4x the input size
CACHE_VERSION = "v3"
IN_MEMORY_LIMIT = 1 << 30  # bytes of features kept in RAM; larger datasets are memory-mapped


@dataclass
class BottleneckStats:
    cached: int = 0
    computed: int = 0
    corrupt: int = 0  # entries found damaged on disk and recomputed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason) of unreadable images


class BottleneckCache:
    """Files under <root>/<architecture>-<weights>-<version>/<key[:2]>/<key>.npy; keys are hex digests only."""

    def __init__(self, root: str | os.PathLike, arch: Architecture, weights_id: str = "imagenet"):
        """weights_id names the weights the features come from (a hash of the file): other weights, other
        entries."""
        self.arch, self.weights_id = arch, weights_id
        self.shape, self.dtype = (arch.feature_dim,), np.dtype(np.float32)
        self.dir = Path(root).expanduser() / f"{arch.name}-{weights_id}-{CACHE_VERSION}"
        self._made: set[str] = set()  # prefix folders known to exist

    @staticmethod
    def key(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"bad cache key {key!r}")  # keys never come from file names
        return self.dir / key[:2] / f"{key}.npy"

    def load(self, key: str) -> np.ndarray | None:
        """The cached vector, or None when absent. Raises ValueError for a damaged entry."""
        path = self.path(key)
        if not os.path.exists(path):  # the common miss, without np.load's exception path
            return None
        try:
            vector = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except Exception as e:  # truncated, garbage, wrong header
            raise ValueError(f"unreadable cache entry {path.name}: {e}") from None
        if vector.shape != self.shape or vector.dtype != self.dtype or not np.isfinite(vector).all():
            raise ValueError(f"cache entry {path.name} has shape {vector.shape} {vector.dtype}")
        return vector

    def store(self, key: str, vector: np.ndarray) -> None:
        """Write one entry atomically (temporary file, then rename). Lean on purpose: it runs once per image,
        on the worker threads, so it avoids pathlib and buffered files (load() verifies what it reads, so
        no fsync either)."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(vector, dtype=self.dtype), allow_pickle=False)
        path = str(self.path(key))
        folder = os.path.dirname(path)
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        tmp = f"{folder}/.{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = buffer.getbuffer()
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise FlowerxError(f"cannot write the bottleneck cache in {self.dir}: {e.strerror or e}") from None


def stream_session(model: str | os.PathLike | bytes) -> Callable[[np.ndarray], np.ndarray]:
    """A thread-safe function of a uint8 batch on onnxruntime, for one stream per core: one intra-op
    thread and no spinning, so a stream never steals the core another thread is decoding on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    first = [session.get_outputs()[0].name]  # features or probs, not a model's constant `labels`
    return lambda batch: session.run(first, {INPUT: batch})[0]


def _allocate(shape: tuple[int, ...], dtype: np.dtype, folder: Path) -> np.ndarray:
    """The feature matrix: in memory when small, else a memory-mapped scratch file (datasets of millions)."""
    if int(np.prod(shape)) * dtype.itemsize <= IN_MEMORY_LIMIT:
        return np.zeros(shape, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=".features-", suffix=".npy", delete=False)
    handle.close()
    matrix = np.lib.format.open_memmap(handle.name, mode="w+", dtype=dtype, shape=shape)
    os.unlink(handle.name)  # the mapping stays valid; the file goes away with the process
    return matrix


class _Once:
    """make() called once, on first use, by whichever thread needs it first."""

    def __init__(self, make: Callable):
        self.make, self.value, self.lock = make, None, threading.Lock()

    def __call__(self):
        with self.lock:
            if self.value is None:
                self.value = self.make()
        return self.value


def _look_up(
    item: ImageItem, cache: BottleneckCache, view: tuple[Distortion, int] | None, limit: int, on_warning: Callable
) -> tuple[str, object]:
    """One image, read once: ("cached", vector), ("computed" | "corrupt", (key, decoded image)) or
    ("failed", reason)."""
    try:
        data = read_regular(item.path, limit)  # never a FIFO or device: they would hang or never end
    except RefusedFile as e:
        return "failed", str(e)
    except OSError as e:
        return "failed", f"cannot read file ({e.strerror or e})"
    key, status = BottleneckCache.key(data), "computed"
    if view is not None:
        key = BottleneckCache.key(f"{key}|{view[0].id}|{view[1]}".encode())
    try:
        vector = cache.load(key)
    except ValueError as e:
        vector, status = None, "corrupt"
        on_warning(f"recomputing {item.relpath}: {e}")
    if vector is not None:
        return "cached", vector
    size = cache.arch.input_size
    try:
        image = prepare_image(data, size) if view is None else view[0].view(data, size, seed=int(key[:15], 16))
    except ImageError as e:
        return "failed", e.reason
    return status, (key, image)


def compute_batch(
    items: Sequence[ImageItem],
    cache: BottleneckCache,
    model: Callable[[], Callable[[np.ndarray], np.ndarray]],
    view: tuple[Distortion, int] | None = None,
    limit: int | None = None,
    on_warning: Callable[[str], None] = lambda msg: None,
) -> list[tuple[str, object]]:
    """One batch of the pass, per image: ("cached" | "computed" | "corrupt", vector) or ("failed", reason).
    Reads each file once, loads what is cached, decodes the rest, runs model() on them together and stores
    the results (also what a Ray worker runs, into the same cache)."""
    limit = limit or max_image_bytes()
    results = [_look_up(item, cache, view, limit, on_warning) for item in items]
    todo = [pos for pos, (status, _) in enumerate(results) if status in ("computed", "corrupt")]
    if todo:
        out = np.asarray(model()(np.stack([results[pos][1][1] for pos in todo])), cache.dtype)
        for pos, vector in zip(todo, out):
            status, (key, _) = results[pos]
            cache.store(key, vector)
            results[pos] = (status, vector)
    return results


def get_bottlenecks(
    items: Sequence[ImageItem],
    cache: BottleneckCache,
    make_model: Callable[[], Callable[[np.ndarray], np.ndarray]],
    batch_size: int = 32,
    workers: int | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
    on_warning: Callable[[str], None] = lambda msg: None,
    view: tuple[Distortion, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, BottleneckStats]:
    """Features for items, from the cache or computed in batches.

    view=(distortion, k): the features of each image's k-th distorted view instead, cached under a key of
    the image's bytes, the distortion settings and k (the same view every run, so reruns compute nothing).

    Each of `workers` threads takes a batch of images, reads each file once (its hash is the cache key),
    loads what is cached, decodes the rest, runs the model on them and stores the results; file reads,
    hashing, decoding and the model all release the GIL, so every core stays busy. make_model is called
    (once) only if something must be computed; it returns a thread-safe function from a uint8 batch
    [B, S, S, 3] to features [B, D].
    Returns (features [n, D], ok mask [n], stats); rows of failed images are zero and not ok.
    """
    limit = max_image_bytes()
    features = _allocate((len(items), *cache.shape), cache.dtype, cache.dir)
    ok = np.zeros(len(items), bool)
    stats = BottleneckStats()
    model = _Once(make_model)

    def process(batch: Sequence[int]) -> list[tuple[str, object]]:
        return compute_batch([items[i] for i in batch], cache, model, view, limit, on_warning)

    # Ctrl-C or a failure stops the queued batches; what was stored stays stored.
    tasks = chunked(range(len(items)), batch_size)
    with map_ahead(lambda b: (b, process(b)), tasks, workers) as done:
        for batch, results in done:
            for i, (status, value) in zip(batch, results):
                if status == "failed":
                    stats.failed.append((items[i].relpath, value))
                    on_warning(f"skipping {items[i].relpath}: {value}")
                    continue
                features[i], ok[i] = value, True
                stats.cached += status == "cached"
                stats.computed += status != "cached"
                stats.corrupt += status == "corrupt"
            on_progress(len(batch))
    return features, ok, stats
