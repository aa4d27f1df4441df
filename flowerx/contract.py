"""The flowerx model contract: what an exported ONNX file promises the apps that run it.

Version 2 (flowerx 0.2 on):
  input  `image`: uint8 [N, H, W, 3] RGB (sRGB, upright), any size: the graph resizes the whole image to
         S x S itself (bilinear, antialiased as PIL's) and normalises it. A client only decodes.
  output `probs`: float32 [N, num_classes], softmax, in label order.
  output `labels`: uint8 [L], the labels as a UTF-8 JSON list (the same as the `labels` metadata).
Version 1 (earlier models, still read everywhere): input uint8 [N, S, S, 3], the client resizes; no `labels`.
  metadata_props: labels (JSON list), input_size, architecture, resize, normalization (applied inside the
  graph), flowerx_version, flowerx_contract, training (JSON record of the run), quantization (int8 models).

`Contract` is the one typed description of it: training and int8 export write it (`to_metadata`), the
Predictor, evaluate and bench read it (`from_metadata`), and every check of what a model carries is here.
No onnx or onnxruntime import.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field

import numpy as np

# Tensor and node names of the graph, defined by the exporters that write it (exporters imports no flowerx).
from exporters.names import (  # noqa: F401
    FEATURES,
    HEAD_BIAS,
    HEAD_KERNEL,
    HEAD_MATMUL,
    HEAD_PREFIX,
    INPUT,
    LABELS,
    OUTPUT,
)

from .errors import FlowerxError

RESIZE_RULE = "bilinear"  # the whole image to S x S, no crop
MAX_INPUT_SIZE = 4096
CONTRACT_VERSION = 2  # the graph's interface: uint8 [N, H, W, 3] in (resized inside), softmax and labels out
# ONNX's standard image metadata (onnx/docs/MetadataProps.md): what the input pixels are.
IMAGE_METADATA = {
    "Image.BitmapPixelFormat": "Rgb8",
    "Image.ColorSpaceGamma": "SRGB",
    "Image.NominalPixelRange": "NominalRange_0_255",
}
# Written by flowerx 0.1 before the normalisation key was renamed (a reader could apply them twice).
LEGACY_KEYS = ("input_mean", "input_std")
KNOWN_KEYS = (
    "labels",
    "input_size",
    "architecture",
    "resize",
    "normalization",
    "flowerx_version",
    "flowerx_contract",
    "training",
    "quantization",
    *IMAGE_METADATA,
    *LEGACY_KEYS,
)


class NoMetadataError(FlowerxError):
    """An ONNX model without flowerx's metadata (labels, input size), and none given."""


def check_labels(labels: object, source: str) -> list[str]:
    """Labels must be a list of distinct, non-empty strings; else one FlowerxError naming their source."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)):
        raise FlowerxError(f"{source}: labels must be a list of strings, got {type(labels).__name__}")
    if not labels or not all(isinstance(label, str) and label for label in labels):
        raise FlowerxError(f"{source}: labels must be non-empty strings")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise FlowerxError(f"{source}: duplicate labels: {', '.join(map(repr, duplicates[:5]))}")
    return list(labels)


def check_input_size(size: object, source: str) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_INPUT_SIZE:
        raise FlowerxError(f"{source}: the input size must be a whole number from 1 to {MAX_INPUT_SIZE}, got {size!r}")
    return size


@dataclass
class Contract:
    """What a flowerx model carries besides its graph."""

    labels: list[str]
    input_size: int
    architecture: str = ""
    resize: str = RESIZE_RULE
    input_mean: float | None = None  # applied inside the graph: a client never normalises
    input_std: float | None = None
    flowerx_version: str = ""
    training: dict = field(default_factory=dict)  # the run's record: accuracies, split, configuration
    quantization: str | None = None  # how an int8 model was made; None for a float model
    version: int = CONTRACT_VERSION  # 1: the client resizes to S x S; 2: the graph takes any size
    extra: dict[str, str] = field(default_factory=dict)  # metadata keys flowerx does not know, kept as they are

    def to_metadata(self) -> dict[str, str]:
        """The ONNX metadata_props (strings; lists and dicts as JSON), as the contract documents them (every
        model flowerx writes is of the current version)."""
        values = {
            "labels": json.dumps(self.labels),
            "input_size": str(self.input_size),
            "architecture": self.architecture,
            "resize": self.resize,
            "normalization": self.normalization(),
            "flowerx_version": self.flowerx_version,
            "flowerx_contract": str(CONTRACT_VERSION),
            "training": json.dumps(self.training) if self.training else None,
            "quantization": self.quantization,
        }
        return {**self.extra, **{k: str(v) for k, v in values.items() if v not in (None, "")}, **IMAGE_METADATA}

    def description(self, flowerx_version: str):
        """Everything the exporters stamp on the model: metadata, doc string, producer, and a model_version
        (the UTC time it was made, as YYYYMMDDhhmmss)."""
        from exporters.onnx_export import Description

        stamp = int(datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S"))
        return Description(self.to_metadata(), self.labels, self.input_size, self.doc(), flowerx_version, stamp)

    def normalization(self) -> str | None:
        """The normalisation the graph applies itself, said so that no client applies it again."""
        if self.input_mean is None or self.input_std is None:
            return None
        return json.dumps(
            {
                "mean": self.input_mean,
                "std": self.input_std,
                "applied": "inside the graph: feed raw 0-255 pixels, do not normalise",
            }
        )

    def doc(self) -> str:
        """The model's doc string: what a person opening it in any ONNX tool should read."""
        accuracy = self.training.get("test_accuracy")
        tested = (
            f" Test accuracy {accuracy * 100:.1f}% on {self.training.get('test_count')} held-out images."
            if isinstance(accuracy, (int, float))
            else ""
        )
        shown = ", ".join(self.labels[:20]) + (f", ... ({len(self.labels)} in all)" if len(self.labels) > 20 else "")
        size = f"{self.input_size} x {self.input_size}"
        return (
            f"flowerx image classifier ({self.architecture or 'unknown network'}"
            f"{', int8' if self.quantization else ''}) for {len(self.labels)} classes: {shown}.{tested} "
            f"Input `{INPUT}`: uint8 [N, H, W, 3], RGB (sRGB), upright, the decoded image at any size: the model "
            f"resizes the whole image to {size} itself ({self.resize}, antialiased, no crop) and normalises it, "
            "so feed the decoded pixels and do nothing else. "
            f"Output `{OUTPUT}`: float32 [N, {len(self.labels)}] softmax probabilities in label order. Output "
            f"`{LABELS}`: the labels as a UTF-8 JSON list (uint8 bytes), also in the `labels` metadata."
        )

    @classmethod
    def from_metadata(
        cls, meta: dict[str, str], name: str, labels: list[str] | None = None, input_size: int | None = None
    ) -> Contract:
        """The contract of a model's metadata; labels / input_size stand in for a model without metadata.
        What running the model needs (labels, input size, resize rule) must be right, else one FlowerxError
        naming the model and the key; the informational keys (training, input_mean/std) never stop a model
        from loading: a malformed training record is reported when its split is asked for."""
        if labels is not None:
            labels = check_labels(list(labels) if isinstance(labels, tuple) else labels, "labels")
        elif "labels" in meta:
            try:
                labels = check_labels(json.loads(meta["labels"]), f"{name}'s labels metadata")
            except json.JSONDecodeError as e:
                raise FlowerxError(f"{name}: unreadable labels metadata ({e})") from None
        if "input_size" in meta:
            try:
                own = int(meta["input_size"])
            except ValueError:
                raise FlowerxError(
                    f"{name}: input_size metadata is not a whole number ({meta['input_size'][:40]!r})"
                ) from None
            if input_size is not None and input_size != own:  # a wrong size runs, and answers wrongly
                raise FlowerxError(
                    f"{name} was trained at {own} x {own} pixels (its metadata), not {input_size}: drop the "
                    "input size (it is for models without flowerx metadata)"
                )
            input_size = own
        if labels is None or input_size is None:
            raise NoMetadataError(
                f"{name} has no flowerx metadata (labels, input_size): pass labels and input_size "
                "(--labels FILE --input-size S at the command line)"
            )
        resize = meta.get("resize", RESIZE_RULE)
        if resize != RESIZE_RULE:
            raise FlowerxError(f"{name} wants resize rule {resize!r}; flowerx feeds {RESIZE_RULE!r} only")
        return cls(
            labels=[str(label) for label in labels],
            input_size=check_input_size(int(input_size) if isinstance(input_size, np.integer) else input_size, name),
            architecture=meta.get("architecture", ""),
            resize=resize,
            input_mean=_normalization(meta, "mean"),
            input_std=_normalization(meta, "std"),
            flowerx_version=meta.get("flowerx_version", ""),
            training=_lenient(read_training, meta, name),
            quantization=meta.get("quantization"),
            version=_version(meta, name),
            extra={k: v for k, v in meta.items() if k not in KNOWN_KEYS},
        )

    def split_percentages(self, name: str) -> tuple[float, float] | None:
        """(validation %, testing %) of the training run's hash split; None when not recorded."""
        return split_percentages(self.training, name)

    @property
    def split_by_folders(self) -> bool:
        """Whether the run's split came from train/, val/, test/ folders."""
        return self.training.get("split") == "folders"


def _version(meta: dict[str, str], name: str) -> int:
    """The contract version a model says it follows (1 for models written before the key existed)."""
    value = meta.get("flowerx_contract", "1")
    if not value.isdigit() or not 1 <= int(value) <= CONTRACT_VERSION:
        raise FlowerxError(
            f"{name} follows flowerx model contract {value[:20]!r}; this flowerx reads versions 1 to "
            f"{CONTRACT_VERSION} (a newer flowerx may read it)"
        )
    return int(value)


def _normalization(meta: dict[str, str], key: str) -> float | None:
    """The graph's own normalisation constant (informational only: the graph applies it)."""
    try:
        if "normalization" in meta:
            return float(json.loads(meta["normalization"])[key])
        return float(meta[f"input_{key}"])  # flowerx 0.1's key
    except (KeyError, ValueError, TypeError):
        return None


def _lenient(read, meta: dict[str, str], name: str) -> dict:
    """The training record, or {"_unreadable": why} when it is malformed (raised by split_percentages)."""
    try:
        return read(meta, name)
    except FlowerxError as e:
        return {"_unreadable": str(e)}


def read_training(metadata: dict[str, str], name: str) -> dict:
    """The model's 'training' record (a JSON object), or {} when there is none."""
    try:
        training = json.loads(metadata.get("training") or "{}")
    except ValueError as e:
        raise FlowerxError(f"{name}: unreadable 'training' metadata ({e})") from None
    if not isinstance(training, dict):
        raise FlowerxError(f"{name}: 'training' metadata is not a JSON object")
    return training


def split_percentages(training: dict, name: str) -> tuple[float, float] | None:
    """(validation %, testing %) of the training run's split, None when not recorded; checked."""
    if "_unreadable" in training:
        raise FlowerxError(training["_unreadable"])
    if "testing_percentage" not in training:
        return None
    values = training.get("validation_percentage"), training.get("testing_percentage")
    valid = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 100 for v in values
    )
    if not valid or sum(values) >= 100:
        raise FlowerxError(f"{name}: the 'training' metadata's split percentages are not valid ({values})")
    return float(values[0]), float(values[1])
