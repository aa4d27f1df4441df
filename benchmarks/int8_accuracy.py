"""int8 accuracy, fairly: flowerx's int8 model against LiteRT's own full-integer int8 of the same trained
network, beside the float model, on the flower photos' validation and test splits.

    python -m benchmarks.int8_accuracy --shared ../shared --json benchmarks/results/int8_accuracy.json

For each architecture and --seed: `flowerx train --head-only --quantize int8 --max-accuracy-drop 100` (so
the int8 model is written whatever its drop), then, in its own process (TensorFlow), the same float network
with the same head converted by TFLiteConverter to int8 ops with uint8 in and out, calibrated on the same
200 training images as flowerx's (flowerx.quantize.calibration_set), its head quantized as converted,
not re-fitted: what a LiteRT user gets. About 15 minutes on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.train_speed import flowers_args, run_flowerx_train
from flowerx.bench import machine_info

ARCHITECTURES = ("mobilenet_0.25_224", "mobilenet_1.0_224")
SEEDS = (0, 1, 2)
SPLITS = ("validation", "test")


def litert_int8(graph: Path, image_dir: Path, model_dir: Path) -> dict[str, float]:
    """LiteRT's int8 of a trained flowerx float model: accuracy per split (runs TensorFlow: call it in its own
    process, `python -m benchmarks.int8_accuracy litert ...`)."""
    import onnx
    from ai_edge_litert.interpreter import Interpreter

    from flowerx.architectures import get_architecture
    from flowerx.backbone import build_base, build_classifier, build_feature_model, tf
    from flowerx.contract import HEAD_BIAS, HEAD_KERNEL
    from flowerx.data import prepare_image
    from flowerx.predictor import Predictor
    from flowerx.quantize import CALIBRATION_IMAGES, calibration_set, labelled_split

    contract = Predictor(graph, providers="cpu").contract
    arch = get_architecture(contract.architecture)
    items, y, names = labelled_split(contract, graph.name, str(image_dir), False)
    head = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(graph)).graph.initializer}
    features = build_feature_model(arch, build_base(arch, model_dir / arch.weights_file))
    model = build_classifier(features, head[HEAD_KERNEL], head[HEAD_BIAS])
    seed = int((contract.training.get("config") or {}).get("seed", 0))
    images = calibration_set(items, names, arch.input_size, seed, CALIBRATION_IMAGES)
    with tempfile.TemporaryDirectory(prefix="flowerx-litert-") as tmp:
        model.export(f"{tmp}/savedmodel", format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(f"{tmp}/savedmodel")
        # the same conversion as flowerx bench's litert-int8 rows (flowerx.bench_workers._int8_tflite)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([images[i : i + 1]] for i in range(len(images)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.uint8
        interpreter = Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    image_in, probs_out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    accuracy = {}
    for split in SPLITS:
        hits = []
        for i in np.flatnonzero(names == split):
            interpreter.set_tensor(image_in, prepare_image(items[i].path, arch.input_size)[None])
            interpreter.invoke()
            hits.append(int(interpreter.get_tensor(probs_out)[0].argmax()) == y[i])
        accuracy[split] = float(np.mean(hits))
    return accuracy


def flowerx_accuracy(graph: Path, image_dir: Path) -> dict[str, float]:
    from flowerx.evaluate import evaluate
    from flowerx.predictor import Predictor

    predictor = Predictor(graph, providers="cpu")
    return {split: evaluate(predictor, str(image_dir), split).accuracy for split in SPLITS}


def row(arch: str, seed: int, shared: Path, work: Path) -> dict:
    graph = work / arch / f"seed{seed}" / "model.onnx"
    extra = ["--quantize", "int8", "--max-accuracy-drop", "100", "--seed", str(seed)]
    run_flowerx_train([*flowers_args(arch, shared, work / "bottlenecks", graph), *extra], graph.with_suffix(".json"))
    litert = subprocess.run(
        [sys.executable, "-m", "benchmarks.int8_accuracy", "litert", str(graph), str(shared / "flower_photos"),
         str(shared / "models")],
        capture_output=True, text=True,
    )  # fmt: skip
    if litert.returncode != 0:
        raise SystemExit(f"LiteRT int8 of {graph} failed:\n{litert.stderr[-3000:]}")
    figures = {
        "float": flowerx_accuracy(graph, shared / "flower_photos"),
        "flowerx_int8": flowerx_accuracy(graph.with_name("model.int8.onnx"), shared / "flower_photos"),
        "litert_int8": json.loads(litert.stdout.strip().splitlines()[-1]),
    }
    percent = {kind: {split: round(v * 100, 2) for split, v in f.items()} for kind, f in figures.items()}
    return {"architecture": arch, "seed": seed, **percent}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["litert"]:  # the worker: one trained model, TensorFlow in this process only
        print(json.dumps(litert_int8(*map(Path, argv[1:4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared", type=Path, help="folder with flower_photos/ and models/")
    parser.add_argument("--json", default="benchmarks/results/int8_accuracy.json", type=Path)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowerx-int8-accuracy-") as tmp:
        for arch in args.architectures:
            for seed in args.seeds:
                rows.append(row(arch, seed, args.shared, Path(tmp)))
                r = rows[-1]
                print(
                    f"{arch:<20} seed {seed}  validation / test: float {r['float']['validation']:.1f} / "
                    f"{r['float']['test']:.1f}%  flowerx int8 {r['flowerx_int8']['validation']:.1f} / "
                    f"{r['flowerx_int8']['test']:.1f}%  LiteRT int8 {r['litert_int8']['validation']:.1f} / "
                    f"{r['litert_int8']['test']:.1f}%",
                    flush=True,
                )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
