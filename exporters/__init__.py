"""Converters from the training framework to the portable ONNX model flowerx serves."""
