"""Bad inputs, faults, load and security: what users do to flowerx, and what they get back.
tests/README.md lists every case with its expected outcome."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, small_train_args, solid, subset, write_tiny_model
from corpus import make_corpus
from PIL import Image

from flowerx import FlowerxError, ImageError, Predictor, fileio
from flowerx.architectures import Architecture
from flowerx.bottlenecks import BottleneckCache, get_bottlenecks
from flowerx.data import discover, open_image, prepare_image

ROOT = os.geteuid() == 0


# --- Bad inputs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, make_corpus(folder)


def test_every_corpus_file_decodes_or_gives_its_reason(corpus):
    folder, expected = corpus
    for name, outcome in expected.items():
        if outcome == "ok":
            array = prepare_image(folder / name, 32)
            assert array.shape == (32, 32, 3) and array.dtype == np.uint8, name
        else:
            with pytest.raises(ImageError) as info:
                prepare_image(folder / name, 32)
            assert info.value.reason.startswith(outcome), (name, info.value.reason)
            assert isinstance(info.value, ValueError)


def test_exif_rotation_is_upright_for_training_and_inference(corpus):
    folder, _ = corpus
    assert open_image(folder / "exif-rotated.jpg").size == (20, 40)  # stored 40x20, shown 20x40
    # Training and the Predictor decode through the same function: same pixels for the same bytes.
    model = write_tiny_model(folder.parent / "tiny.onnx")
    np.testing.assert_array_equal(
        Predictor(model).preprocess(folder / "exif-rotated.jpg"), prepare_image(folder / "exif-rotated.jpg", 8)
    )


def test_unreadable_file(tmp_path, monkeypatch):
    path = solid(tmp_path / "locked.png", (1, 2, 3))
    if not ROOT:
        path.chmod(0)
    else:  # root reads any file: make the read fail the way a permission error does
        from flowerx import data

        monkeypatch.setattr(data, "read_regular", lambda *a: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(ImageError, match="permission denied"):
        prepare_image(path, 8)


def test_classify_reports_each_bad_file_and_classifies_the_rest(corpus):
    folder, expected = corpus
    model = write_tiny_model(folder.parent / "tiny2.onnx")
    result = run_cli("classify", str(folder), "--graph", str(model), "--top-k", "1", "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    import json

    report = {Path(r["image"]).name: r for r in json.loads(result.stdout)["results"]}
    for name, outcome in expected.items():
        if outcome == "ok":
            assert report[name]["predictions"][0]["label"] in ("red", "green", "blue"), name
        else:
            assert outcome in report[name]["error"], name
            assert f"{name}: {outcome}" in result.stderr
    bad = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(bad) == sum(outcome != "ok" for outcome in expected.values())  # one line per failed file


def test_leading_dash_file_name_at_the_cli(corpus):
    folder, _ = corpus
    model = write_tiny_model(folder.parent / "tiny3.onnx")
    result = run_cli("classify", "--graph", str(model), "--", str(folder / "-leading-dash.jpg"))
    assert result.returncode == 0, result.stderr


FAKE = Architecture("fake_8", "mobilenet_v1", input_size=8, feature_dim=3, alpha=1.0)


def fake_net():
    return lambda batch: batch.reshape(len(batch), -1, 3).mean(1).astype(np.float32)


def test_training_pass_skips_bad_files_with_one_warning_each(corpus, tmp_path):
    folder, expected = corpus
    data = tmp_path / "data"
    (data / "weird").mkdir(parents=True)
    for name in expected:
        target = data / "weird" / name
        source = folder / name
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            target.write_bytes(source.read_bytes())
    (data / "plain").mkdir()
    solid(data / "plain" / "a.png", (1, 2, 3))
    dataset = discover(data)
    warnings: list[str] = []
    _, ok, stats = get_bottlenecks(
        dataset.items, BottleneckCache(tmp_path / "cache", FAKE), fake_net, on_warning=warnings.append
    )
    failed = {Path(relpath).name for relpath, _ in stats.failed}
    assert failed == {name for name, outcome in expected.items() if outcome != "ok"}
    assert len(warnings) == len(failed) and ok.sum() == len(dataset.items) - len(failed)
    cache_files = list((tmp_path / "cache").rglob("*"))
    assert cache_files and all(tmp_path / "cache" in p.parents for p in cache_files)  # never escapes


def test_single_image_class_and_one_class(tmp_path):
    for label, count in (("many", 6), ("single", 1)):
        (tmp_path / label).mkdir()
        for i in range(count):
            solid(tmp_path / label / f"{i}.png", (i * 30, 10, 10))
    assert discover(tmp_path).labels == ["many", "single"]
    (tmp_path / "single" / "0.png").unlink()
    with pytest.raises(FlowerxError, match="at least two class folders"):
        discover(tmp_path)


# --- Faults -----------------------------------------------------------------------------------------


def _kill_when(proc: subprocess.Popen, ready, sig: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the point to interrupt"
        time.sleep(0.02)
    proc.send_signal(sig)


def _entries(root: Path) -> list[Path]:
    return list(root.rglob("*.npy"))


def _train_args(shared: Path, data: Path, work: Path, steps: str = "20") -> list[str]:
    return [
        *small_train_args(shared, data, work, steps=steps),
        "--bottleneck-batch-size",
        "8",
    ]


def _popen(args: list[str]) -> subprocess.Popen:
    """flowerx as a foreground process: SIGINT at its default even when the suite itself runs in the
    background (a shell starts background jobs with SIGINT ignored, and Python then never raises
    KeyboardInterrupt, so the Ctrl-C case would test nothing)."""
    return subprocess.Popen(
        [sys.executable, "-m", "flowerx", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, COLUMNS="200"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_interrupted_bottleneck_pass_resumes(shared, tmp_path, sig):
    data = subset(shared, tmp_path / "data", per_class=150)  # 450 photos: the whole set made this 4 minutes
    proc = _popen(_train_args(shared, data, tmp_path))
    _kill_when(proc, lambda: len(_entries(tmp_path / "bn")) >= 150, sig)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    stopped_after = time.monotonic() - sent
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Traceback" not in stderr
        assert [line for line in stderr.splitlines() if line.strip()][-1].startswith("interrupted")
        assert stopped_after < 5  # measured well under a second; generous for a loaded CI machine
    else:
        assert proc.returncode == -signal.SIGKILL
    entries = _entries(tmp_path / "bn")
    for entry in entries:  # every entry written before the interruption is whole
        assert np.load(entry, allow_pickle=False).shape == (256,)
    rerun = run_cli(*_train_args(shared, data, tmp_path))
    assert rerun.returncode == 0, rerun.stderr
    cached, computed = map(int, re.search(r"(\d+) cached, (\d+) computed", rerun.stdout).groups())
    assert cached >= len(entries) and computed > 0 and cached + computed == 450 and "damaged" not in rerun.stdout
    assert not list((tmp_path / "bn").rglob("*.tmp")) or sig == signal.SIGKILL


KILL_AT = """
import os, signal, sys
from flowerx import fileio
where = sys.argv[2]
real_write = os.write
if where == "before-rename":
    fileio.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
else:  # mid-write: after the first chunk reaches the file
    def write(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        os.kill(os.getpid(), signal.SIGKILL)
    fileio.os.write = write
fileio.atomic_write(sys.argv[1], b"new model " * 100000)
"""


@pytest.mark.parametrize("where", ["before-rename", "mid-write"])
def test_kill_during_model_write_keeps_the_previous_model(tmp_path, where):
    model = write_tiny_model(tmp_path / "model.onnx")
    before = model.read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(model), where], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert model.read_bytes() == before and Predictor(model).labels == ["red", "green", "blue"]
    users = [tmp_path / ".model.onnx.mine.tmp", tmp_path / ".model.onnx.1.tmp"]  # a user's, not atomic_write's
    for path in users:
        path.write_text("precious")
    fileio.atomic_write(model, before)  # the next successful write sweeps the killed run's temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", *(p.name for p in users)])


def test_damaged_cache_entries_are_recomputed_and_reported(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(4):
            solid(tmp_path / "img" / label / f"{i}.png", (i * 40, 90 if label == "a" else 10, 5))
    dataset, cache = discover(tmp_path / "img"), BottleneckCache(tmp_path / "cache", FAKE)
    good, *_ = get_bottlenecks(dataset.items, cache, fake_net)
    entries = sorted(cache.dir.rglob("*.npy"))
    entries[0].write_bytes(entries[0].read_bytes()[:30])  # truncated
    entries[1].write_bytes(os.urandom(200))  # garbage
    np.save(entries[2], np.array([np.nan, 1, 2], np.float32))  # wrong values
    np.save(entries[3], np.zeros(7, np.float32))  # wrong shape
    warnings: list[str] = []
    features, ok, stats = get_bottlenecks(dataset.items, cache, fake_net, on_warning=warnings.append)
    assert stats.corrupt == 4 and stats.computed == 4 and ok.all() and len(warnings) == 4
    np.testing.assert_array_equal(features, good)


def test_pickled_cache_entry_is_never_unpickled(tmp_path):
    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "img" / "b").mkdir(parents=True)
    solid(tmp_path / "img" / "a" / "1.png", (200, 0, 0))
    solid(tmp_path / "img" / "b" / "1.png", (0, 200, 0))
    dataset, cache = discover(tmp_path / "img"), BottleneckCache(tmp_path / "cache", FAKE)
    get_bottlenecks(dataset.items, cache, fake_net)
    entry = sorted(cache.dir.rglob("*.npy"))[0]
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (canary.write_text, ("unpickled!",))

    np.save(entry, np.array([Evil()], dtype=object), allow_pickle=True)
    _, ok, stats = get_bottlenecks(dataset.items, cache, fake_net)
    assert stats.corrupt == 1 and ok.all() and not canary.exists()


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 256 KiB filesystem (tmpfs), to fill up or make read-only. Needs root to mount."""
    mount = tmp_path / "fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_leaves_the_old_file_and_no_partial_one(tiny_fs):
    target = tiny_fs / "model.onnx"
    fileio.atomic_write(target, b"old model")
    with pytest.raises(FlowerxError, match="No space left on device"):
        fileio.atomic_write(target, b"x" * (2 << 20))
    assert target.read_bytes() == b"old model" and [p.name for p in tiny_fs.iterdir()] == ["model.onnx"]


def test_read_only_output_folder(tiny_fs):
    fileio.atomic_write(tiny_fs / "model.onnx", b"old model")
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(FlowerxError, match="Read-only file system"):
        fileio.atomic_write(tiny_fs / "model.onnx", b"new")
    assert (tiny_fs / "model.onnx").read_bytes() == b"old model"


def test_write_errors_become_one_line_errors(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted, the same errors injected at the system call."""
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "write", full)
    with pytest.raises(FlowerxError, match=r"cannot write .*model.onnx: No space left on device"):
        fileio.atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.slow
def test_cli_train_out_of_space_and_read_only(shared, tiny_fs, tmp_path):
    data = subset(shared, tmp_path / "data", per_class=6)
    args = _train_args(shared, data, tmp_path)
    # the cache on a 256 KiB disk, filled but for 4 KiB (the network's export lives in the user cache now)
    free = os.statvfs(tiny_fs).f_bavail * os.statvfs(tiny_fs).f_frsize
    (tiny_fs / "filler").write_bytes(b"\0" * max(0, free - 4096))
    full = run_cli(*[str(tiny_fs) if a == str(tmp_path / "bn") else a for a in args])
    assert full.returncode == 2 and "Traceback" not in full.stderr
    assert re.fullmatch(r"error: cannot write .*: No space left on device\n", full.stderr), full.stderr
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    out = [str(tiny_fs / "model.onnx") if a == str(tmp_path / "model.onnx") else a for a in args]
    read_only = run_cli(*out)
    assert read_only.returncode == 2 and "Traceback" not in read_only.stderr
    assert re.fullmatch(r"error: cannot write .*model.onnx: Read-only file system\n", read_only.stderr), (
        read_only.stderr
    )
    left = [p for p in tiny_fs.rglob("*") if p.is_file() and p.name != "filler"]
    assert all(p.suffix == ".npy" and np.load(p).shape == (256,) for p in left), left  # whole entries, no temp files


# --- Load and concurrency ---------------------------------------------------------------------------


def test_one_predictor_eight_threads_2000_predictions(tmp_path):
    predictor = Predictor(write_tiny_model(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8) for _ in range(50)]
    serial = [predictor.predict(image) for image in images]
    mismatches, errors = [], []

    def worker(t: int) -> None:
        try:
            for n in range(250):
                k = (t * 7 + n) % len(images)
                if predictor.predict(images[k]) != serial[k]:
                    mismatches.append(k)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches


def _rss_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@pytest.mark.slow
def test_soak_20000_predictions_memory_stops_growing(tmp_path):
    predictor = Predictor(write_tiny_model(tmp_path / "m.onnx"))
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    jpeg = tmp_path / "x.jpg"
    Image.fromarray(image).save(jpeg)
    samples = []
    for i in range(20_000):
        predictor.predict(jpeg if i % 2 else image)
        if i % 1000 == 999:
            samples.append(_rss_kb())
    quarter = samples[len(samples) * 3 // 4 - 1]
    assert samples[-1] <= quarter * 1.05, samples


# --- Security ---------------------------------------------------------------------------------------


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    import io

    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_flowers_download_unpacks_all_or_nothing_and_refuses_escapes(tmp_path, monkeypatch):
    from flowerx import data

    good = _tar(tmp_path / "good.tgz", {"flower_photos/LICENSE.txt": b"CC-BY", "flower_photos/daisy/1.jpg": b"j"})
    evil = _tar(tmp_path / "evil.tgz", {"flower_photos/a.txt": b"a", "../../escaped.txt": b"owned"})
    served = {}
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: open(served["file"], "rb"))

    served["file"] = evil
    with pytest.raises(FlowerxError, match="unsafe archive member"):
        data.download_flowers(tmp_path / "dest")
    assert not (tmp_path / "dest" / "flower_photos").exists() and not (tmp_path / "escaped.txt").exists()
    assert list((tmp_path / "dest").iterdir()) == []  # no archive, no half-unpacked folder

    served["file"] = good
    folder = data.download_flowers(tmp_path / "dest")
    assert (folder / "daisy" / "1.jpg").read_bytes() == b"j" and (folder / "LICENSE.txt").exists()
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["flower_photos"]


def test_download_flowers_offline_is_one_line(tmp_path, monkeypatch):
    result = run_cli("download-flowers", "--dest", str(tmp_path))
    if result.returncode == 0:  # a machine with internet really downloads: then it must be there
        assert (tmp_path / "flower_photos" / "LICENSE.txt").exists()
    else:
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error: cannot download https://")
