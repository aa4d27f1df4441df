"""The `flowerx` command: parses arguments, calls the library, prints. Nothing else lives here.

retrain.py / label_image.py spellings with underscores (--image_dir) are accepted as well as kebab case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import FlowerxError, ImageError

# Piped output gets wide tables rather than rich's 80-column default.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)

TRAIN_HELP = {
    "image_dir": "folder of class subfolders of images; subfolder names are the labels",
    "architecture": "mobilenet_<1.0|0.75|0.50|0.25>_<224|192|160|128> or inception_v3",
    "model_dir": "pretrained-weights cache: the Keras weights file is looked for here, downloaded here if absent",
    "bottleneck_dir": "cache of per-image bottleneck features, reused by later runs",
    "summaries_dir": "TensorBoard summaries (tensorboard --logdir DIR); empty to disable",
    "experiment_name": "TensorBoard run name, replaced on each run (default: the architecture)",
    "output_graph": "where to write the trained ONNX model",
    "output_labels": "where to write the labels, one per line (default: labels.txt beside the graph)",
    "how_many_training_steps": "training steps of the softmax layer",
    "learning_rate": "SGD learning rate",
    "testing_percentage": "percentage of images held out for the final test",
    "validation_percentage": "percentage of images used for validation",
    "eval_step_interval": "evaluate and print every this many steps",
    "train_batch_size": "bottlenecks per training step",
    "validation_batch_size": "validation images per evaluation (-1: all)",
    "test_batch_size": "test images for the final accuracy (-1: all)",
    "print_misclassified_test_images": "list the test images the model gets wrong",
    "bottleneck_batch_size": "images per network call when computing bottlenecks",
    "seed": "random seed of the head's training",
    "flip_left_right": "distortion: mirror training views at random",
    "random_crop": "distortion: crop margin of training views, percent",
    "random_scale": "distortion: random up-scaling of training views before the crop, up to this percent",
    "random_brightness": "distortion: multiply training views' brightness by 1 +- up to this percent",
    "distorted_views": "distorted views cached per training image when a distortion is on",
    "fine_tune_blocks": "after the head, also train the network's top N blocks on fresh distorted views "
                        "(0: head only; MobileNet 1-13, 13 = all; Inception V3 1-10)",
    "fine_tune_learning_rate": "Adam learning rate of fine-tuning (cosine-decayed over the epochs)",
    "fine_tune_epochs": "fine-tuning epochs at most (early stopping on validation accuracy, patience 3 counted from half of them)",
    "quantize": "also write <graph>.int8.onnx: static int8 (QDQ), head re-fitted to it (none or int8)",
    "max_accuracy_drop": "with --quantize int8: points of test accuracy the int8 model may lose, else not written",
}


def _normalize_flags(argv: list[str]) -> list[str]:
    """--image_dir=x -> --image-dir=x, so retrain.py's commands work unchanged."""
    fixed = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            flag, eq, value = arg.partition("=")
            arg = flag.replace("_", "-") + eq + value
        fixed.append(arg)
    return fixed


def _add_train(sub) -> None:
    from .train import TrainConfig

    p = sub.add_parser(
        "train", help="retrain the last layer on a folder of images and export one ONNX file",
        description="Cache bottlenecks, train a softmax layer on them, export base + head as ONNX. "
        "retrain.py's underscore spellings (--image_dir) are accepted too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" or isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=TRAIN_HELP[f.name])
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            p.add_argument(flag, type=kind, default=f.default, help=TRAIN_HELP[f.name], required=f.name == "image_dir",
                           choices=["none", "int8"] if f.name == "quantize" else None)


def _add_classify(sub) -> None:
    p = sub.add_parser("classify", help="classify images with a flowerx ONNX model (no TensorFlow)")
    p.add_argument("images", nargs="*", help="image files or folders of images")
    p.add_argument("--image", action="append", default=[], help="an image (label_image.py spelling); repeatable")
    p.add_argument("--graph", default="model.onnx", help="the ONNX model (default: model.onnx)")
    p.add_argument("--labels", help="labels file, for an ONNX model without flowerx metadata")
    p.add_argument("--input-size", type=int, help="input side S, for an ONNX model without flowerx metadata")
    p.add_argument("--top-k", type=int, default=5, help="labels to print per image (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--providers", default="auto", choices=["auto", "cpu", "cuda"], help="execution provider")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class precision/recall and confusion matrix on a labelled folder")
    p.add_argument("--graph", default="model.onnx", help="the ONNX model (default: model.onnx)")
    p.add_argument("--image-dir", required=True, help="folder of class subfolders named as the model's labels")
    p.add_argument("--split", default="all", choices=["all", "train", "validation", "test"],
                   help="evaluate only this part of the training run's split (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--output", help="also write the JSON report to this file")
    p.add_argument("--providers", default="auto", choices=["auto", "cpu", "cuda"], help="execution provider")


def _add_bench(sub) -> None:
    from .bench import DEFAULT_ARCHITECTURES, RUNTIMES

    p = sub.add_parser("bench", help="latency tables across model sizes and runtimes",
                       description="Each runtime is timed in its own process. Sizes without local pretrained "
                       "weights are built with random weights (latency does not depend on them).")
    p.add_argument("--architectures", nargs="+", help=f"models to bench (default: {' '.join(DEFAULT_ARCHITECTURES)})")
    p.add_argument("--full", action="store_true", help="the 16 MobileNet v1 sizes and Inception V3")
    p.add_argument("--quick", action="store_true", help="a smoke test that finishes in under a minute")
    p.add_argument("--graph", nargs="+", default=[], help="also bench these trained flowerx models (float, int8)")
    p.add_argument("--image-dir", help="labelled folder: adds the trained model's accuracy")
    p.add_argument("--model-dir", help="pretrained weights folder (default: Keras' cache)")
    p.add_argument("--work-dir", default=".flowerx/bench", help="where prepared models are kept (default: .flowerx/bench)")
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, help="runtimes to time (default: all)")
    p.add_argument("--threads", nargs="+", type=int, help="thread counts (default: 1 and all cores)")
    p.add_argument("--runs", type=int, help="batch-1 runs per measurement, at most (default: 100)")
    p.add_argument("--seconds", type=float, help="time budget per batch-1 measurement (default: 3)")
    p.add_argument("--batch", type=int, help="batch size for throughput (default: 32)")
    p.add_argument("--json", metavar="PATH", help="write the results (with the machine's description) as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", metavar="PATH", help="draw latency vs. accuracy (or MACs) to a PNG")


def _add_export_int8(sub) -> None:
    p = sub.add_parser("export-int8", help="write an int8 (static QDQ) copy of a trained model, if accurate enough")
    p.add_argument("--graph", default="model.onnx", help="the trained float model (default: model.onnx)")
    p.add_argument("--image-dir", required=True, help="the labelled folder it was trained on (calibration, test)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="points of test accuracy the int8 model may lose, else it is not written (default: 1.0)")


def _add_download(sub) -> None:
    p = sub.add_parser("download-flowers", help="download the tutorial's flower photos (CC-BY) to train on")
    p.add_argument("--dest", default=".", help="folder to put flower_photos/ in (default: .)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="flowerx", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"flowerx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_classify(sub)
    _add_evaluate(sub)
    _add_bench(sub)
    _add_export_int8(sub)
    _add_download(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from . import train

    cfg = train.TrainConfig(**{f.name: getattr(args, f.name) for f in fields(train.TrainConfig)})
    result = train.run(cfg, out)
    if result.test_count:
        out.print(f"Final test accuracy = {result.test_accuracy * 100:.1f}% (N={result.test_count})")
    else:
        out.print("Final test accuracy = n/a (N=0: no test images; raise --testing-percentage)")
    if cfg.print_misclassified_test_images:
        out.print("=== MISCLASSIFIED TEST IMAGES ===")
        for relpath, predicted, true in result.misclassified:
            out.print(f"{relpath:>70}  predicted {predicted}, is {true}")
    if result.int8 is not None:
        out.print(result.int8.message, style=None if result.int8.written else "yellow")
    t = result.timings
    out.print(
        f"Wrote {result.output_graph} and {result.output_labels} "
        f"(ONNX matches Keras to {result.parity_max_diff:.1e}); "
        f"bottlenecks {t['bottlenecks_s']:.1f} s, head {t['head_s']:.1f} s, export {t['export_s']:.1f} s, "
        f"total {t['total_s']:.1f} s"
    )
    return 0


def _read_labels(path: str | None) -> list[str] | None:
    if path is None:
        return None
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise FlowerxError(f"cannot read labels file {path}: {e.strerror or e}") from None


def cmd_classify(args: argparse.Namespace) -> int:
    from .data import list_images
    from .predictor import Predictor

    sources = list(args.images) + list(args.image)
    if not sources:
        raise FlowerxError("give at least one image (or folder) to classify")
    if args.top_k <= 0:
        raise FlowerxError("--top-k must be positive")
    predictor = Predictor(args.graph, args.providers, _read_labels(args.labels), args.input_size)
    paths = []
    for source in sources:
        paths.extend(list_images(Path(source)) if os.path.isdir(source) else [Path(source)])
    if not paths:
        raise FlowerxError(f"no images found in {', '.join(sources)}")
    results, failures = [], 0
    for path in paths:
        try:
            ranked = predictor.predict(path, args.top_k)
            results.append({"image": str(path), "predictions": [{"label": l, "score": s} for l, s in ranked]})
        except ImageError as e:
            failures += 1
            results.append({"image": str(path), "error": str(e)})
            err.print(f"error: {e}")
            continue
        if not args.json:
            if len(paths) > 1:
                out.print(f"[bold]{path}[/]")
            for label, score in ranked:
                out.print(f"{label} {score:.5f}")
    if args.json:
        print(json.dumps({"model": str(args.graph), "provider": predictor.provider, "results": results}, indent=2))
    return 1 if failures else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .evaluate import evaluate
    from .predictor import Predictor

    predictor = Predictor(args.graph, args.providers)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("Evaluating", total=None)
        report = evaluate(predictor, args.image_dir, args.split, on_progress=lambda n: progress.advance(task, n))
    for _, reason in report.failed:
        err.print(f"[yellow]warning:[/] skipped {reason}")
    if args.output:
        from .fileio import atomic_write

        atomic_write(args.output, report.to_json().encode())
    if args.json:
        print(report.to_json())
        return 0
    table = Table(title=f"{Path(args.graph).name} on {args.image_dir} ({report.split}): "
                        f"accuracy {report.accuracy * 100:.1f}% (N={report.count})")
    for column in ("label", "precision", "recall", "support"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for i, label in enumerate(report.labels):
        table.add_row(label, f"{report.precision[i]:.3f}", f"{report.recall[i]:.3f}", str(report.support[i]))
    out.print(table)
    matrix = Table(title="confusion matrix (rows: true, columns: predicted)")
    matrix.add_column("")
    for label in report.labels:
        matrix.add_column(label, justify="right")
    for label, row in zip(report.labels, report.confusion):
        matrix.add_row(label, *map(str, row))
    out.print(matrix)
    return 0


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from . import bench
    from .fileio import atomic_write

    if args.quick and args.full:
        raise FlowerxError("--quick and --full exclude each other")
    options = {k: v for k, v in dict(
        graphs=tuple(args.graph) or None, image_dir=args.image_dir, model_dir=args.model_dir, work_dir=args.work_dir,
        runtimes=tuple(args.runtimes) if args.runtimes else None, threads=tuple(args.threads) if args.threads else None,
        runs=args.runs, seconds=args.seconds, batch=args.batch,
        architectures=bench.FULL_ARCHITECTURES if args.full else args.architectures,
    ).items() if v is not None}
    if args.graph and not args.architectures and not args.full:
        options.setdefault("architectures", [])
    cfg = bench.BenchConfig.quick(**options) if args.quick else bench.BenchConfig(**options)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("bench", total=bench.steps(cfg))

        def step(description: str) -> None:
            progress.update(task, description=description, advance=1)

        report = bench.run(cfg, step)
    table = Table(title=f"flowerx bench: {report.machine['cpu']}, {report.machine['cores']} cores "
                        f"(batch-1 latency; x = latency / flowerx's, same threads)")
    columns = ["model", "runtime", "thr", "weights", "median ms", "p90", "p99", "x", f"img/s @{cfg.batch}",
               "MB", "params M", "MMACs", "load s", "peak MB", "acc %"]
    for c in columns:
        table.add_column(c, justify="left" if c in ("model", "runtime", "weights") else "right")
    for r in report.rows:
        if r.status != "ok":
            table.add_row(r.model, r.runtime, str(r.threads), r.weights, f"[dim]{r.status}[/]")
            continue
        table.add_row(
            r.model, "flowerx (onnxruntime)" if r.runtime == "onnxruntime" else r.runtime, str(r.threads), r.weights,
            _num(r.median_ms, ".2f"), _num(r.p90_ms, ".2f"), _num(r.p99_ms, ".2f"), _num(r.ratio, ".2f"),
            _num(r.throughput_ips, ".0f"), _num(r.file_mb, ".1f"), _num(r.params and r.params / 1e6, ".2f"),
            _num(r.macs and r.macs / 1e6, ".0f"), _num(r.load_s, ".2f"), _num(r.peak_mb, ".0f"),
            _num(r.accuracy and r.accuracy * 100, ".1f"),
        )
    out.print(table)
    for e in report.end_to_end:
        if e.get("speedup"):
            out.print(f"End to end, classify one image ({e['model']}): flowerx {e['flowerx_s']:.2f} s, "
                      f"TensorFlow {e['tensorflow_s']:.2f} s: {e['speedup']:.1f}x faster")
        else:
            out.print(f"End to end ({e['model']}): flowerx {_num(e['flowerx_s'], '.2f')} s ({e['flowerx_status']}); "
                      f"TensorFlow: {e['tensorflow_status']}")
    if args.json:
        atomic_write(args.json, report.to_json().encode())
    if args.csv:
        atomic_write(args.csv, report.to_csv().encode())
    if args.plot:
        bench.plot(report, args.plot)
    return 0


def cmd_export_int8(args: argparse.Namespace) -> int:
    from .quantize import export_int8

    result = export_int8(args.graph, args.image_dir, args.max_accuracy_drop, err)
    if not result.written:
        err.print(f"error: {result.message}")
        return 1
    out.print(result.message)
    return 0


def cmd_download_flowers(args: argparse.Namespace) -> int:
    from .data import download_flowers

    path = download_flowers(args.dest)
    out.print(f"{path}: flower photos ready (CC-BY: keep {path / 'LICENSE.txt'} with any copy)")
    return 0


COMMANDS = {"train": cmd_train, "classify": cmd_classify, "evaluate": cmd_evaluate, "bench": cmd_bench,
            "export-int8": cmd_export_int8, "download-flowers": cmd_download_flowers}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_normalize_flags(sys.argv[1:] if argv is None else argv))
    try:
        return COMMANDS[args.command](args)
    except FlowerxError as e:
        err.print(f"error: {e}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted: stopped; caches written so far are kept and the next run resumes")
        return 130
    except Exception as e:  # never a traceback at the CLI; FLOWERX_DEBUG=1 shows it
        if os.environ.get("FLOWERX_DEBUG"):
            raise
        err.print(f"error: unexpected {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                  "(FLOWERX_DEBUG=1 shows the traceback)", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
