"""Decode ahead of the network: one helper for every pass over images (bottlenecks, fine-tuning,
calibration, evaluation)."""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
AHEAD = 2  # tasks in flight per worker by default: enough to keep every core busy, little memory


def default_workers() -> int:
    """map_ahead's threads when not told: one per core."""
    return os.cpu_count() or 1


@contextmanager
def map_ahead(
    fn: Callable[[T], R], tasks: Iterable[T], workers: int | None = None, in_flight: int | None = None
) -> Iterator[Iterator[R]]:
    """`with map_ahead(fn, tasks) as results:` fn(task) for each task on a pool of `workers` threads (default:
    one per core), at most `in_flight` tasks submitted ahead (default: 2 per worker), results in order. File
    reads, hashing, PIL decoding and onnxruntime release the GIL, so this work overlaps the consumer's.
    Leaving the block (done, a failure, Ctrl-C, or a consumer that stopped early) cancels the tasks not yet
    started and waits only for the running ones."""
    workers = workers or default_workers()
    tasks = iter(tasks)
    pool = ThreadPoolExecutor(workers)
    pending = deque(pool.submit(fn, task) for task in itertools.islice(tasks, in_flight or AHEAD * workers))

    def results() -> Iterator[R]:
        while pending:
            result = pending.popleft().result()
            for task in itertools.islice(tasks, 1):
                pending.append(pool.submit(fn, task))
            yield result

    try:
        yield results()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)


def chunked(seq, size: int) -> Iterator:
    """seq in consecutive slices of at most size."""
    for start in range(0, len(seq), size):
        yield seq[start : start + size]
