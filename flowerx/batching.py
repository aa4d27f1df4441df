"""Dynamic micro-batching for `flowerx serve`: concurrent requests for one model become one onnxruntime call.

Each request decodes its image on a thread pool (never on the event loop), then submits the S x S pixels
here. One task per model takes what is queued, waits up to `max_wait` for more only while other requests are
still decoding (so a lone request never waits for company), and runs up to `max_batch` images at once on a
thread. Queued images are bounded: past `max_queue` a submit fails at once with `Overloaded` (the server
answers 503 with Retry-After) instead of growing memory without end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np


class Overloaded(Exception):
    """Too many images queued for one model."""


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0


class Batcher:
    """Gathers S x S images for one model into batches; `run(key, batch) -> probs` does the inference. The key
    says what an image was prepared for (the model's predictor, which a reload may replace meanwhile): images
    of different keys never share a call."""

    def __init__(
        self,
        run: Callable[[object, np.ndarray], np.ndarray],
        executor: Executor,
        max_batch: int = 32,
        max_wait: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run, self.executor = run, executor
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self.on_batch = on_batch or (lambda size: None)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queued = 0  # images submitted and not yet answered
        self.decoding = 0  # requests for this model still decoding: more images are on their way
        self.stats = BatchStats()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="flowerx-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def decoding_one(self):
        """Around a request's decode: tells the batcher that an image is coming."""
        self.decoding += 1
        try:
            yield
        finally:
            self.decoding -= 1

    def check_room(self, images: int) -> None:
        """Overloaded unless `images` more fit: images queued and still decoding count."""
        if self.queued + self.decoding + images > self.max_queue:
            raise Overloaded(f"{self.queued + self.decoding} images queued (the limit is {self.max_queue})")

    async def submit(self, key: object, pixels: np.ndarray) -> np.ndarray:
        """The probabilities of one S x S image, computed in some batch of images of the same key."""
        self.check_room(1)
        future = asyncio.get_running_loop().create_future()
        self.queued += 1
        try:
            await self.queue.put((key, pixels, future))
            return await future
        finally:
            self.queued -= 1

    async def _gather(self) -> list:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if self.decoding == 0 or left <= 0:  # nothing else on its way, or waited long enough
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [item for item in batch if not item[2].done()]  # not a cancelled client's

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            groups: dict[int, list] = {}
            for item in batch:
                groups.setdefault(id(item[0]), []).append(item)
            for group in groups.values():
                await self._run(group)

    async def _run(self, batch: list) -> None:
        loop = asyncio.get_running_loop()
        key = batch[0][0]
        self.on_batch(len(batch))
        self.stats.batches += 1
        self.stats.images += len(batch)
        try:
            probs = await loop.run_in_executor(self.executor, self.run, key, np.stack([p for _, p, _ in batch]))
            results = list(probs)
        except Exception:  # a batch that fails: run its images one by one, so only a bad one fails
            results = []
            for _, pixels, _ in batch:
                try:
                    results.append((await loop.run_in_executor(self.executor, self.run, key, pixels[None]))[0])
                except Exception as e:
                    results.append(e)
        for (_, _, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
