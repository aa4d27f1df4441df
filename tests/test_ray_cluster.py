"""Issue 15: the bottleneck pass on a Ray cluster of two nodes simulated on this machine (Ray's own
multi-node test cluster: two raylets of one CPU each), with a node killed midway and a driver killed midway.
Real Ray, no mocks; the feature network is a tiny ONNX graph so that decoding large PNGs is the work."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "flowerx[ray]")')

from ray.cluster_utils import Cluster  # noqa: E402

from flowerx.architectures import Architecture  # noqa: E402
from flowerx.bottlenecks import BottleneckCache, ShardedCache, get_bottlenecks, stream_session  # noqa: E402
from flowerx.data import discover  # noqa: E402
from flowerx.onray import fill_cache  # noqa: E402

ARCH = Architecture("fake_8", "mobilenet_v1", input_size=8, feature_dim=3, alpha=1.0)
BLOCK = 8  # images per Ray task: 20 tasks for 160 images


def features_model(path: Path) -> Path:
    """uint8 [N, 8, 8, 3] -> float32 [N, 3]: the mean colour."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["pixels"], ["features"], axes=[1, 2], keepdims=0),
        ],
        "mean_colour",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 8, 8, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("cluster")
    for i in range(160):  # large solid PNGs: tiny files, ~30 ms each to decode, so a pass takes seconds
        folder = root / "img" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (2500, 2500), (i, 255 - i, (7 * i) % 256)).save(folder / f"{i:03d}.png")
    model = features_model(root / "features.onnx")
    items = discover(root / "img").items
    expected, ok, _ = get_bottlenecks(items, BottleneckCache(root / "local", ARCH), lambda: stream_session(model))
    assert ok.all()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield {"root": root, "model": model, "items": items, "expected": expected, "cluster": cluster, "worker": worker}
    finally:
        cluster.shutdown()


def shards_of(cache: ShardedCache) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in cache.dir.glob("shard-*.npz")}


def read_back(items, cache) -> np.ndarray:
    """The cache's features, read by a fresh local pass that must find every one (a network that fails if called)."""

    def no_network():
        raise AssertionError("the local pass found an entry missing")

    features, ok, stats = get_bottlenecks(items, cache, no_network)
    assert ok.all() and stats.cached == len(items)
    return features


def test_two_nodes_share_the_pass_and_a_node_killed_midway_loses_nothing(setup, tmp_path):
    items, cluster, model = setup["items"], setup["cluster"], setup["model"]
    cache = ShardedCache(tmp_path / "cache", ARCH)
    first = fill_cache(items[:80], cache, model, address=cluster.address, block=BLOCK)
    assert len(first.nodes) == 2 and min(first.nodes.values()) >= BLOCK  # both nodes took blocks
    assert first.statuses == {"computed": 80}

    killed: dict[str, int] = {}

    def kill_the_worker_midway():
        while len(shards_of(cache)) < 14:  # the first 80 images' 10 shards, then 4 more
            time.sleep(0.02)
        killed.update(shards_of(cache))
        cluster.remove_node(setup["worker"], allow_graceful=False)

    killer = threading.Thread(target=kill_the_worker_midway, daemon=True)
    killer.start()
    done = fill_cache(items, ShardedCache(tmp_path / "cache", ARCH), model, address=cluster.address, block=BLOCK)
    killer.join(5)
    assert killed, "the pass ended before the node could be killed"
    assert sum(done.statuses.values()) == 160 and done.statuses["cached"] >= 80  # the first run's 80 skipped
    assert len(done.keys) == 160 and None not in done.keys  # each image's key, in order, for the driver
    assert all((cache.dir / n).stat().st_ino == ino for n, ino in killed.items())  # no written shard redone
    rows = [np.load(p)["keys"] for p in cache.dir.glob("shard-*.npz")]
    assert sum(map(len, rows)) == 160 == len({k.tobytes() for r in rows for k in r})  # each image once
    np.testing.assert_allclose(read_back(items, ShardedCache(tmp_path / "cache", ARCH)), setup["expected"], atol=1e-6)


DRIVER = """
import sys
from pathlib import Path
sys.path[:0] = [{tests!r}]
from test_ray_cluster import ARCH, BLOCK
from flowerx.bottlenecks import BottleneckCache
from flowerx.data import discover
from flowerx.onray import fill_cache
fill_cache(discover(Path({img!r})).items, BottleneckCache(Path({cache!r}), ARCH), Path({model!r}),
           address={address!r}, block=BLOCK)
"""


def test_a_driver_killed_midway_resumes_from_what_was_written(setup, tmp_path):
    """The files form this time: one .npy per image, each written by the worker that computed it."""
    items, cluster, model = setup["items"], setup["cluster"], setup["model"]
    cache = BottleneckCache(tmp_path / "cache", ARCH)
    code = DRIVER.format(
        tests=str(Path(__file__).parent),
        img=str(setup["root"] / "img"),
        cache=str(tmp_path / "cache"),
        model=str(model),
        address=cluster.address,
    )
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(cache.dir.rglob("*.npy"))) < 40 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.02)
        assert driver.poll() is None, "the driver ended before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
    finally:
        driver.kill()
    time.sleep(3)  # Ray stops the dead driver's actors
    written = {p.name: p.stat().st_ino for p in cache.dir.rglob("*.npy")}
    assert 40 <= len(written) < 160
    done = fill_cache(items, cache, model, address=cluster.address, block=BLOCK)
    assert done.statuses == {"cached": len(written), "computed": 160 - len(written)}
    assert all(ino == p.stat().st_ino for p in cache.dir.rglob("*.npy") if (ino := written.get(p.name)))
    np.testing.assert_allclose(read_back(items, cache), setup["expected"], atol=1e-6)
