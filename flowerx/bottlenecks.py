"""The bottleneck cache: each image's pooled features, computed once per architecture and reused.

An entry is keyed by a hash of the image's bytes (so an edited image is recomputed and a moved one is
not), written atomically (an interrupted run leaves no corrupt entry and resumes where it stopped), never
pickled, and checked when read. Two forms, the same entries:
  files  (BottleneckCache): one .npy per image. Exact resume and per-image invalidation; right on a laptop.
  shards (ShardedCache): .npz shards of (content hash, features) rows, up to SHARD_ROWS each, whose key
         arrays are the index. A million images is 250 files, not a million: right on network storage and
         for Ray workers. A run killed midway loses at most the rows not yet written as a shard.
open_cache picks one (CACHE_FORMATS): the form the folder already holds, else shards from SHARD_THRESHOLD
images up.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .architectures import Architecture
from .contract import INPUT
from .data import Distortion, ImageItem, max_image_bytes, prepare_image
from .errors import FlowerxError, ImageError
from .fileio import RefusedFile, atomic_write, read_regular
from .parallel import chunked, map_ahead

# Bump when the decode rule or the features change, so old entries are never mixed with new ones.
# v2: embedded ICC profiles converted to sRGB; v3: the contract's own resize (onnxruntime), and large JPEGs
# decoded at >= 4x the input size
CACHE_VERSION = "v3"
IN_MEMORY_LIMIT = 1 << 30  # bytes of features kept in RAM; larger datasets are memory-mapped
CACHE_FORMATS = ("auto", "files", "shards")
SHARD_THRESHOLD = 50_000  # images from which "auto" picks shards for a new cache
SHARD_ROWS = 4096  # rows per shard: 16 MB for mobilenet_1.0_224's 1024 features
_DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # what reading a bad shard raises


@dataclass
class BottleneckStats:
    cached: int = 0
    computed: int = 0
    corrupt: int = 0  # entries found damaged on disk and recomputed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason) of unreadable images


class BottleneckCache:
    """Files under <root>/<architecture>-<weights>-<version>/<key[:2]>/<key>.npy; keys are hex digests only."""

    sharded = False

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

    def refresh(self, on_warning: Callable[[str], None] = lambda msg: None) -> None:
        """See entries other processes wrote since (the files form always does)."""

    def flush(self) -> None:
        """Write what store() holds back (the files form holds nothing)."""


class ShardedCache(BottleneckCache):
    """Shards <root>/<architecture>-<weights>-<version>-shards/shard-<digest>.npz, each holding `keys`
    (uint8 [n, 32], the content hashes) and `features` (float32 [n, D]); the digest is the hash of its keys,
    so two workers that wrote the same rows write the same file. store() gathers rows and writes a shard
    atomically every SHARD_ROWS rows and at flush(); the zip's CRC-32, the shapes and finiteness are checked
    on read, and a damaged shard is set aside (renamed *.damaged) and its rows recomputed. The index of every
    shard's keys is held in memory (about 150 bytes per image) and refresh() adds the shards written since."""

    NAME = re.compile(r"shard-[0-9a-f]{40}\.npz")
    sharded = True

    def __init__(self, root: str | os.PathLike, arch: Architecture, weights_id: str = "imagenet"):
        super().__init__(root, arch, weights_id)
        self.dir = self.dir.with_name(self.dir.name + "-shards")
        self._index: dict[bytes, tuple[int, int]] = {}  # key -> (shard number, row)
        self._shards: list[Path] = []
        self._known: set[str] = set()
        self._pending: dict[bytes, np.ndarray] = {}
        self._loaded: OrderedDict[int, np.ndarray] = OrderedDict()  # a few shards' features, last used last
        self._lock = threading.RLock()
        self._refreshed = False

    def _set_aside(self, path: Path, why: str, on_warning: Callable[[str], None]) -> None:
        on_warning(f"setting aside damaged cache shard {path.name} (its images are recomputed): {why}")
        try:
            os.replace(path, path.with_name(path.name + ".damaged"))  # our own file: NAME matched it
        except OSError:
            pass

    def refresh(self, on_warning: Callable[[str], None] = lambda msg: None) -> None:
        self._refreshed = True
        try:
            names = sorted(e.name for e in os.scandir(self.dir) if self.NAME.fullmatch(e.name))
        except FileNotFoundError:
            return
        with self._lock:
            for name in names:
                if name in self._known:
                    continue
                self._known.add(name)
                path = self.dir / name
                try:
                    keys, _ = self._read(path, features=False)
                except FileNotFoundError:
                    continue
                except _DAMAGED as e:
                    self._set_aside(path, str(e), on_warning)
                    continue
                number = len(self._shards)
                self._shards.append(path)
                for row, key in enumerate(keys):
                    self._index[key.tobytes()] = (number, row)

    def _read(self, path: Path, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """A shard's keys (and feature rows), checked: shapes, types, finite values, the zip's CRC-32 (zipfile
        checks it as a member is read); raises one of _DAMAGED."""
        with np.load(path, allow_pickle=False) as shard:
            keys = shard["keys"]
            rows = shard["features"] if features else None
        if keys.ndim != 2 or keys.shape[1] != 32 or keys.dtype != np.uint8:
            raise ValueError(f"keys of shape {keys.shape} {keys.dtype}")
        if rows is not None:
            if rows.shape != (len(keys), *self.shape) or rows.dtype != self.dtype:
                raise ValueError(f"features of shape {rows.shape} {rows.dtype}")
            if not np.isfinite(rows).all():
                raise ValueError("features that are not finite")
        return keys, rows

    def _features(self, number: int) -> np.ndarray:
        """A shard's feature rows, checked (raises ValueError, and sets the shard aside, when damaged)."""
        if number in self._loaded:
            self._loaded.move_to_end(number)
            return self._loaded[number]
        path = self._shards[number]
        try:
            _, features = self._read(path, features=True)
        except _DAMAGED as e:
            self._index = {k: v for k, v in self._index.items() if v[0] != number}
            self._set_aside(path, str(e), lambda msg: None)
            raise ValueError(f"damaged cache shard {path.name}: {e}") from None
        self._loaded[number] = features
        while len(self._loaded) > 4:
            self._loaded.popitem(last=False)
        return features

    def load(self, key: str) -> np.ndarray | None:
        self.path(key)  # checks the key
        raw = bytes.fromhex(key)
        if not self._refreshed:
            self.refresh()
        with self._lock:
            if raw in self._pending:
                return self._pending[raw]
            where = self._index.get(raw)
            if where is None:
                return None
            return self._features(where[0])[where[1]].copy()

    def store(self, key: str, vector: np.ndarray) -> None:
        self.path(key)
        with self._lock:
            self._pending[bytes.fromhex(key)] = np.ascontiguousarray(vector, dtype=self.dtype)
            if len(self._pending) >= SHARD_ROWS:
                self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._pending:
                return
            keys = np.frombuffer(b"".join(self._pending), np.uint8).reshape(-1, 32)
            features = np.stack(list(self._pending.values()))
            buffer = io.BytesIO()
            np.savez(buffer, keys=keys, features=features)
            name = f"shard-{hashlib.sha256(keys.tobytes()).hexdigest()[:40]}.npz"
            atomic_write(self.dir / name, buffer.getvalue())  # raises FlowerxError, the pending rows kept
            self._pending.clear()
            self._known.add(name)
            number = len(self._shards)
            self._shards.append(self.dir / name)
            for row, key in enumerate(keys):
                self._index[key.tobytes()] = (number, row)
            self._loaded[number] = features


def open_cache(
    root: str | os.PathLike, arch: Architecture, weights_id: str, images: int, form: str = "auto"
) -> BottleneckCache:
    """The cache of this form; "auto": the form the folder already holds (files if both), else shards for
    SHARD_THRESHOLD images or more, files below."""
    if form not in CACHE_FORMATS:
        raise FlowerxError(f"unknown cache format {form!r}: one of {', '.join(CACHE_FORMATS)}")
    files = BottleneckCache(root, arch, weights_id)
    if form == "auto":
        shards_dir = files.dir.with_name(files.dir.name + "-shards")
        if files.dir.is_dir() or shards_dir.is_dir():
            form = "files" if files.dir.is_dir() else "shards"
        else:
            form = "shards" if images >= SHARD_THRESHOLD else "files"
    return files if form == "files" else ShardedCache(root, arch, weights_id)


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
    item: ImageItem,
    cache: BottleneckCache,
    view: tuple[Distortion, int] | None,
    limit: int,
    on_warning: Callable,
    known: str | None = None,
) -> tuple[str, object, str | None]:
    """One image, read at most once: ("cached", vector, key), ("computed" | "corrupt", decoded image, key) or
    ("failed", reason, None). known: its key, if a Ray worker already read it (the file is then read only
    when that entry is missing)."""
    if known is not None:
        try:
            vector = cache.load(known)
        except ValueError:
            vector = None  # found again below, and reported
        if vector is not None:
            return "cached", vector, known
    try:
        data = read_regular(item.path, limit)  # never a FIFO or device: they would hang or never end
    except RefusedFile as e:
        return "failed", str(e), None
    except OSError as e:
        return "failed", f"cannot read file ({e.strerror or e})", None
    key, status = BottleneckCache.key(data), "computed"
    if view is not None:
        key = BottleneckCache.key(f"{key}|{view[0].id}|{view[1]}".encode())
    try:
        vector = cache.load(key)
    except ValueError as e:
        vector, status = None, "corrupt"
        on_warning(f"recomputing {item.relpath}: {e}")
    if vector is not None:
        return "cached", vector, key
    size = cache.arch.input_size
    try:
        image = prepare_image(data, size) if view is None else view[0].view(data, size, seed=int(key[:15], 16))
    except ImageError as e:
        return "failed", e.reason, None
    return status, image, key


def compute_batch(
    items: Sequence[ImageItem],
    cache: BottleneckCache,
    model: Callable[[], Callable[[np.ndarray], np.ndarray]],
    view: tuple[Distortion, int] | None = None,
    limit: int | None = None,
    on_warning: Callable[[str], None] = lambda msg: None,
    keys: Sequence[str | None] | None = None,
) -> list[tuple[str, object, str | None]]:
    """One batch of the pass, per image: ("cached" | "computed" | "corrupt", vector, key) or ("failed",
    reason, None). Reads each file once, loads what is cached, decodes the rest, runs model() on them together
    and stores the results (also what a Ray worker runs, into the same cache). keys: the images' keys where
    known (see _look_up)."""
    limit = limit or max_image_bytes()
    known = keys if keys is not None else [None] * len(items)
    results = [_look_up(item, cache, view, limit, on_warning, k) for item, k in zip(items, known)]
    todo = [pos for pos, (status, _, _) in enumerate(results) if status in ("computed", "corrupt")]
    if todo:
        out = np.asarray(model()(np.stack([results[pos][1] for pos in todo])), cache.dtype)
        for pos, vector in zip(todo, out):
            status, _, key = results[pos]
            cache.store(key, vector)
            results[pos] = (status, vector, key)
    return results


@contextmanager
def _flushed(cache: BottleneckCache) -> Iterator[None]:
    """Writes what the cache holds back on the way out, also after Ctrl-C or a failure."""
    try:
        yield
    finally:
        cache.flush()


def get_bottlenecks(
    items: Sequence[ImageItem],
    cache: BottleneckCache,
    make_model: Callable[[], Callable[[np.ndarray], np.ndarray]],
    batch_size: int = 32,
    workers: int | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
    on_warning: Callable[[str], None] = lambda msg: None,
    view: tuple[Distortion, int] | None = None,
    keys: Sequence[str | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, BottleneckStats]:
    """Features for items, from the cache or computed in batches.

    view=(distortion, k): the features of each image's k-th distorted view instead, cached under a key of
    the image's bytes, the distortion settings and k (the same view every run, so reruns compute nothing).

    Each of `workers` threads takes a batch of images, reads each file once (its hash is the cache key),
    loads what is cached, decodes the rest, runs the model on them and stores the results; file reads,
    hashing, decoding and the model all release the GIL, so every core stays busy. make_model is called
    (once) only if something must be computed; it returns a thread-safe function from a uint8 batch
    [B, S, S, 3] to features [B, D].
    keys: each item's cache key where already known (a Ray pass read the images): those entries are loaded
    without reading the images again.
    Returns (features [n, D], ok mask [n], stats); rows of failed images are zero and not ok.
    """
    limit = max_image_bytes()
    features = _allocate((len(items), *cache.shape), cache.dtype, cache.dir)
    ok = np.zeros(len(items), bool)
    stats = BottleneckStats()
    model = _Once(make_model)

    def process(batch: Sequence[int]) -> list[tuple[str, object]]:
        known = None if keys is None else [keys[i] for i in batch]
        return compute_batch([items[i] for i in batch], cache, model, view, limit, on_warning, known)

    # Ctrl-C or a failure stops the queued batches; what was stored stays stored.
    tasks = chunked(range(len(items)), batch_size)
    cache.refresh(on_warning)
    with _flushed(cache), map_ahead(lambda b: (b, process(b)), tasks, workers) as done:
        for batch, results in done:
            for i, (status, value, _) in zip(batch, results):
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
