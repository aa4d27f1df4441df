"""Tensor and node names of a flowerx graph: the uint8 `image` input, the `probs` and `labels` outputs, the
resize in front of the network (`preprocess/`) and the head's three nodes (MatMul, Add, Softmax)."""

INPUT = "image"
OUTPUT = "probs"
LABELS = "labels"  # contract 2: the labels as UTF-8 JSON bytes, for clients without a metadata API
LABELS_PREFIX = "labels/"
FEATURES = "features"  # the output of a feature network (no head)
PREPROCESS_PREFIX = "preprocess/"
RESIZED = "preprocess/resized"  # contract 2: the image resized to S x S, what the network itself takes
HEAD_PREFIX = "head/"
HEAD_MATMUL = "head/MatMul"
HEAD_ADD = "head/Add"
HEAD_SOFTMAX = "head/Softmax"
HEAD_KERNEL = "head/kernel"
HEAD_BIAS = "head/bias"
# How an int8 model's activation ranges were calibrated (exporters.int8; recorded in its training metadata)
CALIBRATIONS = ("minmax", "percentile", "entropy")
