"""Image folders, the stable train/validation/test split, and the one decode rule.

`prepare_image` is used both to compute bottlenecks in training and by the Predictor, so the cached
features and the exported model see exactly the same pixels. No TensorFlow here.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FlowerxError, ImageError
from .fileio import RefusedFile, download, extract_tar, read_regular

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_PERCENT = 2**27 - 1  # as in retrain.py: fine-grained, stable buckets
# A 3-gigapixel "photo" is an attack, not data: flowerx refuses images over MAX_PIXELS, checked explicitly in
# open_image before any pixel is decoded (no global PIL setting or warnings filter: importing flowerx changes
# nothing in the host process; PIL's own check still refuses over twice its limit, and may warn in between).
MAX_PIXELS = 120_000_000  # a 108-megapixel phone photo passes

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
MAX_IMAGE_MB = 64  # image files larger than this are refused unread; FLOWERX_MAX_IMAGE_MB overrides it
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
    "testing": "test",
}
# Embeddings, overrides and isolates reorder how text displays (a label could show as another); the joiners
# and marks that Persian, Hindi or emoji need (U+200C, U+200D, ...) are ordinary text.
BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_PIL_LOCK = threading.Lock()  # loading a caller's lazy PIL image mutates it: one thread at a time


def max_image_bytes() -> int:
    """The size limit for image files: FLOWERX_MAX_IMAGE_MB (read at each call), else MAX_IMAGE_MB."""
    value = os.environ.get("FLOWERX_MAX_IMAGE_MB", "")
    try:
        mb = float(value) if value else MAX_IMAGE_MB
    except ValueError:
        raise FlowerxError(f"FLOWERX_MAX_IMAGE_MB must be a number of MiB, not {value!r}") from None
    if not mb > 0 or mb == float("inf"):
        raise FlowerxError(f"FLOWERX_MAX_IMAGE_MB must be positive and finite, not {value!r}")
    return int(mb * 2**20)


@dataclass(frozen=True)
class ImageItem:
    path: Path
    relpath: str  # posix path relative to the image dir, e.g. "daisy/123.jpg"
    label: int
    split: str | None = None  # "train", "validation" or "test" when the folders give the split


@dataclass
class Dataset:
    root: Path
    labels: list[str]
    items: list[ImageItem]
    skipped_folders: list[tuple[str, str]]  # (folder, why)
    presplit: bool = False  # train/, val/, test/ folders of class folders gave the split


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Walk:
    """Walks image folders once per real folder and counts each real file once: a folder link is followed
    only when it stays inside the root (anywhere with follow_links), and never into a folder already seen,
    so link loops (`ln -s . a`) end and no image is counted twice (which would leak test images into
    training)."""

    LINK_OUT = "a link outside the image dir (--follow-links follows it)"

    def __init__(self, root: Path, follow_links: bool):
        self.root, self.follow_links = os.path.realpath(root), follow_links
        self.dirs: set[tuple[int, int]] = set()
        self.skipped_links: list[tuple[str, str]] = []  # (folder, why) of links not followed
        self.files: set[tuple[int, int]] = set()

    def enter(self, folder: str) -> bool:
        """Whether to walk folder (a real folder or a link to one)."""
        if os.path.islink(folder) and not self.follow_links and not _inside(os.path.realpath(folder), self.root):
            self.skipped_links.append((os.path.relpath(folder, self.root), self.LINK_OUT))
            return False
        try:
            info = os.stat(folder)
        except OSError:
            return False
        key = (info.st_dev, info.st_ino)
        if key in self.dirs:
            return False
        self.dirs.add(key)
        return True

    def images(self, folder: str) -> list[Path]:
        """Image files under folder, recursively (folder already entered), sorted."""
        found, stack = [], [folder]
        while stack:
            current = stack.pop()
            try:
                entries = sorted(os.scandir(current), key=lambda e: e.name)
            except OSError:
                continue
            folders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    if self.enter(entry.path):
                        folders.append(entry.path)
                elif is_image_file(Path(entry.name)):
                    try:
                        info = entry.stat()
                        key = (info.st_dev, info.st_ino)
                        if key in self.files:
                            continue
                        self.files.add(key)
                    except OSError:  # a broken link: listed, so that reading it reports why
                        pass
                    found.append(Path(entry.path))
            stack.extend(reversed(folders))  # walked in name order: the first name of a file seen twice wins
        return sorted(found)


def list_images(folder: str | os.PathLike, follow_links: bool = False) -> list[Path]:
    """Image files under folder (recursively), sorted; each real file once (see _Walk for links)."""
    folder = Path(folder).expanduser()
    walk = _Walk(folder, follow_links)
    return walk.images(str(folder)) if walk.enter(str(folder)) else []


def check_label(name: str) -> str:
    """A class folder's name as a label, or a FlowerxError naming the folder: labels travel in labels.txt,
    JSON metadata and every client's output, so they must be printable UTF-8 text on one line."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise FlowerxError(f"class folder {name!r} has a name that is not valid UTF-8: rename it") from None
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROLS for c in name):
        raise FlowerxError(f"class folder {name!r} has control characters in its name: rename it")
    return name


def _class_folders(root: Path, walk: _Walk, prefix: str, split: str | None) -> tuple[dict[str, list], list]:
    """{class name: [(path, relpath, split)]} of root's class subfolders, and the skipped (folder, why)."""
    classes, skipped, entered = {}, [], []
    for sub in sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name):
        if not sub.is_dir():
            continue
        if walk.enter(str(sub)):  # every class folder first: a link from one class into another is not followed
            entered.append(sub)
        elif walk.skipped_links[-1:] != [(os.path.relpath(sub, walk.root), walk.LINK_OUT)]:  # else: said already
            skipped.append((prefix + sub.name, "the same folder as another class folder: not used twice"))
    for sub in entered:
        name = prefix + sub.name
        files = walk.images(str(sub))
        if not files:
            skipped.append((name, "no images in it"))
            continue
        check_label(sub.name)
        classes[sub.name] = [(f, prefix + f.relative_to(sub.parent).as_posix(), split) for f in files]
    return classes, skipped


def _split_folders(root: Path) -> dict[str, Path]:
    """Split folders (train/, val/ or valid/ or validation/, test/; any case) when one of them holds class
    folders, as Keras, Ultralytics and Roboflow users have their data."""
    found = {p.name: p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_FOLDERS}
    holds_classes = any(any(q.is_dir() and not q.name.startswith(".") for q in p.iterdir()) for p in found.values())
    return found if holds_classes else {}


def _presplit_classes(root: Path, split_dirs: dict[str, Path], walk: _Walk) -> tuple[dict[str, list], list]:
    """{class: files} over the split folders, and what was skipped; refuses layouts it cannot read right."""
    others = sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in split_dirs
    )
    if others:
        raise FlowerxError(
            f"{root} holds split folders ({', '.join(sorted(split_dirs))}) and other folders "
            f"({', '.join(others)}): put every class folder inside train/, val/ or test/"
        )
    if "train" not in {SPLIT_FOLDERS[name.lower()] for name in split_dirs}:
        raise FlowerxError(f"{root} holds split folders ({', '.join(sorted(split_dirs))}) but no train/ folder")
    classes, skipped = {}, []
    for name, folder in sorted(split_dirs.items(), key=lambda item: SPLIT_FOLDERS[item[0].lower()] != "train"):
        if not walk.enter(str(folder)):  # train/ first: a link from another split to it cannot take its images
            if walk.skipped_links[-1:] == [(name, walk.LINK_OUT)]:
                continue  # a link out of the image dir, reported
            raise FlowerxError(f"{root}: split folder {name}/ is the same folder as another split folder")
        strays = [p for p in folder.iterdir() if is_image_file(p)]
        if strays:
            skipped.append((name, f"{len(strays)} images outside any class folder, not used"))
        found, missed = _class_folders(folder, walk, f"{name}/", SPLIT_FOLDERS[name.lower()])
        skipped += missed
        for label, files in found.items():
            classes.setdefault(label, []).extend(files)
    return classes, skipped


def discover(image_dir: str | os.PathLike, follow_links: bool = False) -> Dataset:
    """Labels are the sorted names of image_dir's subfolders that hold images. An image dir of train/,
    val/ (or valid/, validation/) and test/ folders, each of class folders, gives its own split instead."""
    root = Path(image_dir).expanduser()
    if not root.is_dir():
        raise FlowerxError(f"image dir does not exist or is not a folder: {root}")
    walk = _Walk(root, follow_links)
    walk.enter(str(root))
    try:
        split_dirs = _split_folders(root)
        classes, skipped = (
            _presplit_classes(root, split_dirs, walk) if split_dirs else _class_folders(root, walk, "", None)
        )
    except OSError as e:
        raise FlowerxError(f"cannot read the image dir {root}: {e.strerror or e}") from None
    skipped += walk.skipped_links
    labels = sorted(classes)
    if len(labels) < 2:
        raise FlowerxError(
            f"need at least two class folders with images in {root}, found {len(labels)}"
            + (f" ({', '.join(labels)})" if labels else "")
        )
    items = [
        ImageItem(path, relpath, index, split)
        for index, label in enumerate(labels)
        for path, relpath, split in classes[label]
    ]
    return Dataset(root, labels, items, skipped, presplit=bool(split_dirs))


def split_of(relpath: str, validation_percentage: float, testing_percentage: float) -> str:
    """'train', 'validation' or 'test' for an image, from a hash of its path relative to the image dir.

    Stable across machines and dataset moves, and adding images never moves others. The path's bytes are
    hashed (os.fsencode), so names that are not valid UTF-8 work too.
    """
    digest = hashlib.sha1(os.fsencode(relpath)).hexdigest()
    percent = (int(digest, 16) % (MAX_PERCENT + 1)) * (100.0 / MAX_PERCENT)
    if percent < validation_percentage:
        return "validation"
    if percent < testing_percentage + validation_percentage:
        return "test"
    return "train"


def split_names(items: list[ImageItem], validation_percentage: float, testing_percentage: float) -> np.ndarray:
    """Each item's split: its folder's where the dataset came split, else the stable hash split."""
    return np.array(
        [item.split or split_of(item.relpath, validation_percentage, testing_percentage) for item in items],
        dtype=object,
    )


def open_image(source: ImageSource, min_size: int | None = None, max_bytes: int | None = None) -> Image.Image:
    """Decode any supported source into an upright RGB PIL image; ImageError on failure.

    With min_size, a JPEG (path or bytes) is decoded at the smallest DCT scale that keeps both sides >=
    min_size (much faster for large photos; the result is still resized afterwards). A caller's PIL image is
    used as it is and never changed: decoded in full (no draft) into a new image, so its pixels can differ from
    its file's by rounding. Files must be regular files of at most max_bytes (default: max_image_bytes()).
    """
    if isinstance(source, (str, os.PathLike)):
        source = Path(source).expanduser()
        name = str(source)
    else:
        name = type(source).__name__
    limit = max_bytes or (max_image_bytes() if isinstance(source, Path) else None)  # a bad setting is not this image's
    try:
        if isinstance(source, np.ndarray):
            return _from_array(source)
        if isinstance(source, Image.Image):
            with _PIL_LOCK:  # load() fills the caller's lazy image in place; PIL is not thread-safe there
                source.load()
            image = source
        elif isinstance(source, (bytes, bytearray, memoryview, Path)):
            data = bytes(source) if not isinstance(source, Path) else read_regular(source, limit)
            if not data:
                raise ImageError(name, "empty file")
            image = Image.open(io.BytesIO(data))
            if min_size and image.format == "JPEG":
                image.draft("RGB", (min_size, min_size))
        else:
            raise ImageError(name, "not an image source: give a path, bytes, a PIL image or a uint8 array")
        if image.width * image.height > MAX_PIXELS:
            raise Image.DecompressionBombError(name)
        if image.width == 0 or image.height == 0:
            raise ImageError(name, "image has no pixels (0 x 0)")
        icc = image.info.get("icc_profile")
        upright = ImageOps.exif_transpose(image)  # a new image (loads the first frame/page); honours EXIF
        upright = upright if upright is not image else image.copy()
        return _to_rgb(_to_srgb(upright, icc) if icc else upright)
    except ImageError:
        raise
    except RefusedFile as e:
        raise ImageError(name, str(e)) from None
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except IsADirectoryError:
        raise ImageError(name, "is a folder, not an image") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(name, f"image is too large (over {MAX_PIXELS} pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(name, f"cannot decode image ({e})") from None


_TRANSFORMS: dict[tuple[bytes, str], object] = {}  # (profile digest, mode) -> ImageCms transform, or None
_TRANSFORMS_LOCK = threading.Lock()


def _to_srgb(image: Image.Image, icc: bytes) -> Image.Image:
    """image converted from its embedded ICC profile to sRGB, as browsers and most image libraries do (a photo
    in Adobe RGB or a camera's space otherwise looks washed out or shifted to the network). sRGB profiles and
    profiles lcms cannot read leave the pixels as they are."""
    if image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    transform = _srgb_transform(icc, image.mode)
    if transform is None:
        return image
    from PIL import ImageCms  # only for photos with a profile that is not sRGB: most have none

    return ImageCms.applyTransform(image, transform)


def _srgb_transform(icc: bytes, mode: str):
    """The profile -> sRGB transform for this mode, built once per distinct profile (cached); None for a
    profile that is sRGB in effect, as browsers decide it (skcms compares profiles numerically, not by name):
    the transform moves no colour of a probe grid by more than one level. A name is no proof: 14 flower
    photos carry an "sRGB Profile" whose conversion moves pixels by 1.6 levels on average, as Chromium,
    sharp and Pillow's own ImageCms do."""
    from PIL import ImageCms

    key = (hashlib.sha1(icc).digest(), mode)
    with _TRANSFORMS_LOCK:
        if key not in _TRANSFORMS:
            try:
                source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                target = ImageCms.createProfile("sRGB")
                transform = ImageCms.buildTransform(  # NOCACHE: one transform is shared by every thread
                    source, target, mode, "RGBA" if mode == "RGBA" else "RGB", flags=ImageCms.Flags.NOCACHE
                )
                if mode == "RGB" and _moves_at_most_one_level(transform):
                    transform = None  # already sRGB: the pixels stay exactly as decoded
            except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
                transform = None  # a profile lcms cannot read: keep the pixels rather than fail the image
            _TRANSFORMS[key] = transform
        return _TRANSFORMS[key]


_PROBE = Image.fromarray(  # every combination of 16 levels per channel (0, 17, ..., 255): 4096 colours
    np.stack(np.meshgrid(*[np.arange(0, 256, 17, dtype=np.uint8)] * 3, indexing="ij"), -1).reshape(64, 64, 3)
)


def _moves_at_most_one_level(transform) -> bool:
    from PIL import ImageCms

    converted = np.asarray(ImageCms.applyTransform(_PROBE, transform), dtype=np.int16)
    return int(np.abs(converted - np.asarray(_PROBE, dtype=np.int16)).max()) <= 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        scale = 1 / 256 if image.mode != "I" or np.asarray(image).max() > 255 else 1
        image = Image.fromarray(np.clip(np.asarray(image) * scale, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError("array", f"image must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageError("array", f"image must be HxWx3 RGB (or HxW, HxWx4), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError("array", f"image has no pixels (shape {array.shape})")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)))


_RESIZER: list = []  # the resize session, made on first use (importing flowerx loads no onnxruntime)
_RESIZER_LOCK = threading.Lock()


def _resizer():
    """flowerx/resize.onnx on onnxruntime: the contract's own Resize node (exporters.onnx_export._resize_node),
    one thread per call, shared by every decoding thread (onnxruntime's run is thread-safe)."""
    with _RESIZER_LOCK:
        if not _RESIZER:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            model = (resources.files("flowerx") / "resize.onnx").read_bytes()
            _RESIZER.append(ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]))
        return _RESIZER[0]


def resize(image: Image.Image, size: int) -> np.ndarray:
    """The whole image (no crop) to size x size as uint8 [S, S, 3]: bilinear, antialiased when it shrinks, by
    the very Resize node a contract-2 model runs on the pixels a client feeds it, so the two agree exactly
    (PIL's bilinear differs from it by 1 level on some pixels, which moved mobilenet_1.0_224's probabilities by
    up to 0.033). Faster than PIL's too (0.7 vs 0.8 ms for a 500 x 333 photo)."""
    pixels = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    if pixels.shape[:2] == (size, size):
        return pixels
    sizes = np.array([1, size, size, 3], np.int64)
    return _resizer().run(None, {"image": pixels[None], "sizes": sizes})[0][0]


# A JPEG is decoded at a DCT scale (1/2, 1/4, 1/8) that keeps both sides >= DRAFT_FACTOR x S, then resized.
# Contract-2 clients decode in full and let the model resize; measured on 120 enlarged test photos (2-12x,
# up to 12 MP), the Predictor's probabilities then differ from theirs by at most 0.015 (p99 0.008), where
# decoding at >= 1 x S differed by up to 0.085. Cost for a 12 MP photo: 35 ms, not 10 ms (full decode: 99 ms).
DRAFT_FACTOR = 4


def prepare_image(source: ImageSource, size: int, max_bytes: int | None = None) -> np.ndarray:
    """Decode, turn upright, convert to RGB and resize: the model's uint8 input for one image."""
    return resize(open_image(source, min_size=size * DRAFT_FACTOR, max_bytes=max_bytes), size)


FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"


def download_flowers(dest_dir: str | os.PathLike, on_progress: Callable[[int, int | None], None] | None = None) -> Path:
    """The tutorial's flower photos (CC-BY; credits in its LICENSE.txt) as dest_dir/flower_photos.

    Downloaded over HTTPS into a temporary file, unpacked into a temporary folder with unsafe members
    refused, and only then moved into place; an existing folder is kept as it is.
    """
    final = Path(dest_dir).expanduser() / "flower_photos"
    if final.is_dir():
        return final
    archive = final.with_name(f".flower_photos.{os.getpid()}.tgz")  # ours alone: a user's own .tgz is left alone
    download(FLOWERS_URL, archive, on_progress=on_progress)  # says whether the network or this machine failed
    try:
        return extract_tar(archive, final, inner="flower_photos")
    finally:
        archive.unlink(missing_ok=True)


@dataclass(frozen=True)
class Distortion:
    """retrain.py's distortions, applied before the network: a view is a random crop of a randomly scaled
    image, maybe mirrored, with its brightness scaled. Percentages as in retrain.py's flags."""

    flip_left_right: bool = False
    random_crop: float = 0.0  # margin around the crop, % of the side
    random_scale: float = 0.0  # extra up-scaling before the crop, up to this %
    random_brightness: float = 0.0  # brightness multiplied by 1 +- up to this %

    @property
    def active(self) -> bool:
        return self.flip_left_right or any((self.random_crop, self.random_scale, self.random_brightness))

    @property
    def id(self) -> str:
        """Identifies the settings in cache keys: other settings, other views."""
        return (
            f"flip={int(self.flip_left_right)},crop={self.random_crop:g},scale={self.random_scale:g},"
            f"brightness={self.random_brightness:g}"
        )

    def largest_side(self, size: int) -> int:
        """The largest side a view is cut from (the JPEG decode needs no more)."""
        return int(np.ceil(size * (1 + self.random_crop / 100) * (1 + self.random_scale / 100)))

    def view(self, source: ImageSource, size: int, seed: int) -> np.ndarray:
        """Decode source (no larger than the view needs) and return its view for seed: uint8 [S, S, 3]."""
        return self.apply(open_image(source, min_size=self.largest_side(size)), size, seed)

    def apply(self, image: Image.Image, size: int, seed: int) -> np.ndarray:
        """One view of image as uint8 [S, S, 3]; the same seed gives the same view."""
        rng = np.random.default_rng(seed)
        side = size * (1 + self.random_crop / 100) * rng.uniform(1, 1 + self.random_scale / 100)
        side = max(size, int(round(side)))
        scaled = np.asarray(image.resize((side, side), Image.BILINEAR), dtype=np.float32)
        top, left = rng.integers(0, side - size + 1, 2)
        view = scaled[top : top + size, left : left + size]
        if self.flip_left_right and rng.random() < 0.5:
            view = view[:, ::-1]
        if self.random_brightness:
            view = view * rng.uniform(1 - self.random_brightness / 100, 1 + self.random_brightness / 100)
        return np.clip(np.rint(view), 0, 255).astype(np.uint8)
