"""retrain.py's bottleneck loop, today: per image read, decode, one TensorFlow model call; the baseline of
train_speed.py, run in its own process (TensorFlow beside onnxruntime slows it):

    python -m benchmarks.per_image_loop --arch mobilenet_1.0_224 --model-dir ../shared/models \
        --image-dir ../shared/flower_photos --count 300        # prints {"images_per_s": ...}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def per_image_loop(args: argparse.Namespace) -> None:
    """retrain.py's bottleneck loop, today: per image read, decode, one TensorFlow model call. Prints img/s."""
    from flowerx.architectures import get_architecture
    from flowerx.backbone import build_base, build_feature_model, tf
    from flowerx.data import list_images, prepare_image

    arch = get_architecture(args.arch)
    model = build_feature_model(arch, build_base(arch, Path(args.model_dir) / arch.weights_file))
    size = arch.input_size
    fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8)])
    found = list_images(Path(args.image_dir))
    paths = found[:: max(1, len(found) // args.count)]
    fn(prepare_image(paths[0], size)[None])  # trace
    start = time.perf_counter()
    for path in paths[: args.count]:
        fn(prepare_image(path.read_bytes(), size)[None]).numpy()
    print(json.dumps({"images_per_s": min(len(paths), args.count) / (time.perf_counter() - start)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.per_image_loop", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--image-dir", required=True)
    parser.add_argument("--count", type=int, default=300)
    per_image_loop(parser.parse_args(argv))


if __name__ == "__main__":
    main()
