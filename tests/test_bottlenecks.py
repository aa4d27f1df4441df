import numpy as np
import pytest
from conftest import make_image

from flowerx import bottlenecks
from flowerx.architectures import Architecture
from flowerx.bottlenecks import BottleneckCache, ShardedCache, get_bottlenecks, open_cache
from flowerx.data import discover

ARCH = Architecture("fake_16", "mobilenet_v1", input_size=16, feature_dim=3, alpha=1.0)


class FakeNet:
    """Features = per-channel mean of the uint8 input: deterministic and image-dependent."""

    def __init__(self):
        self.images = 0

    def __call__(self, batch):
        self.images += len(batch)
        return batch.reshape(len(batch), -1, 3).mean(1).astype(np.float32)


@pytest.fixture
def dataset(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(5):
            make_image(tmp_path / "img" / label / f"{i}.png", fmt="PNG", seed=i + 10 * (label == "b"))
    return discover(tmp_path / "img")


@pytest.fixture(params=[BottleneckCache, ShardedCache], ids=["files", "shards"])
def form(request):
    """Each test that takes it runs on both forms of the cache: the same entries, the same behaviour."""
    return request.param


def run(dataset, cache, net, **kw):
    built = []

    def make():
        built.append(1)
        return net

    features, ok, stats = get_bottlenecks(dataset.items, cache, make, batch_size=3, **kw)
    return features, ok, stats, bool(built)


def test_cold_then_warm(dataset, tmp_path, form):
    cache, net = form(tmp_path / "cache", ARCH), FakeNet()
    cold, ok, stats, built = run(dataset, cache, net)
    assert stats.computed == 10 and stats.cached == 0 and ok.all() and built and net.images == 10
    warm, ok, stats, built = run(dataset, cache, FakeNet())
    assert stats.cached == 10 and stats.computed == 0 and not built  # the network is not even built
    np.testing.assert_array_equal(cold, warm)
    assert not np.allclose(cold[0], cold[1])


def test_changed_image_is_recomputed_moved_one_is_not(dataset, tmp_path, form):
    cache = form(tmp_path / "cache", ARCH)
    run(dataset, cache, FakeNet())
    make_image(dataset.items[0].path, fmt="PNG", seed=99)  # new content, same name
    _, _, stats, _ = run(dataset, cache, FakeNet())
    assert stats.computed == 1 and stats.cached == 9
    (dataset.root / "a").rename(dataset.root / "c")  # moved: same bytes, same entries
    moved = discover(dataset.root)
    _, _, stats, _ = run(moved, cache, FakeNet())
    assert stats.computed == 0


def test_damaged_entries_are_detected_and_recomputed(dataset, tmp_path):
    cache = BottleneckCache(tmp_path / "cache", ARCH)
    good, *_ = run(dataset, cache, FakeNet())
    entries = sorted(cache.dir.rglob("*.npy"))
    assert len(entries) == 10 and all(".." not in str(p) for p in entries)
    entries[0].write_bytes(entries[0].read_bytes()[:20])  # truncated
    entries[1].write_bytes(b"garbage" * 10)
    features, ok, stats, _ = run(dataset, cache, FakeNet())
    assert stats.corrupt == 2 and stats.computed == 2 and ok.all()
    np.testing.assert_array_equal(features, good)


def test_unreadable_images_are_skipped_and_reported(dataset, tmp_path, form):
    dataset.items[3].path.write_bytes(b"not an image")
    warnings = []
    _, ok, stats, _ = run(dataset, form(tmp_path / "cache", ARCH), FakeNet(), on_warning=warnings.append)
    assert ok.sum() == 9 and not ok[3]
    assert stats.failed == [(dataset.items[3].relpath, "not an image (unrecognised format)")]
    assert len(warnings) == 1 and dataset.items[3].relpath in warnings[0]


def test_interrupted_run_keeps_what_it_wrote(dataset, tmp_path, form):
    """Ctrl-C midway: what was computed is on disk (the sharded form writes its pending rows on the way out)."""
    cache = form(tmp_path / "cache", ARCH)

    class Dies(FakeNet):
        def __call__(self, batch):
            if self.images >= 6:
                raise KeyboardInterrupt
            return super().__call__(batch)

    with pytest.raises(KeyboardInterrupt):
        run(dataset, cache, Dies(), workers=1)
    if form is BottleneckCache:
        assert len(list(cache.dir.rglob("*.npy"))) == 6
    assert not list(cache.dir.rglob("*.tmp")) and not list(cache.dir.rglob(".*"))
    _, _, stats, _ = run(dataset, form(tmp_path / "cache", ARCH), FakeNet())  # a new process
    assert stats.cached == 6 and stats.computed == 4


def test_cache_keys_cannot_escape_the_cache_dir(tmp_path):
    cache = BottleneckCache(tmp_path, ARCH)
    with pytest.raises(ValueError):
        cache.path("../../etc/passwd")


def test_distorted_views_are_cached_per_setting_and_view(dataset, tmp_path, form):
    from flowerx.data import Distortion

    cache = form(tmp_path / "cache", ARCH)
    plain, *_ = run(dataset, cache, FakeNet())
    flip = Distortion(flip_left_right=True, random_crop=20, random_brightness=30)
    one, ok, stats, built = run(dataset, cache, FakeNet(), view=(flip, 1))
    assert stats.computed == 10 and ok.all() and built
    assert not np.allclose(one, plain)  # a view is not the plain image
    again, _, stats, built = run(dataset, cache, FakeNet(), view=(flip, 1))
    assert stats.cached == 10 and not built and np.array_equal(again, one)  # same view, from the cache
    _, _, stats, _ = run(dataset, cache, FakeNet(), view=(flip, 2))
    assert stats.computed == 10  # another view index: new views
    other = Distortion(flip_left_right=True, random_crop=20, random_brightness=31)
    _, _, stats, _ = run(dataset, cache, FakeNet(), view=(other, 1))
    assert stats.computed == 10  # other settings: new views


def test_distortion_is_deterministic_and_bounded():
    from PIL import Image

    from flowerx.data import Distortion

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    d = Distortion(flip_left_right=True, random_crop=10, random_scale=20, random_brightness=10)
    assert np.array_equal(d.apply(image, 16, seed=3), d.apply(image, 16, seed=3))
    assert not np.array_equal(d.apply(image, 16, seed=3), d.apply(image, 16, seed=4))
    assert d.apply(image, 16, seed=3).shape == (16, 16, 3) and d.active and not Distortion().active


@pytest.mark.slow
def test_the_feature_export_is_made_once_per_machine_and_weights(shared, tmp_path, monkeypatch):
    """Issue 14: a new --bottleneck-dir reuses the machine's export of the network; other weights get their own."""
    import shutil

    from conftest import run_cli, small_train_args, subset

    monkeypatch.setenv("FLOWERX_CACHE_DIR", str(tmp_path / "user-cache"))
    data = subset(shared, tmp_path / "data", 4)
    first = run_cli(*small_train_args(shared, data, tmp_path / "one", steps="20"))
    assert first.returncode == 0, first.stderr
    (export,) = (tmp_path / "user-cache" / "features").iterdir()
    stamp = export.stat().st_mtime_ns
    second = run_cli(*small_train_args(shared, data, tmp_path / "two", steps="20"))  # a new bottleneck dir
    assert second.returncode == 0, second.stderr
    assert list((tmp_path / "user-cache" / "features").iterdir()) == [export] and export.stat().st_mtime_ns == stamp
    other = tmp_path / "other-weights"
    other.mkdir()
    weights = "mobilenet_2_5_224_tf_no_top.h5"
    shutil.copy(shared / "models" / weights, other / weights)
    with open(other / weights, "ab") as f:  # other bytes, the same network: HDF5 ignores what follows its data
        f.write(b"\0" * 1024)
    args = small_train_args(shared, data, tmp_path / "three", steps="20")
    args[args.index("--model-dir") + 1] = str(other)
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    assert len(list((tmp_path / "user-cache" / "features").iterdir())) == 2


def test_shards_hold_many_rows_each_and_a_new_process_finds_them(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(bottlenecks, "SHARD_ROWS", 4)
    cache = ShardedCache(tmp_path / "cache", ARCH)
    cold, *_ = run(dataset, cache, FakeNet())
    shards = sorted(p.name for p in cache.dir.iterdir())
    assert len(shards) == 3 and all(ShardedCache.NAME.fullmatch(n) for n in shards)  # 4 + 4 + the last 2
    again = ShardedCache(tmp_path / "cache", ARCH)  # another process: only the files on disk
    warm, ok, stats, built = run(dataset, again, FakeNet())
    assert stats.cached == 10 and not built and np.array_equal(warm, cold)
    assert not (tmp_path / "cache" / BottleneckCache(tmp_path / "cache", ARCH).dir.name).exists()


def test_a_worker_sees_the_shards_others_wrote_since_it_started(dataset, tmp_path):
    mine, theirs = ShardedCache(tmp_path / "cache", ARCH), ShardedCache(tmp_path / "cache", ARCH)
    run(dataset, theirs, FakeNet())
    net = FakeNet()
    _, _, stats, _ = run(dataset, mine, net)  # get_bottlenecks refreshes first
    assert stats.cached == 10 and net.images == 0


def test_a_damaged_shard_is_set_aside_and_its_rows_recomputed(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(bottlenecks, "SHARD_ROWS", 5)
    good, *_ = run(dataset, ShardedCache(tmp_path / "cache", ARCH), FakeNet())
    first, second = sorted(ShardedCache(tmp_path / "cache", ARCH).dir.iterdir())
    with np.load(first) as shard:
        rows = shard["features"].tobytes()
    data = bytearray(first.read_bytes())
    data[data.index(rows) + 5] ^= 0x01  # one flipped bit in the features (the keys read fine): a CRC-32 mismatch
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:100])  # truncated
    warnings: list[str] = []
    features, ok, stats, _ = run(dataset, ShardedCache(tmp_path / "cache", ARCH), FakeNet(), on_warning=warnings.append)
    assert ok.all() and stats.computed == 10 and np.array_equal(features, good)
    assert sum("damaged" in w for w in warnings) == 2
    names = sorted(p.name for p in first.parent.iterdir())
    assert {first.name + ".damaged", second.name + ".damaged"} <= set(names)  # kept, not deleted, not read again
    _, _, stats, _ = run(dataset, ShardedCache(tmp_path / "cache", ARCH), FakeNet())
    assert stats.cached == 10


def test_a_shard_that_would_unpickle_is_refused(dataset, tmp_path):
    cache = ShardedCache(tmp_path / "cache", ARCH)
    run(dataset, cache, FakeNet())
    (shard,) = cache.dir.iterdir()
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (canary.write_text, ("unpickled!",))

    with np.load(shard) as data:
        keys = data["keys"]
    np.savez(shard, keys=keys, features=np.array([Evil()] * len(keys), dtype=object))
    _, ok, stats, _ = run(dataset, ShardedCache(tmp_path / "cache", ARCH), FakeNet())
    assert ok.all() and stats.corrupt == 1 and stats.computed == 10 and not canary.exists()


def test_auto_picks_what_the_folder_holds_else_shards_for_many_images(tmp_path, dataset):
    root = tmp_path / "cache"
    assert not open_cache(root, ARCH, "w", 10).sharded
    assert open_cache(root, ARCH, "w", bottlenecks.SHARD_THRESHOLD).sharded
    run(dataset, open_cache(root, ARCH, "w", 10, "shards"), FakeNet())
    assert open_cache(root, ARCH, "w", 10).sharded  # the folder holds shards: keep using them
    run(dataset, open_cache(root, ARCH, "x", 10**6, "files"), FakeNet())
    assert not open_cache(root, ARCH, "x", 10**6).sharded  # other weights, a files cache there
    with pytest.raises(Exception, match="unknown cache format"):
        open_cache(root, ARCH, "w", 10, "zip")


def test_known_keys_load_entries_without_reading_the_images(dataset, tmp_path, form):
    """After a Ray pass the driver knows each image's key: it loads the entries and reads no image again."""
    cache = form(tmp_path / "cache", ARCH)
    cold, *_ = run(dataset, cache, FakeNet())
    keys = [BottleneckCache.key(item.path.read_bytes()) for item in dataset.items]
    for item in dataset.items[:8]:
        item.path.write_bytes(b"unreadable now")  # only a read of the file would notice
    keys[9] = None  # not known: read and looked up as usual
    features, ok, stats, built = run(dataset, form(tmp_path / "cache", ARCH), FakeNet(), keys=keys)
    assert ok.all() and stats.cached == 10 and not built and np.array_equal(features, cold)
    _, ok, stats, _ = run(dataset, form(tmp_path / "cache", ARCH), FakeNet())
    assert ok.sum() == 2 and len(stats.failed) == 8  # without the keys the files are read
