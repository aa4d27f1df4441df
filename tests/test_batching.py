"""The micro-batcher behind flowerx serve: batches form only when work is on its way, keys never mix, a bad
image fails alone, and the queue is bounded."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from flowerx.batching import Batcher, Overloaded


def _batcher(calls: list, **kwargs) -> Batcher:
    def run(key, batch):
        calls.append((key, len(batch)))
        if (batch == 255).all(axis=(1, 2, 3)).any():
            raise ValueError("a bad image")
        return batch.mean(axis=(1, 2, 3), keepdims=False)[:, None] + key

    return Batcher(run, ThreadPoolExecutor(1), **kwargs)


def test_a_lone_request_does_not_wait_and_concurrent_ones_share_calls():
    async def scenario():
        calls = []
        batcher = _batcher(calls, max_batch=8, max_wait=0.5)
        batcher.start()
        start = time.perf_counter()
        assert (await batcher.submit(0, np.full((1, 2, 2, 3), 4, np.uint8)[0]))[0] == 4
        assert time.perf_counter() - start < 0.25  # nothing else was decoding: no wait for company
        with batcher.decoding_one():  # a request still decoding: the batcher waits for it
            first = asyncio.ensure_future(batcher.submit(0, np.full((2, 2, 3), 1, np.uint8)))
            await asyncio.sleep(0.05)
            second = await batcher.submit(0, np.full((2, 2, 3), 2, np.uint8))
        assert (await first)[0] == 1 and second[0] == 2 and calls[-1] == (0, 2)
        pixels = [np.full((2, 2, 3), v, np.uint8) for v in (10, 20, 255, 30)]
        results = await asyncio.gather(*(batcher.submit(1, p) for p in pixels), return_exceptions=True)
        assert [r if isinstance(r, Exception) else r[0] for r in results][:2] == [11, 21]
        assert isinstance(results[2], ValueError) and results[3][0] == 31  # only the bad one failed
        mixed = await asyncio.gather(
            batcher.submit("a", pixels[0]), batcher.submit(5, pixels[1]), return_exceptions=True
        )
        assert isinstance(mixed[0], TypeError) and mixed[1][0] == 25  # keys never share a call
        await batcher.stop()

    asyncio.run(scenario())


def test_the_queue_is_bounded():
    async def scenario():
        batcher = _batcher([], max_queue=2)
        batcher.check_room(2)
        with batcher.decoding_one(), batcher.decoding_one():
            with pytest.raises(Overloaded, match="2 images queued"):
                batcher.check_room(1)

    asyncio.run(scenario())
