"""Tensor and node names of a flowerx graph: the uint8 `image` input, the `probs` output, and the head's
three nodes (MatMul, Add, Softmax) appended to the feature network."""

INPUT = "image"
OUTPUT = "probs"
FEATURES = "features"  # the output of a feature network (no head)
HEAD_PREFIX = "head/"
HEAD_MATMUL = "head/MatMul"
HEAD_ADD = "head/Add"
HEAD_SOFTMAX = "head/Softmax"
HEAD_KERNEL = "head/kernel"
HEAD_BIAS = "head/bias"
