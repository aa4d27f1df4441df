"""flowerx's work on Ray Data (`--ray [ADDRESS]`): the bottleneck pass and batch classification.

Both are Ray Data pipelines of actors that each hold one onnxruntime session for their whole life, on a
local Ray instance or the cluster at ADDRESS (as ray.init takes it). The bottleneck pass fills the same
content-keyed cache the local pass writes, which then reads every entry back. On a real cluster the images
and the cache must be at paths every node can read (a shared file system). Ray is imported only here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FlowerxError

BATCH = 32


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Refuse, with one line, a cluster address nothing answers at: ray.init would retry it for minutes,
    logging warnings. Empty, "auto", "local" and schemes other than ray:// are Ray's to resolve."""
    if not address or address in ("auto", "local") or ("://" in address and not address.startswith("ray://")):
        return  # other schemes name a Ray client module (e.g. anyscale://), which resolves them itself
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise FlowerxError(f"--ray: a cluster address is HOST:PORT, ray://HOST:PORT or auto, not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise FlowerxError(f"--ray: nothing answers at {address} ({reason}); is the Ray cluster up?") from None


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray, connected (a local instance when address is empty), with Ray Data's per-run INFO lines quiet."""
    try:
        import ray
        import ray.data  # its loggers exist once imported
    except ModuleNotFoundError:
        raise FlowerxError('--ray needs Ray: pip install "flowerx[ray]"') from None
    started = not ray.is_initialized()
    if started:
        # No address: RAY_ADDRESS, as Ray reads it, else a new local instance, never a cluster Ray's state files
        # name (one that is gone, e.g. after a `ray start` that was killed, would be retried for minutes).
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        check_reachable(address)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    quiet = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("ray.data")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.WARNING)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # results in listed order
        yield ray
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
        if started:
            ray.shutdown()


def _actors(ray, requested: int | None) -> int:
    return requested or max(1, int(ray.available_resources().get("CPU", os.cpu_count() or 1)))


@dataclass
class RayPass:
    """What a bottleneck pass on Ray did, from the rows its actors returned (a block that Ray reran after a
    node went away counts once, as its last run saw it)."""

    nodes: Counter = field(default_factory=Counter)  # images per Ray node id
    statuses: Counter = field(default_factory=Counter)  # images per compute_batch status: cached, computed, ...
    keys: list = field(default_factory=list)  # each image's cache key, in the order given (None: it failed)
    start_s: float = 0.0  # seconds to start (or connect to) Ray: a fixed cost, whatever the image count
    stop_s: float = 0.0  # seconds to stop it (or disconnect), the other fixed cost


def _pool(ray, requested: int | None):
    """Up to one actor per CPU (or `requested`), and never fewer than one: a node that goes away takes its
    actors with it, Ray reruns their unfinished blocks, and the pass goes on with the actors that are left."""
    actors = _actors(ray, requested)
    return ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors)  # all start at once


def fill_cache(
    items: Sequence,
    cache,
    features_onnx: Path,
    view=None,
    address: str | None = None,
    actors: int | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
    block: int | None = None,
) -> RayPass:
    """Compute the images' missing entries of a bottleneck cache on Ray (`view` as in get_bottlenecks), each
    written atomically by the worker that computed it, into the cache the local pass then reads (so a run
    killed midway resumes from what was written); returns what the actors did (RayPass), with each image's
    key, so the local pass loads the entries without reading the images again. Images that fail are left to
    the local pass, which reports them. A worker first looks at what the others wrote since it
    started (cache.refresh), so a rerun block computes only what is not written yet. block: images per Ray
    task, and so per shard in the sharded form; by default about a quarter of each actor's share, from BATCH
    to SHARD_ROWS // 4 (fewer, larger blocks leave actors idle at the end: measured 36 s against 23 s for
    3136 photos on 2 actors with blocks of 1024 against 392)."""
    from .bottlenecks import SHARD_ROWS, compute_batch, stream_session
    from .data import ImageItem
    from .parallel import chunked

    form, root, arch, weights_id = type(cache), cache.dir.parent, cache.arch, cache.weights_id
    model_path = str(features_onnx)

    class Bottlenecks:  # a Ray Data actor; its settings live in the class, not in the object store
        def __init__(self):
            import ray

            self.cache = form(root, arch, weights_id)
            self.model = stream_session(model_path)
            self.node = ray.get_runtime_context().get_node_id()

        def __call__(self, batch: dict) -> dict:
            self.cache.refresh()
            chosen = [ImageItem(Path(str(p)), str(r), 0) for p, r in zip(batch["path"], batch["relpath"])]
            status, keys = [], []
            for part in chunked(range(len(chosen)), BATCH):
                for s, _, key in compute_batch([chosen[i] for i in part], self.cache, lambda: self.model, view):
                    status.append(s)
                    keys.append(key or "")
            self.cache.flush()
            return {"status": status, "key": keys, "node": [self.node] * len(status)}

    rows = [{"path": str(item.path), "relpath": item.relpath} for item in items]
    started = time.perf_counter()
    with ray_session(address) as ray:
        done = RayPass(start_s=time.perf_counter() - started)
        block = block or max(BATCH, min(SHARD_ROWS // 4, -(-len(rows) // (4 * _actors(ray, actors)))))
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // block)))
        dataset = dataset.map_batches(Bottlenecks, batch_size=block, compute=_pool(ray, actors), num_cpus=1)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            done.nodes.update(str(n) for n in batch["node"])
            done.statuses.update(str(s) for s in batch["status"])
            done.keys.extend(str(k) or None for k in batch["key"])
            on_progress(len(batch["node"]))
        stopping = time.perf_counter()
    done.stop_s = time.perf_counter() - stopping
    return done


def classify_rows(
    graph: Path, paths: list[str], top_k: int, address: str | None, actors: int | None, rows_of: Callable
) -> Iterator[list[dict]]:
    """Batches of rows (dicts: path, labels, scores, error) for the paths, in order, from actors that each hold
    one Predictor; rows_of(predictor, paths, top_k) makes a batch's rows (objects with those attributes)."""
    graph_path = str(graph)

    class Classifier:  # a Ray Data actor; its settings live in the class, not in the object store
        def __init__(self):
            from .predictor import Predictor

            self.predictor = Predictor(graph_path, threads=1)

        def __call__(self, batch: dict) -> dict:
            rows = rows_of(self.predictor, [str(p) for p in batch["path"]], top_k)
            return {
                "path": [r.path for r in rows],
                "labels": [json.dumps(r.labels) for r in rows],  # one column type whatever a row holds
                "scores": [json.dumps(r.scores) for r in rows],
                "error": [r.error or "" for r in rows],
            }

    with ray_session(address) as ray:
        dataset = ray.data.from_items([{"path": p} for p in paths]).map_batches(
            Classifier, batch_size=BATCH, compute=_pool(ray, actors), num_cpus=1
        )
        for batch in dataset.iter_batches(batch_size=BATCH, batch_format="numpy"):
            yield [
                {
                    "path": str(p),
                    "labels": json.loads(str(lab)),
                    "scores": json.loads(str(sc)),
                    "error": str(err) or None,
                }
                for p, lab, sc, err in zip(batch["path"], batch["labels"], batch["scores"], batch["error"])
            ]
