"""The bottleneck cache: each image's pooled features, computed once per architecture and reused.

An entry is keyed by a hash of the image's bytes (so an edited image is recomputed and a moved one is
not), stored as a plain .npy file (never pickled), written atomically (an interrupted run leaves no
corrupt entry and resumes where it stopped), and checked when read.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .architectures import Architecture
from .data import ImageItem, prepare_image
from .errors import ImageError
from .fileio import atomic_write

# Bump when the decode rule or the features change, so old entries are never mixed with new ones.
CACHE_VERSION = "v1"
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
        """weights_id names the weights the features come from (a hash of the file): other weights, other entries."""
        self.arch = arch
        self.dir = Path(root).expanduser() / f"{arch.name}-{weights_id}-{CACHE_VERSION}"

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
        try:
            vector = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except Exception as e:  # truncated, garbage, wrong header
            raise ValueError(f"unreadable cache entry {path.name}: {e}") from None
        if vector.shape != (self.arch.feature_dim,) or vector.dtype != np.float32 or not np.isfinite(vector).all():
            raise ValueError(f"cache entry {path.name} has shape {vector.shape} {vector.dtype}")
        return vector

    def store(self, key: str, vector: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(vector, dtype=np.float32), allow_pickle=False)
        atomic_write(self.path(key), buffer.getvalue(), durable=False)  # load() verifies


def _read_key(item: ImageItem) -> str | tuple[str, str]:
    try:
        return BottleneckCache.key(item.path.read_bytes())
    except OSError as e:
        return ("error", f"cannot read file ({e.strerror or e})")


def _batches(seq: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def _allocate(n: int, dim: int, folder: Path) -> np.ndarray:
    """The feature matrix: in memory when small, else a memory-mapped scratch file (datasets of millions)."""
    if n * dim * 4 <= IN_MEMORY_LIMIT:
        return np.zeros((n, dim), np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=".features-", suffix=".npy", delete=False)
    handle.close()
    matrix = np.lib.format.open_memmap(handle.name, mode="w+", dtype=np.float32, shape=(n, dim))
    os.unlink(handle.name)  # the mapping stays valid; the file goes away with the process
    return matrix


def get_bottlenecks(
    items: Sequence[ImageItem],
    cache: BottleneckCache,
    make_model: Callable[[], Callable[[np.ndarray], np.ndarray]],
    batch_size: int = 32,
    workers: int | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
    on_warning: Callable[[str], None] = lambda msg: None,
) -> tuple[np.ndarray, np.ndarray, BottleneckStats]:
    """Features for items, from the cache or computed in batches.

    make_model is called only if something must be computed; it returns a thread-safe function from a
    uint8 batch [B, S, S, 3] to features [B, D]. Each of `workers` threads decodes a batch, runs the model on
    it and stores the results (decoding and the model release the GIL), so every core stays busy without
    a hand-tuned split between decoding and inference.
    Returns (features [n, D], ok mask [n], stats); rows of failed images are zero and not ok.
    """
    workers = workers or os.cpu_count() or 1
    n, dim, size = len(items), cache.arch.feature_dim, cache.arch.input_size
    features = _allocate(n, dim, cache.dir)
    ok = np.zeros(n, bool)
    stats = BottleneckStats()
    todo: list[tuple[int, str]] = []
    with ThreadPoolExecutor(workers) as pool:
        for i, key in enumerate(pool.map(_read_key, items)):
            if isinstance(key, tuple):
                stats.failed.append((items[i].relpath, key[1]))
                on_warning(f"skipping {items[i].relpath}: {key[1]}")
                on_progress(1)
                continue
            try:
                vector = cache.load(key)
            except ValueError as e:
                stats.corrupt += 1
                on_warning(f"recomputing {items[i].relpath}: {e}")
                vector = None
            if vector is None:
                todo.append((i, key))
            else:
                features[i], ok[i] = vector, True
                stats.cached += 1
                on_progress(1)
        if not todo:
            return features, ok, stats

        model = make_model()

        def process(batch: Sequence[tuple[int, str]]) -> tuple[list, np.ndarray | None]:
            """Decode, infer and store one batch; returns (per-job image or failure reason, features)."""
            decoded: list[np.ndarray | str] = []
            for i, _ in batch:
                try:
                    decoded.append(prepare_image(items[i].path, size))
                except ImageError as e:
                    decoded.append(e.reason)
            good = [img for img in decoded if not isinstance(img, str)]
            if not good:
                return decoded, None
            out = np.asarray(model(np.stack(good)), np.float32)
            vectors = iter(out)
            for (i, key), img in zip(batch, decoded):
                if not isinstance(img, str):
                    cache.store(key, next(vectors))
            return decoded, out

        pending: deque = deque()  # at most 2 batches per worker in flight, consumed in order
        batches = iter(_batches(todo, batch_size))
        for batch in itertools.islice(batches, 2 * workers):
            pending.append((batch, pool.submit(process, batch)))
        try:
            while pending:
                batch, future = pending.popleft()
                decoded, out = future.result()
                nxt = next(batches, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(process, nxt)))
                vectors = iter(out if out is not None else ())
                for (i, _), img in zip(batch, decoded):
                    if isinstance(img, str):
                        stats.failed.append((items[i].relpath, img))
                        on_warning(f"skipping {items[i].relpath}: {img}")
                    else:
                        features[i], ok[i] = next(vectors), True
                        stats.computed += 1
                on_progress(len(batch))
        except BaseException:  # Ctrl-C or a failure: stop queued batches; what was stored stays stored
            for _, future in pending:
                future.cancel()
            raise
    return features, ok, stats
