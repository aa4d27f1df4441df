"""Converters from the training framework to the portable ONNX model flowerx serves.

A leaf package: it imports nothing from flowerx (flowerx calls it). `names` holds the graph's tensor and node
names, which flowerx.contract re-exports; failures raise ExportError.
"""


class ExportError(ValueError):
    """A conversion that cannot be trusted (outputs differ from the source, not finite, no head): nothing
    is written. The message fits one line."""
