"""The Predictor: runs a flowerx ONNX model on onnxruntime. No TensorFlow, tf2onnx or onnx here.

Everything the model needs to be fed correctly (labels, input size, resize rule) comes from the model's
own metadata, so callers never guess.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from .data import RESIZE_RULE, ImageSource, prepare_image
from .errors import FlowerxError

log = logging.getLogger("flowerx")
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class Predictor:
    """Classify images with an exported flowerx model.

    >>> p = Predictor("model.onnx")
    >>> p.predict("daisy.jpg", top_k=1)
    [('daisy', 0.995...)]

    providers: "auto" (CUDA when onnxruntime-gpu and a GPU are present, else CPU), "cpu" or "cuda".
    labels / input_size: only for ONNX models without flowerx metadata.
    Thread-safe: one Predictor may serve many threads at once.
    """

    def __init__(
        self, path: str | os.PathLike, providers: str = "auto", labels: Sequence[str] | None = None,
        input_size: int | None = None, threads: int = 0,
    ):
        self.path = Path(path)
        if providers not in ("auto", "cpu", "cuda"):
            raise FlowerxError(f"providers must be 'auto', 'cpu' or 'cuda', not {providers!r}")
        available = ort.get_available_providers()
        if providers == "cuda" and "CUDAExecutionProvider" not in available:
            raise FlowerxError("providers='cuda' needs onnxruntime-gpu in place of onnxruntime, and a GPU (README: On a GPU)")
        wanted = PROVIDERS["cuda"] if providers != "cpu" and "CUDAExecutionProvider" in available else PROVIDERS["cpu"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=wanted)
        except FileNotFoundError:
            raise FlowerxError(f"{self.path}: no such model file") from None
        except Exception as e:  # onnxruntime raises its own types for bad files
            if not self.path.is_file():
                raise FlowerxError(f"{self.path}: no such model file") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FlowerxError(f"{self.path}: not a valid ONNX model ({first[:200]})") from None
        self.provider = self.session.get_providers()[0]
        if providers == "cuda" and self.provider != "CUDAExecutionProvider":
            raise FlowerxError("CUDA was asked for but onnxruntime could not start it (no GPU or CUDA libraries?)")
        log.info("flowerx: running %s on %s", self.path.name, self.provider)

        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.labels, self.input_size = self._read_contract(labels, input_size)
        if self.metadata.get("resize", RESIZE_RULE) != RESIZE_RULE:
            raise FlowerxError(f"{self.path.name} wants resize rule {self.metadata['resize']!r}; flowerx feeds "
                               f"{RESIZE_RULE!r} only")
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def _read_contract(self, labels: Sequence[str] | None, input_size: int | None) -> tuple[list[str], int]:
        name = self.path.name
        try:
            labels = list(labels) if labels is not None else json.loads(self.metadata["labels"])
            size = int(input_size) if input_size is not None else int(self.metadata["input_size"])
        except KeyError:
            raise FlowerxError(
                f"{name} has no flowerx metadata (labels, input_size): pass labels and input_size "
                "(--labels FILE --input-size S at the command line)"
            ) from None
        except (ValueError, TypeError) as e:
            raise FlowerxError(f"{name}: unreadable flowerx metadata ({e})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(shape) != 4 or shape[3] != 3 or any(
            isinstance(d, int) and d != size for d in shape[1:3]
        ):
            raise FlowerxError(f"{name}: input must be one [N, {size}, {size}, 3] tensor, got {shape}")
        if inputs[0].type != "tensor(uint8)":
            raise FlowerxError(f"{name}: input must be uint8 RGB, got {inputs[0].type}")
        out = outputs[0].shape
        if len(out) != 2 or (isinstance(out[1], int) and out[1] != len(labels)):
            raise FlowerxError(f"{name}: the model has {out[-1]} outputs but {len(labels)} labels")
        return [str(label) for label in labels], size

    def preprocess(self, image: ImageSource) -> np.ndarray:
        """One image -> uint8 [S, S, 3], exactly as the model was trained (raises ImageError)."""
        return prepare_image(image, self.input_size)

    def probabilities(self, images: Sequence[ImageSource] | np.ndarray) -> np.ndarray:
        """Class probabilities [N, num_classes] in label order, for images or a ready uint8 [N, S, S, 3] batch
        (an ndarray of 2 or 3 dimensions is one image)."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            images = [images]
        if isinstance(images, np.ndarray):
            size = self.input_size
            if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
                raise FlowerxError(f"a ready batch must be uint8 [N, {size}, {size}, 3], got {images.dtype} "
                                   f"{list(images.shape)}")
            batch = images
        else:
            batch = np.stack([self.preprocess(image) for image in images])
        return self.session.run([self._output], {self._input: np.ascontiguousarray(batch)})[0]

    def _ranked(self, probs: np.ndarray, top_k: int | None) -> list[tuple[str, float]]:
        order = np.argsort(-probs, kind="stable")[: top_k or len(self.labels)]
        return [(self.labels[i], float(probs[i])) for i in order]

    def predict(self, image: ImageSource, top_k: int | None = None) -> list[tuple[str, float]]:
        """(label, score) pairs for one image (path, bytes, PIL image or uint8 array), best first."""
        return self._ranked(self.probabilities([image])[0], top_k)

    def predict_batch(
        self, images: Sequence[ImageSource], top_k: int | None = None, batch_size: int = 32
    ) -> list[list[tuple[str, float]]]:
        """predict() for many images, decoded in parallel and run in batches. Raises on the first bad image."""
        results = []
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(images), batch_size):
                batch = np.stack(list(pool.map(self.preprocess, images[start : start + batch_size])))
                results.extend(self._ranked(p, top_k) for p in self.probabilities(batch))
        return results
