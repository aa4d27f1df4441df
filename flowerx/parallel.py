"""Decode ahead of the network: one helper for every pass over images (bottlenecks, fine-tuning,
calibration, evaluation)."""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
AHEAD = 2  # chunks in flight per worker: enough to keep every core busy, little memory


def map_ahead(fn: Callable[[T], R], chunks: Iterable[T], workers: int | None = None, ahead: int = AHEAD) -> Iterator[R]:
    """fn(chunk) for each chunk on a pool of `workers` threads (default: one per core), at most ahead x workers
    chunks in flight, results yielded in order. File reads, hashing, PIL decoding and onnxruntime release the
    GIL, so decoding overlaps the consumer's work. A failure, Ctrl-C or a consumer that stops early cancels
    the chunks not yet started."""
    workers = workers or os.cpu_count() or 1
    chunks = iter(chunks)
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(fn, chunk) for chunk in itertools.islice(chunks, ahead * workers))
        try:
            while pending:
                result = pending.popleft().result()
                for chunk in itertools.islice(chunks, 1):
                    pending.append(pool.submit(fn, chunk))
                yield result
        finally:
            for future in pending:
                future.cancel()


def chunked(seq, size: int) -> Iterator:
    """seq in consecutive slices of at most size."""
    for start in range(0, len(seq), size):
        yield seq[start : start + size]
