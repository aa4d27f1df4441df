"""The networks flowerx can retrain: their names, preprocessing and pretrained-weights files.

Pure Python (no TensorFlow): the table is shared by training, export, the predictor and bench.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import FlowerxError
from .fileio import download, file_hash, user_cache_dir

MOBILENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"
INCEPTION_URL = "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
MOBILENET_WIDTHS = ("1.0", "0.75", "0.50", "0.25")
MOBILENET_SIZES = (224, 192, 160, 128)
# Hashes of Google's published files, where known (Keras pins none for MobileNet v1).
KNOWN_HASHES = {
    "mobilenet_2_5_224_tf_no_top.h5": "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf",
    # md5, as Keras pins it
    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5": "bcbd6486424b2319ff4ef7d526e38f63",
}


@dataclass(frozen=True)
class Architecture:
    """One pretrained network and the preprocessing its weights expect."""

    name: str  # e.g. "mobilenet_0.50_224"
    family: str  # "mobilenet_v1" or "inception_v3"
    input_size: int  # square input side S
    feature_dim: int  # length of the pooled bottleneck
    alpha: float | None = None  # MobileNet width multiplier
    mean: float = 127.5  # pixel -> (pixel - mean) / std, i.e. [-1, 1]
    std: float = 127.5

    @property
    def weights_file(self) -> str:
        """The file name Keras downloads the ImageNet weights (no top) under."""
        if self.family == "inception_v3":
            return "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
        alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[self.alpha]
        return f"mobilenet_{alpha_text}_{self.input_size}_tf_no_top.h5"

    @property
    def weights_url(self) -> str:
        base = INCEPTION_URL if self.family == "inception_v3" else MOBILENET_URL
        return base + self.weights_file


def _build_table() -> dict[str, Architecture]:
    table = {}
    for width in MOBILENET_WIDTHS:
        for size in MOBILENET_SIZES:
            name = f"mobilenet_{width}_{size}"
            alpha = float(width)
            table[name] = Architecture(name, "mobilenet_v1", size, int(1024 * alpha), alpha)
    table["inception_v3"] = Architecture("inception_v3", "inception_v3", 299, 2048)
    return table


ARCHITECTURES: dict[str, Architecture] = _build_table()


def get_architecture(name: str) -> Architecture:
    """Look up an architecture by name; accepts "mobilenet_0.5_224" for "mobilenet_0.50_224"."""
    key = name.strip().lower()
    if key.startswith("mobilenet_"):
        parts = key.split("_")
        if len(parts) == 3:
            try:
                width = f"{float(parts[1]):.2f}".rstrip("0")
                width = {"1.": "1.0", "0.5": "0.50"}.get(width, width)
                key = f"mobilenet_{width}_{parts[2]}"
            except ValueError:
                pass
    if key in ARCHITECTURES:
        return ARCHITECTURES[key]
    close = difflib.get_close_matches(key, ARCHITECTURES, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise FlowerxError(
        f"unknown architecture '{name}'{hint} Choose mobilenet_<width>_<size> "
        f"(width {'/'.join(MOBILENET_WIDTHS)}, size {'/'.join(map(str, MOBILENET_SIZES))}) or inception_v3"
    )


def default_model_dir() -> Path:
    """Where Keras itself caches weights: $KERAS_HOME/models or ~/.keras/models."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def available_architectures(model_dir: Path) -> list[str]:
    """Names of the architectures whose weights file is present in model_dir."""
    return [a.name for a in ARCHITECTURES.values() if (Path(model_dir) / a.weights_file).is_file()]


def weights_fingerprint(path: Path) -> str:
    """A short id of a weights file's content: caches built from other weights are never reused."""
    return file_hash(path)[:12]


FEATURE_EXPORT_VERSION = "v1"  # bump when the feature network's ONNX export changes (converter, opset, inputs)


def feature_export_path(arch: Architecture, weights_id: str) -> Path:
    """Where the feature network's ONNX export for these weights (weights_fingerprint) is cached, once per
    machine: every --bottleneck-dir shares it, other weights get their own file."""
    return user_cache_dir() / "features" / f"{arch.name}-{weights_id}-{FEATURE_EXPORT_VERSION}.onnx"


def resolve_weights(
    arch: Architecture, model_dir: str | os.PathLike, on_progress: Callable[[int, int | None], None] | None = None
) -> Path:
    """The ImageNet weights file for arch in model_dir, downloading it there when absent (on_progress gets
    the bytes so far and the total)."""
    model_dir = Path(model_dir).expanduser()
    path = model_dir / arch.weights_file
    if path.is_file():
        return path
    try:
        return download(arch.weights_url, path, KNOWN_HASHES.get(arch.weights_file), on_progress=on_progress)
    except FlowerxError as e:
        present = available_architectures(model_dir)
        have = f"weights present there: {', '.join(present)}" if present else "no weights are present there"
        raise FlowerxError(f"no weights for {arch.name} in {model_dir} ({arch.weights_file}): {e}; {have}") from None
