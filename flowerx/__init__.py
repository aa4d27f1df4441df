"""flowerx: retrain an ImageNet network's last layer on your folders of images, ship one ONNX file.

`import flowerx` is light: it never imports TensorFlow, tf2onnx or onnx, loads onnxruntime only when a
Predictor is first used, and changes nothing in the host process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import FlowerxError, ImageError

if TYPE_CHECKING:  # type checkers see the lazy names below
    from .predictor import Prediction, Predictor

__version__ = "0.2.0"
__all__ = ["Predictor", "Prediction", "FlowerxError", "ImageError", "__version__"]


def __getattr__(name: str):
    if name in ("Predictor", "Prediction"):
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'flowerx' has no attribute {name!r}")
