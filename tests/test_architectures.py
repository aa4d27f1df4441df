import io
import urllib.error
import urllib.request

import pytest

from flowerx import architectures as A
from flowerx import fileio
from flowerx.errors import FlowerxError


def test_grid_has_16_mobilenets_and_inception():
    names = set(A.ARCHITECTURES)
    assert len([n for n in names if n.startswith("mobilenet_")]) == 16
    assert "inception_v3" in names and "mobilenet_0.50_224" in names


@pytest.mark.parametrize(
    "name,expected",
    [
        ("mobilenet_0.5_224", "mobilenet_0.50_224"),
        ("MobileNet_1_128", "mobilenet_1.0_128"),
        ("mobilenet_0.25_160", "mobilenet_0.25_160"),
        ("inception_v3", "inception_v3"),
    ],
)
def test_name_spellings(name, expected):
    assert A.get_architecture(name).name == expected


def test_unknown_architecture_suggests_closest():
    with pytest.raises(FlowerxError, match="did you mean mobilenet_0.75_224"):
        A.get_architecture("mobilenet_0.75_225")


def test_weights_file_names_are_the_ones_keras_downloads():
    assert A.get_architecture("mobilenet_0.25_224").weights_file == "mobilenet_2_5_224_tf_no_top.h5"
    assert A.get_architecture("mobilenet_0.50_160").weights_file == "mobilenet_5_0_160_tf_no_top.h5"
    assert A.get_architecture("mobilenet_1.0_224").weights_url.startswith("https://storage.googleapis.com/")
    assert A.get_architecture("inception_v3").input_size == 299


def test_missing_weights_offline_names_what_is_present(tmp_path, monkeypatch):
    (tmp_path / "mobilenet_2_5_224_tf_no_top.h5").write_bytes(b"x")

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert A.resolve_weights(A.get_architecture("mobilenet_0.25_224"), tmp_path).name.startswith("mobilenet_2_5")
    with pytest.raises(FlowerxError, match="weights present there: mobilenet_0.25_224"):
        A.resolve_weights(A.get_architecture("mobilenet_1.0_224"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mobilenet_2_5_224_tf_no_top.h5"]  # no partial file


def test_download_checks_hash_before_moving_into_place(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"tampered"))
    dest = tmp_path / "w.h5"
    with pytest.raises(FlowerxError, match="corrupt"):
        fileio.download("https://example.invalid/w.h5", dest, "0" * 64)
    assert list(tmp_path.iterdir()) == []
    fileio.download("https://example.invalid/w.h5", dest, __import__("hashlib").sha256(b"tampered").hexdigest())
    assert dest.read_bytes() == b"tampered"
    with pytest.raises(FlowerxError, match="plain HTTP"):
        fileio.download("http://example.invalid/w.h5", dest)


def test_download_says_which_side_failed(tmp_path, monkeypatch):
    """A folder that cannot be written is this machine's problem, not the network's: no "offline?" there."""
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"weights"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FlowerxError, match="cannot download into .*file") as e:
        fileio.download("https://example.invalid/w.h5", tmp_path / "file" / "w.h5")
    assert "offline" not in str(e.value)
    with pytest.raises(FlowerxError, match=r"no weights for mobilenet_1.0_224 .*cannot download into") as e:
        A.resolve_weights(A.get_architecture("mobilenet_1.0_224"), tmp_path / "file")
    assert "offline" not in str(e.value)

    class CutOff(io.BytesIO):
        def read(self, n=-1):
            raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: CutOff())
    with pytest.raises(FlowerxError, match="was cut off: connection reset"):
        fileio.download("https://example.invalid/w.h5", tmp_path / "w.h5")
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # no partial file left


def test_download_offline_says_so(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FlowerxError, match=r"cannot download https://example.invalid/w.h5 \(offline\? no network\)"):
        fileio.download("https://example.invalid/w.h5", tmp_path / "w.h5")
    assert list(tmp_path.iterdir()) == []


def test_download_names_the_server_answer_and_a_full_disk(tmp_path, monkeypatch):
    import errno

    def not_found(url, timeout):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", not_found)
    with pytest.raises(FlowerxError, match="the server answered 404 Not Found") as e:
        fileio.download("https://example.invalid/w.h5", tmp_path / "w.h5")
    assert "offline" not in str(e.value)

    class BadLength(io.BytesIO):
        headers = {"Content-Length": "lots"}

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: BadLength(b"weights"))
    assert fileio.download("https://example.invalid/w.h5", tmp_path / "w.h5").read_bytes() == b"weights"
    (tmp_path / "w.h5").unlink()

    real_fdopen = fileio.os.fdopen

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: Full(fd, "wb"))
    with pytest.raises(FlowerxError, match=r"cannot write .*w.h5: No space left on device"):
        fileio.download("https://example.invalid/w.h5", tmp_path / "w.h5")
    monkeypatch.setattr(fileio.os, "fdopen", real_fdopen)
    assert list(tmp_path.iterdir()) == []  # no partial file left
