"""Issue 14, target 1, the other road: can richer *frozen* features lift the head alone (seconds, no
fine-tuning) towards 94% on mobilenet_1.0_224? Each variant is one forward pass of the ImageNet network over
the flower photos, then flowerx's own head (flowerx.head.train_head, retrain.py's recipe) on seeds 0-2,
judged on validation (the test split is reported beside it, not chosen on).

    python -m benchmarks.frozen_features --shared ../shared --json benchmarks/results/frozen_features.json

About 5 minutes on the 2-core machine. Keras features, not the exported ONNX network's (they agree to about
1e-5, the export's parity check), decoded exactly as the bottleneck pass decodes (flowerx.data.prepare_image).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flowerx.bench import machine_info
from flowerx.fileio import atomic_write

ARCHITECTURE = "mobilenet_1.0_224"
LAST = "conv_pw_13_relu"  # Keras' pooling="avg" pools this one: flowerx's bottleneck
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Variant:
    name: str
    size: int  # input side, pixels
    layers: tuple[str, ...]  # average-pooled and joined
    mirror: bool = False  # the mean of the photo's features and its mirror image's
    standardize: bool = False  # each value z-scored on the training split (joined layers have other scales)
    cost: float = 1.0  # forward passes of the 224-pixel network per image


VARIANTS = (
    Variant("the last block, 224 px (flowerx's bottleneck)", 224, (LAST,)),
    Variant("the last block, 288 px", 288, (LAST,), cost=(288 / 224) ** 2),
    Variant("the last block, z-scored, 224 px (a control for the next row)", 224, (LAST,), standardize=True),
    Variant(
        "blocks 11, 12 and 13 joined, z-scored, 224 px",
        224,
        ("conv_pw_11_relu", "conv_pw_12_relu", LAST),
        standardize=True,
    ),
    Variant("the last block, photo and mirror averaged, 224 px", 224, (LAST,), mirror=True, cost=2.0),
)


def pooled_features(items: list, base, size: int, layers: set[str], mirror: bool) -> dict:
    """{(layer, mirrored): [N, C] average-pooled activations} of base (flowerx.backbone.build_base, any size)
    at size x size."""
    from flowerx.architectures import get_architecture
    from flowerx.backbone import keras, tf
    from flowerx.data import prepare_image

    arch = get_architecture(ARCHITECTURE)
    with ThreadPoolExecutor() as pool:
        images = np.stack(list(pool.map(lambda item: prepare_image(item.path, size), items)))
    names = sorted(layers)
    net = keras.Model(base.input, [base.get_layer(n).output for n in names])

    @tf.function
    def run(batch):
        out = net((tf.cast(batch, tf.float32) - arch.mean) / arch.std, training=False)
        return [tf.reduce_mean(a, axis=[1, 2]) for a in (out if isinstance(out, list) else [out])]

    features = {}
    for mirrored in (False, True) if mirror else (False,):
        view = images[:, :, ::-1] if mirrored else images
        parts = [run(view[i : i + 32]) for i in range(0, len(view), 32)]
        for k, name in enumerate(names):
            features[name, mirrored] = np.concatenate([p[k].numpy() for p in parts])
    return features


def design(variant: Variant, features: dict, train: np.ndarray) -> np.ndarray:
    """The head's input for a variant: pooled layers, joined, z-scored where the variant says so."""
    views = (False, True) if variant.mirror else (False,)
    blocks = [np.mean([features[variant.size, layer, m] for m in views], axis=0) for layer in variant.layers]
    x = np.concatenate(blocks, axis=1).astype(np.float32)
    if variant.standardize:
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-3)
    return x


def measure(shared: Path) -> list[dict]:
    from flowerx.architectures import get_architecture
    from flowerx.backbone import build_base
    from flowerx.data import discover, split_names
    from flowerx.head import HeadConfig, accuracy_of, train_head
    from flowerx.train import TrainConfig

    dataset = discover(shared / "flower_photos")
    defaults = TrainConfig()  # flowerx train's split
    names = split_names(dataset.items, defaults.validation_percentage, defaults.testing_percentage)
    splits = {s: np.flatnonzero(names == s) for s in ("train", "validation", "test")}
    y = np.array([item.label for item in dataset.items])
    arch = get_architecture(ARCHITECTURE)
    base = build_base(arch, shared / "models" / arch.weights_file, any_size=True)  # one network for every size
    features: dict = {}
    for size in sorted({v.size for v in VARIANTS}):
        wanted = [v for v in VARIANTS if v.size == size]
        layers = {layer for v in wanted for layer in v.layers}
        start = time.perf_counter()
        found = pooled_features(dataset.items, base, size, layers, any(v.mirror for v in wanted))
        features.update({(size, *key): value for key, value in found.items()})
        print(f"{size} px: features of {len(y)} photos in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for variant in VARIANTS:
        x = design(variant, features, splits["train"])
        runs = []
        for seed in SEEDS:
            kernel, bias, _ = train_head(x, y, splits, len(dataset.labels), HeadConfig(seed=seed))
            runs.append({s: 100 * accuracy_of(x, y, splits[s], kernel, bias) for s in ("validation", "test")})
        row = {**asdict(variant), "features": x.shape[1], "seeds": list(SEEDS), "runs": runs}
        row.update({s: float(np.mean([r[s] for r in runs])) for s in ("validation", "test")})
        rows.append(row)
        print(f"{variant.name:52} validation {row['validation']:5.1f}%  test {row['test']:5.1f}%", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="holds flower_photos/ and models/")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/frozen_features.json"))
    args = parser.parse_args()
    rows = measure(args.shared)
    report = {
        "machine": machine_info(),
        "architecture": ARCHITECTURE,
        "measured": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, json.dumps(report, indent=2).encode())
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
