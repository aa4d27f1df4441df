"""The bottleneck cache: each image's pooled features, computed once per architecture and reused.

An entry is keyed by a hash of the image's bytes (so an edited image is recomputed and a moved one is
not), stored as a plain .npy file (never pickled), written atomically (an interrupted run leaves no
corrupt entry and resumes where it stopped), and checked when read.
"""

from __future__ import annotations

import hashlib
import io
import os
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


@dataclass
class BottleneckStats:
    cached: int = 0
    computed: int = 0
    corrupt: int = 0  # entries found damaged on disk and recomputed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason) of unreadable images


class BottleneckCache:
    """Files under <root>/<architecture>-<version>/<key[:2]>/<key>.npy; keys are hex digests only."""

    def __init__(self, root: str | os.PathLike, arch: Architecture):
        self.arch = arch
        self.dir = Path(root).expanduser() / f"{arch.name}-{CACHE_VERSION}"

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

    make_model is called only if something must be computed; it returns a function from a uint8 batch
    [B, S, S, 3] to features [B, D]. Decoding runs on a thread pool, overlapped with the model.
    Returns (features [n, D], ok mask [n], stats); rows of failed images are zero and not ok.
    """
    workers = workers or os.cpu_count() or 1
    n, dim, size = len(items), cache.arch.feature_dim, cache.arch.input_size
    features = np.zeros((n, dim), np.float32)
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

        def decode(job: tuple[int, str]) -> np.ndarray | str:
            try:
                return prepare_image(items[job[0]].path, size)
            except ImageError as e:
                return str(e).split(": ", 1)[-1]

        def submit(batch: Sequence[tuple[int, str]]) -> list:
            chunk = max(1, -(-len(batch) // workers))
            return [pool.submit(lambda c=c: [decode(j) for j in c]) for c in _batches(batch, chunk)]

        # Decode batch k+1 on the pool while the model runs on batch k.
        batches = list(_batches(todo, batch_size))
        pending = submit(batches[0])
        for k, batch in enumerate(batches):
            decoded = [img for f in pending for img in f.result()]
            if k + 1 < len(batches):
                pending = submit(batches[k + 1])
            good = [(job, img) for job, img in zip(batch, decoded) if not isinstance(img, str)]
            for job, img in zip(batch, decoded):
                if isinstance(img, str):
                    stats.failed.append((items[job[0]].relpath, img))
                    on_warning(f"skipping {items[job[0]].relpath}: {img}")
            if good:
                out = np.asarray(model(np.stack([img for _, img in good])), np.float32)
                for ((i, key), _), vector in zip(good, out):
                    cache.store(key, vector)
                    features[i], ok[i] = vector, True
                stats.computed += len(good)
            on_progress(len(batch))
    return features, ok, stats
