import io
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from flowerx.data import discover, open_image, prepare_image, split_of
from flowerx.errors import FlowerxError, ImageError


def test_split_is_stable_and_follows_percentages():
    names = [f"daisy/img_{i}.jpg" for i in range(5000)]
    splits = [split_of(n, 10, 20) for n in names]
    assert splits == [split_of(n, 10, 20) for n in names]  # deterministic, path-only
    counts = {s: splits.count(s) / len(names) for s in ("train", "validation", "test")}
    assert abs(counts["validation"] - 0.10) < 0.02 and abs(counts["test"] - 0.20) < 0.02
    assert split_of("daisy/a.jpg", 10, 10) in ("train", "validation", "test")


def test_split_ignores_where_the_dataset_lives(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b" / "moved"):
        for label in ("x", "y"):
            for i in range(20):
                make_image((root / label).mkdir(parents=True, exist_ok=True) or root / label / f"{i}.png", fmt="PNG")
    one, two = discover(tmp_path / "a"), discover(tmp_path / "b" / "moved")
    assert [i.relpath for i in one.items] == [i.relpath for i in two.items]
    assert [split_of(i.relpath, 20, 20) for i in one.items] == [split_of(i.relpath, 20, 20) for i in two.items]


def test_discover_labels_sorted_skips_empty_and_needs_two_classes(tmp_path):
    for label in ("b", "a"):
        (tmp_path / label).mkdir()
        make_image(tmp_path / label / "1.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    ds = discover(tmp_path)
    assert ds.labels == ["a", "b"] and ds.skipped_folders == [("empty", "no images in it")] and len(ds.items) == 2
    import shutil

    shutil.rmtree(tmp_path / "b")
    with pytest.raises(FlowerxError, match="at least two class folders"):
        discover(tmp_path)
    with pytest.raises(FlowerxError, match="does not exist"):
        discover(tmp_path / "nope")


@pytest.mark.parametrize(
    "mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("RGB", "WEBP"), ("I;16", "PNG")]
)
def test_every_mode_becomes_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    if mode == "I;16":
        Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(path)
    else:
        make_image(path, mode=mode, fmt=fmt)
    array = prepare_image(path, 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    if mode == "I;16":
        assert 150 < array.mean() < 160  # 40000 / 256, not clipped to white


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (20, 40)


def test_sources_path_bytes_pil_array_agree(tmp_path):
    path = make_image(tmp_path / "a.png", fmt="PNG")
    want = prepare_image(path, 16)
    for source in (str(path), path.read_bytes(), Image.open(path), np.asarray(Image.open(path))):
        np.testing.assert_array_equal(prepare_image(source, 16), want)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty file"),
        (b"hello, I am text", "not an image"),
        ("truncated", "cannot decode"),
    ],
)
def test_bad_files_raise_image_error(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        good = make_image(tmp_path / "good.jpg", size=(300, 300)).read_bytes()
        content = good[: len(good) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        prepare_image(path, 16)
    assert issubclass(ImageError, ValueError)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        prepare_image(tmp_path / "nope.jpg", 16)
    with pytest.raises(ImageError, match="folder"):
        prepare_image(tmp_path, 16)


def test_an_unloaded_pil_jpeg_decodes_close_to_its_bytes_from_the_object_itself(tmp_path, monkeypatch):
    """Bytes and paths of large JPEGs are decoded at a reduced DCT scale; a caller's PIL image is decoded in
    full from the object (never re-read from its file name): the same picture, up to rounding."""
    path = tmp_path / "big.jpg"
    big = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(big).resize((1600, 1200), Image.BILINEAR).save(path, quality=90)
    image = Image.open(path)
    monkeypatch.chdir(tmp_path.parent)  # the object, not a file of that name in the current folder
    (tmp_path / "big.jpg").rename(tmp_path / "moved.jpg")
    got = prepare_image(image, 64).astype(int)
    want = prepare_image((tmp_path / "moved.jpg").read_bytes(), 64).astype(int)
    assert np.abs(got - want).mean() < 2 and image.size == (1600, 1200)


def _swapped_rgb_profile(rename: bool = True) -> bytes:
    """A valid RGB matrix profile that is not sRGB: lcms's sRGB with its red and blue primaries swapped (and
    its name changed), so converting to sRGB swaps red and blue: easy to see, no profile file to ship."""
    import struct

    from PIL import ImageCms

    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    tags = {}
    for i in range(struct.unpack(">I", icc[128:132])[0]):
        signature, offset, size = struct.unpack(">4sII", icc[132 + 12 * i : 144 + 12 * i])
        tags[signature] = (offset, size)
    (r, r_size), (b, b_size) = tags[b"rXYZ"], tags[b"bXYZ"]
    red, blue = bytes(icc[r : r + r_size]), bytes(icc[b : b + b_size])
    icc[r : r + r_size], icc[b : b + b_size] = blue, red
    return bytes(icc).replace("sRGB".encode("utf-16-be"), "swap".encode("utf-16-be")) if rename else bytes(icc)


def _with_profile(path: Path, icc: bytes, colour=(180, 90, 40)) -> Path:
    Image.new("RGB", (40, 30), colour).save(path, "PNG", icc_profile=icc)
    return path


def test_embedded_icc_profiles_are_converted_to_srgb(tmp_path):
    """Issue 12's colour rule: what browsers and most image stacks show, training and serving alike."""
    from PIL import ImageCms

    swapped = _with_profile(tmp_path / "swapped.png", _swapped_rgb_profile())
    assert tuple(np.asarray(open_image(swapped))[0, 0]) == (40, 90, 180)  # red and blue as sRGB shows them
    assert tuple(np.asarray(Image.open(swapped).convert("RGB"))[0, 0]) == (180, 90, 40)  # the stored values
    srgb = _with_profile(tmp_path / "srgb.png", ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    np.testing.assert_array_equal(np.asarray(open_image(srgb)), np.asarray(Image.open(srgb).convert("RGB")))
    # a profile is judged by what it does, not by its name (14 flower photos carry an "sRGB Profile" that is not)
    named = _with_profile(tmp_path / "named.png", _swapped_rgb_profile(rename=False))
    assert "sRGB" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(_swapped_rgb_profile(False))))
    assert tuple(np.asarray(open_image(named))[0, 0]) == (40, 90, 180)
    broken = _with_profile(tmp_path / "broken.png", b"not a profile at all")
    assert tuple(np.asarray(open_image(broken))[0, 0]) == (180, 90, 40)  # unreadable profile: pixels kept


def test_icc_conversion_is_the_same_from_many_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    icc = _swapped_rgb_profile()
    paths = [_with_profile(tmp_path / f"{i}.png", icc, (20 * i, 255 - 20 * i, 7 * i)) for i in range(8)]
    want = [prepare_image(p, 16) for p in paths]
    assert tuple(want[1][0, 0]) == (7, 235, 20)
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            got = list(pool.map(lambda p: prepare_image(p, 16), paths * 4))
            assert all(np.array_equal(g, want[i % 8]) for i, g in enumerate(got))
