"""flowerx: retrain an ImageNet network's last layer on your folders of images, ship one ONNX file.

`import flowerx` is light: it never imports TensorFlow, tf2onnx or onnx, and loads onnxruntime only
when a Predictor is first used.
"""

from .errors import FlowerxError, ImageError

__version__ = "0.1.0"
__all__ = ["Predictor", "FlowerxError", "ImageError", "__version__"]


def __getattr__(name: str):
    if name == "Predictor":
        from .predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'flowerx' has no attribute {name!r}")
