import numpy as np
import pytest
from conftest import make_image

from flowerx.architectures import Architecture
from flowerx.bottlenecks import BottleneckCache, get_bottlenecks
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


def run(dataset, cache, net, **kw):
    built = []

    def make():
        built.append(1)
        return net

    features, ok, stats = get_bottlenecks(dataset.items, cache, make, batch_size=3, **kw)
    return features, ok, stats, bool(built)


def test_cold_then_warm(dataset, tmp_path):
    cache, net = BottleneckCache(tmp_path / "cache", ARCH), FakeNet()
    cold, ok, stats, built = run(dataset, cache, net)
    assert stats.computed == 10 and stats.cached == 0 and ok.all() and built and net.images == 10
    warm, ok, stats, built = run(dataset, cache, FakeNet())
    assert stats.cached == 10 and stats.computed == 0 and not built  # the network is not even built
    np.testing.assert_array_equal(cold, warm)
    assert not np.allclose(cold[0], cold[1])


def test_changed_image_is_recomputed_moved_one_is_not(dataset, tmp_path):
    cache = BottleneckCache(tmp_path / "cache", ARCH)
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


def test_unreadable_images_are_skipped_and_reported(dataset, tmp_path):
    dataset.items[3].path.write_bytes(b"not an image")
    warnings = []
    _, ok, stats, _ = run(dataset, BottleneckCache(tmp_path / "cache", ARCH), FakeNet(), on_warning=warnings.append)
    assert ok.sum() == 9 and not ok[3]
    assert stats.failed == [(dataset.items[3].relpath, "not an image (unrecognised format)")]
    assert len(warnings) == 1 and dataset.items[3].relpath in warnings[0]


def test_interrupted_run_keeps_what_it_wrote(dataset, tmp_path):
    cache = BottleneckCache(tmp_path / "cache", ARCH)

    class Dies(FakeNet):
        def __call__(self, batch):
            if self.images >= 6:
                raise KeyboardInterrupt
            return super().__call__(batch)

    with pytest.raises(KeyboardInterrupt):
        run(dataset, cache, Dies(), workers=1)
    assert len(list(cache.dir.rglob("*.npy"))) == 6 and not list(cache.dir.rglob("*.tmp"))
    _, _, stats, _ = run(dataset, cache, FakeNet())
    assert stats.cached == 6 and stats.computed == 4


def test_cache_keys_cannot_escape_the_cache_dir(tmp_path):
    cache = BottleneckCache(tmp_path, ARCH)
    with pytest.raises(ValueError):
        cache.path("../../etc/passwd")


def test_distorted_views_are_cached_per_setting_and_view(dataset, tmp_path):
    from flowerx.data import Distortion

    cache = BottleneckCache(tmp_path / "cache", ARCH)
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
