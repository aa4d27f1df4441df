"""Image folders, the stable train/validation/test split, and the one decode rule.

`prepare_image` is used both to compute bottlenecks in training and by the Predictor, so the cached
features and the exported model see exactly the same pixels. No TensorFlow here.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FlowerxError, ImageError
from .fileio import download, extract_tar

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_PERCENT = 2**27 - 1  # as in retrain.py: fine-grained, stable buckets
RESIZE_RULE = "bilinear"  # whole image to S x S, no crop; recorded in the model's metadata
# A 3-gigapixel "photo" is an attack, not data. PIL warns above this size (and refuses above twice it);
# flowerx refuses above it: the size check in open_image is explicit, and the warning (set to an error once
# here, since warnings.catch_warnings is not thread-safe and decoding runs on thread pools) can't slip by.
Image.MAX_IMAGE_PIXELS = 120_000_000
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


@dataclass(frozen=True)
class ImageItem:
    path: Path
    relpath: str  # posix path relative to the image dir, e.g. "daisy/123.jpg"
    label: int


@dataclass
class Dataset:
    root: Path
    labels: list[str]
    items: list[ImageItem]
    skipped_folders: list[str]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files under folder (recursively), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(Path(f)))
    return sorted(found)


def discover(image_dir: str | os.PathLike) -> Dataset:
    """Labels are the sorted names of image_dir's subfolders that hold images."""
    root = Path(image_dir).expanduser()
    if not root.is_dir():
        raise FlowerxError(f"image dir does not exist or is not a folder: {root}")
    labels, items, skipped = [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = list_images(sub)
        if not files:
            skipped.append(sub.name)
            continue
        index = len(labels)
        labels.append(sub.name)
        items.extend(ImageItem(f, f.relative_to(root).as_posix(), index) for f in files)
    if len(labels) < 2:
        raise FlowerxError(
            f"need at least two class folders with images in {root}, found {len(labels)}"
            + (f" ({', '.join(labels)})" if labels else "")
        )
    return Dataset(root, labels, items, skipped)


def split_of(relpath: str, validation_percentage: float, testing_percentage: float) -> str:
    """'train', 'validation' or 'test' for an image, from a hash of its path relative to the image dir.

    Stable across machines and dataset moves, and adding images never moves others.
    """
    digest = hashlib.sha1(relpath.encode("utf-8")).hexdigest()
    percent = (int(digest, 16) % (MAX_PERCENT + 1)) * (100.0 / MAX_PERCENT)
    if percent < validation_percentage:
        return "validation"
    if percent < testing_percentage + validation_percentage:
        return "test"
    return "train"


def open_image(source: ImageSource, min_size: int | None = None) -> Image.Image:
    """Decode any supported source into an upright RGB PIL image; ImageError on failure.

    With min_size, a JPEG is decoded at the smallest DCT scale that keeps both sides >= min_size
    (much faster for large photos; the result is still resized afterwards).
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    try:
        if isinstance(source, np.ndarray):
            return _from_array(source)
        if isinstance(source, Image.Image):
            image = source
        else:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            if not data:
                raise ImageError(name, "empty file")
            image = Image.open(io.BytesIO(data))
        if image.width * image.height > Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(name)
        if min_size and image.format == "JPEG":  # also an unloaded PIL JPEG: same pixels as from its bytes
            image.draft("RGB", (min_size, min_size))
        image = ImageOps.exif_transpose(image)  # loads the pixels (first frame/page); honours EXIF orientation
        return _to_rgb(image)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except IsADirectoryError:
        raise ImageError(name, "is a folder, not an image") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(name, f"image is too large (over {Image.MAX_IMAGE_PIXELS} pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(name, f"cannot decode image ({e})") from None


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
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def resize(image: Image.Image, size: int) -> np.ndarray:
    """The whole image (no crop) to size x size, bilinear, as uint8 [S, S, 3]."""
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def prepare_image(source: ImageSource, size: int) -> np.ndarray:
    """Decode, turn upright, convert to RGB and resize: the model's uint8 input for one image."""
    return resize(open_image(source, min_size=size), size)


FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"


def download_flowers(dest_dir: str | os.PathLike) -> Path:
    """The tutorial's flower photos (CC-BY; credits in its LICENSE.txt) as dest_dir/flower_photos.

    Downloaded over HTTPS into a temporary file, unpacked into a temporary folder with unsafe members
    refused, and only then moved into place; an existing folder is kept as it is.
    """
    final = Path(dest_dir).expanduser() / "flower_photos"
    if final.is_dir():
        return final
    archive = final.with_name("flower_photos.tgz")
    try:
        download(FLOWERS_URL, archive)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise FlowerxError(f"cannot download {FLOWERS_URL} (offline? {getattr(e, 'reason', e)})") from None
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
        return (f"flip={int(self.flip_left_right)},crop={self.random_crop:g},scale={self.random_scale:g},"
                f"brightness={self.random_brightness:g}")

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
