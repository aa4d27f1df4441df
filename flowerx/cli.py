"""The `flowerx` command: parses arguments, calls the library, prints. Nothing else lives here.

retrain.py / label_image.py spellings with underscores (--image_dir) are accepted as well as kebab case.
Everything printed that comes from users or models (file names, labels, metadata, messages quoting them)
goes through `printable` and is printed as plain text, never as rich markup.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .errors import FlowerxError, ImageError
from .events import printable

if TYPE_CHECKING:  # rich is imported when first needed: `flowerx classify one.jpg` prints plain lines
    from rich.table import Table

DESCRIPTION = (
    "Teach an ImageNet network new image classes in minutes: train a new last layer on your folders "
    "of images, export one ONNX file, classify with it anywhere (no TensorFlow needed to classify)."
)
EPILOG = (
    "Quick start: flowerx download-flowers; flowerx train --image-dir flower_photos; "
    "flowerx classify photo.jpg. Add -h after a command for its flags."
)
TRAIN_MODULES = ("tensorflow", "keras", "tf2onnx", "onnx")  # what the [train] extra installs


class _Console:
    """A rich Console made on first use (importing rich costs about 35 ms, a tenth of a one-image classify).
    Piped output gets wide tables rather than rich's 80-column default."""

    def __init__(self, stderr: bool = False):
        self.stderr, self._console = stderr, None

    @property
    def made(self) -> bool:
        return self._console is not None

    def rich(self):
        """The rich Console itself (made now if it was not)."""
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self.stderr else sys.stdout
            width = None if self.stderr or stream.isatty() or os.environ.get("COLUMNS") else 200
            self._console = Console(stderr=self.stderr, highlight=False, soft_wrap=True, emoji=False, width=width)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.rich(), name)


out = _Console()
err = _Console(stderr=True)


def say(console, text: object, style: str = "") -> None:
    """One line of text from users or models, escaped (printable): unstyled lines before any rich output
    are written as they are (the same characters rich would write, rich not loaded)."""
    if not style and isinstance(console, _Console) and not console.made:
        stream = sys.stderr if console.stderr else sys.stdout
        # While a progress bar shows, rich stands a proxy in for sys.stdout that prints through the bar's
        # console (stderr): results go to the real stdout, as rich's own consoles write them.
        stream = getattr(stream, "rich_proxied_file", stream)
        stream.write(printable(text) + "\n")
        stream.flush()
        return
    from rich.text import Text

    console.print(Text(printable(text), style=style))


def warn(console, text: object) -> None:
    from rich.text import Text

    console.print(Text.assemble(("warning:", "yellow"), " ", printable(text)))


def _amount_column():
    """The progress column: done/total and the rate since the task's work began (images or bytes); nothing
    for a plain step."""
    from rich.filesize import decimal
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Amount(ProgressColumn):
        def render(self, task) -> Text:
            unit = task.fields.get("unit", "")
            if not unit:
                return Text("")
            show = decimal if unit == "B" else str
            total = task.total
            amount = f"{show(int(task.completed))}/{show(int(total))}" if total else show(int(task.completed))
            elapsed = time.monotonic() - task.fields["t0"]
            done = task.completed - task.fields["n0"]
            rate = (
                ""
                if elapsed <= 0 or done <= 0
                else (f" {decimal(int(done / elapsed))}/s" if unit == "B" else f" {done / elapsed:.0f} {unit}/s")
            )
            return Text(amount + rate)

    return Amount()


class Reporter:
    """Prints the core's events (flowerx.events.Events): messages as plain lines, progress as bars.
    verbosity -1 (-q): warnings only; 0: info and step lines, bars; 1 (-v): details too."""

    def __init__(self, verbosity: int = 0, console=out, transient: bool = False):
        self.verbosity, self.console, self.transient = verbosity, console, transient
        self._bars = None  # a rich Progress while bars are shown
        self._tasks: dict[str, int] = {}
        self._lock = threading.RLock()

    def events(self):
        from .events import Events

        return Events(message=self.message, progress=self.progress)

    def message(self, kind: str, text: str) -> None:
        if (kind == "detail" and self.verbosity < 1) or (kind in ("info", "step") and self.verbosity < 0):
            return
        with self._lock:
            console = self._bars.console if self._bars else self.console
            warn(console, text) if kind == "warning" else say(console, text)

    def progress(self, task: str, done: int, total: int | None, unit: str = "") -> None:
        if self.verbosity < 0:
            return
        with self._lock:
            if self._bars is None:
                from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

                self._bars = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    _amount_column(),
                    TimeRemainingColumn(),
                    console=self.console.rich() if isinstance(self.console, _Console) else self.console,
                    transient=self.transient,
                )
                self._bars.start()
                self._tasks = {}
            if task not in self._tasks:
                from rich.markup import escape

                self._tasks[task] = self._bars.add_task(
                    escape(printable(task)), total=total, unit=unit, t0=time.monotonic(), n0=done
                )
            self._bars.update(self._tasks[task], completed=done, total=total)
            if total is not None and done >= total:
                if not unit:  # a one-time step (e.g. the network's export) ended: rates count from now
                    for other in self._bars.tasks:
                        other.fields.update(t0=time.monotonic(), n0=other.completed)
                if all(t.finished for t in self._bars.tasks):
                    self.close()

    def close(self) -> None:
        with self._lock:
            if self._bars is not None:
                self._bars.stop()
                self._bars = None


def _normalize_flags(argv: list[str]) -> list[str]:
    """--image_dir=x -> --image-dir=x, so retrain.py's commands work unchanged; arguments after `--` are
    left alone."""
    fixed = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return fixed + argv[i:]
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            flag, eq, value = arg.partition("=")
            arg = flag.replace("_", "-") + eq + value
        fixed.append(arg)
    return fixed


def _common(common: argparse.ArgumentParser | None = None, default: object = argparse.SUPPRESS):
    """-q / -v, before the command (flowerx -q train) or after it (flowerx train -q)."""
    common = common or argparse.ArgumentParser(add_help=False)
    level = common.add_mutually_exclusive_group()
    level.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        default=default,
        help="print only warnings, errors and the final lines",
    )
    level.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const=1,
        dest="verbosity",
        default=default,
        help="print details too (paths, caches, run folders)",
    )
    return common


def _add_train(sub, common, full: bool = True) -> None:
    p = sub.add_parser(
        "train",
        parents=[common],
        help="retrain the last layer on a folder of images and export one ONNX file",
        description="Cache bottlenecks, train a softmax layer on them, export base + head as one ONNX file "
        "(with its labels and preprocessing). retrain.py's underscore spellings (--image_dir) work too.",
    )
    if not full:  # another command runs: its flags are not needed, nor the modules that define them
        return
    from .train import GROUPS, TrainConfig

    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in fields(TrainConfig):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        group = groups[meta["group"]]
        if isinstance(f.default, bool):
            group.add_argument(flag, action="store_true", help=meta["help"])
            continue
        shown = "" if meta.get("required") or meta.get("derived") or f.default == "" else f" (default: {f.default})"
        group.add_argument(
            flag,
            type=type(f.default),
            default=f.default,
            help=meta["help"] + shown,
            required=bool(meta.get("required")),
            choices=meta.get("choices"),
            nargs=meta.get("nargs"),
            const=meta.get("const"),
            metavar=None
            if meta.get("choices")
            else meta.get("metavar")
            or {"graph": "PATH", "labels": "PATH"}.get(f.name.split("_")[-1], f.name.split("_")[-1].upper()),
        )
    groups["output"].add_argument(
        "--json", metavar="PATH", help="also write the run's result (accuracies, counts, timings) as JSON to PATH"
    )


def _add_model_flags(p) -> None:
    p.add_argument("--graph", default="model.onnx", help="the ONNX model (default: model.onnx)")
    p.add_argument(
        "--labels",
        help="labels file, for an ONNX model without flowerx metadata (or to rename a flowerx model's: same count)",
    )
    p.add_argument("--input-size", type=int, help="input side S, for an ONNX model without flowerx metadata")
    p.add_argument(
        "--providers",
        default="auto",
        choices=["auto", "cpu", "cuda", "openvino", "openvino-bf16"],
        help="execution provider (default: auto: CUDA, else OpenVINO, where installed, else the CPU)",
    )


def _add_follow_links(p) -> None:
    p.add_argument(
        "--follow-links", action="store_true", help="follow folder links that lead outside the folders given"
    )


def _add_classify(sub, common) -> None:
    p = sub.add_parser("classify", parents=[common], help="classify images with a flowerx ONNX model (no TensorFlow)")
    p.add_argument("images", nargs="*", help="image files or folders of images")
    p.add_argument("--image", action="append", default=[], help="an image (label_image.py spelling); repeatable")
    _add_model_flags(p)
    p.add_argument("--top-k", type=int, default=5, help="labels to print per image (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--output",
        metavar="FILE",
        help="write one row per image to FILE (.jsonl, .csv or .parquet) instead of printing, streaming",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="with --output: run on Ray Data (a local Ray instance, or ADDRESS as ray.init takes it)",
    )
    p.add_argument("--list", metavar="FILE", help="also classify the images named in FILE, one path a line")
    _add_follow_links(p)


def _add_evaluate(sub, common) -> None:
    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="accuracy, per-class precision/recall and confusion matrix on a labelled folder",
    )
    _add_model_flags(p)
    p.add_argument("--image-dir", required=True, help="folder of class subfolders named as the model's labels")
    p.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "validation", "test"],
        help="evaluate only this part of the training run's split (default: all)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--output", help="also write the JSON report to this file")
    _add_follow_links(p)


def _add_bench(sub, common, full: bool = True) -> None:
    p = sub.add_parser(
        "bench",
        parents=[common],
        help="latency tables across model sizes and runtimes",
        description="Each runtime is timed in its own process. Sizes without local pretrained "
        "weights are built with random weights (latency does not depend on them).",
    )
    if not full:
        return
    from .bench import DEFAULT_ARCHITECTURES, RUNTIMES

    p.add_argument("--architectures", nargs="+", help=f"models to bench (default: {' '.join(DEFAULT_ARCHITECTURES)})")
    p.add_argument("--full", action="store_true", help="the 16 MobileNet v1 sizes and Inception V3")
    p.add_argument("--quick", action="store_true", help="a smoke test that finishes in under a minute")
    p.add_argument("--graph", nargs="+", default=[], help="also bench these trained flowerx models (float, int8)")
    p.add_argument("--image-dir", help="labelled folder: adds the trained model's accuracy")
    p.add_argument("--model-dir", help="pretrained weights folder (default: Keras' cache)")
    p.add_argument(
        "--work-dir", default=".flowerx/bench", help="where prepared models are kept (default: .flowerx/bench)"
    )
    p.add_argument(
        "--runtimes",
        nargs="+",
        choices=RUNTIMES,
        help="runtimes to time (default: all; openvino and openvino-bf16 where onnxruntime-openvino is installed)",
    )
    p.add_argument("--threads", nargs="+", type=int, help="thread counts (default: 1 and all cores)")
    p.add_argument("--runs", type=int, help="batch-1 runs per measurement, at most (default: 100)")
    p.add_argument("--seconds", type=float, help="time budget per batch-1 measurement (default: 3)")
    p.add_argument("--batch", type=int, help="batch size for throughput (default: 32)")
    p.add_argument(
        "--rounds",
        type=int,
        help="time everything N times, interleaved, each time in a new process, and keep each row's median "
        "(default: 1; for noisy machines)",
    )
    p.add_argument("--wide", action="store_true", help="every column in the table (default: the main ones)")
    p.add_argument("--json", metavar="PATH", help="write the results (with the machine's description) as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", metavar="PATH", help="draw latency vs. accuracy (or MACs) to a PNG")


def _add_export_int8(sub, common) -> None:
    from exporters.names import CALIBRATIONS

    p = sub.add_parser(
        "export-int8", parents=[common], help="write an int8 (static QDQ) copy of a trained model, if accurate enough"
    )
    p.add_argument("--graph", default="model.onnx", help="the trained float model (default: model.onnx)")
    p.add_argument("--image-dir", required=True, help="the labelled folder it was trained on (calibration, test)")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        help="points of test accuracy the int8 model may lose, else it is not written (default: 1.0)",
    )
    p.add_argument(
        "--int8-calibration",
        choices=CALIBRATIONS,
        default="minmax",
        help="how activation ranges are calibrated: the extremes, or a percentile (99.999) or entropy of "
        "histograms built batch by batch (default: minmax)",
    )
    _add_follow_links(p)


def _add_export(sub, common) -> None:
    p = sub.add_parser("export", parents=[common], help="package a trained model for another platform")
    kinds = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    web = kinds.add_parser(
        "web",
        parents=[common],
        help="a static web page that classifies photos in the browser (onnxruntime-web)",
        description="Write DIR/index.html, its script, the model and its labels: a page that classifies a "
        "dropped or pasted photo in the browser. Serve DIR with any static server (python -m http.server).",
    )
    web.add_argument("--graph", default="model.onnx", help="the trained model (default: model.onnx)")
    web.add_argument("--out", required=True, metavar="DIR", help="folder to write: new, empty or an earlier export")
    web.add_argument(
        "--ort-from",
        metavar="NODE_MODULES",
        help="copy onnxruntime-web from this node_modules (offline use) instead of loading it from its CDN",
    )


def _add_serve(sub, common, full: bool = True) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="serve models over HTTP: classify, KServe v2, health, metrics, a page",
        description='Serve models over HTTP (pip install "flowerx[serve]"). Binds to localhost unless --host '
        "says otherwise; SIGTERM or Ctrl-C drains in-flight requests and exits 0; SIGHUP reloads the models.",
    )
    if not full:
        return
    try:
        from .serve import ServeConfig
    except ModuleNotFoundError as e:  # flowerx serve -h without the extra
        raise FlowerxError(f'flowerx serve needs {e.name}: pip install "flowerx[serve]"') from None
    d = ServeConfig(graphs=[])
    p.add_argument("--graph", nargs="+", required=True, metavar="[NAME=]MODEL", help="models to serve")
    flags = (  # (flag, ServeConfig field, type, help); each default is ServeConfig's
        ("--host", "host", str, "address to bind"),
        ("--port", "port", int, "port"),
        ("--workers", "workers", int, "processes (one per core to use)"),
        ("--threads", "threads", int, "onnxruntime threads per model (0: its default)"),
        ("--decode-threads", "decode_threads", int, "decoding threads (0: one per core)"),
        ("--max-batch", "max_batch", int, "images per model call"),
        ("--max-wait-ms", "max_wait_ms", float, "how long a batch may wait for more images"),
        ("--max-queue", "max_queue", int, "images queued per model before 503"),
        ("--max-requests", "max_requests", int, "classify requests in progress (bodies in memory) before 503"),
        ("--max-body-mb", "max_body_mb", float, "request size limit (413 past it)"),
        ("--request-timeout", "request_timeout_s", float, "seconds a client may take to send its request"),
        ("--top-k", "top_k", int, "labels per image unless ?top_k="),
    )
    for flag, name, kind, text in flags:
        p.add_argument(
            flag, dest=name, type=kind, default=getattr(d, name), help=f"{text} (default: {getattr(d, name)})"
        )
    p.add_argument("--watch", action="store_true", help="reload a model when its file is replaced")
    p.add_argument(
        "--log-format",
        dest="log_format",
        choices=("text", "json"),
        default=d.log_format,
        help="one line per request (default: text)",
    )


def _add_download(sub, common) -> None:
    p = sub.add_parser(
        "download-flowers", parents=[common], help="download the tutorial's flower photos (CC-BY) to train on"
    )
    p.add_argument("--dest", default=".", help="folder to put flower_photos/ in (default: .)")


class _Parser(argparse.ArgumentParser):
    """argparse, with the offending words of a usage error escaped for the terminal (they are the user's)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {printable(message)}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command that runs, the other commands' flags (and the modules that define
    them: training, bench, serve) are left out, so `flowerx classify` imports only what classifying needs."""
    from . import __version__

    parser = _Parser(prog="flowerx", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"flowerx {__version__}")
    _common(parser, default=0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()
    for add in (_add_train, _add_bench, _add_serve):  # the ones whose flags come from heavier modules
        add(sub, common, full=command in (None, add.__name__.removeprefix("_add_")))
    for add in (_add_classify, _add_evaluate, _add_export_int8, _add_export, _add_download):
        add(sub, common)
    return parser


def _need_train_extra(command: str) -> None:
    """Training needs TensorFlow and the converters: say which extra installs them, before any work."""
    missing = [m for m in TRAIN_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise FlowerxError(
            f'flowerx {command} needs {", ".join(missing)}: pip install "flowerx[train]" '
            "(the base install only classifies)"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from . import train
    from .fileio import atomic_write

    cfg = train.TrainConfig(**{f.name: getattr(args, f.name) for f in fields(train.TrainConfig)})
    cfg.check()
    _need_train_extra("train")
    if args.json:
        args.json = os.path.expanduser(args.json)
        cfg.check_paths(also={"--json": args.json})
    reporter = Reporter(args.verbosity)
    try:
        result = train.run(cfg, reporter.events())
    finally:
        reporter.close()
    if args.json:
        atomic_write(Path(args.json).expanduser(), json.dumps(result.to_dict(), indent=2).encode())
    if result.test_count:
        say(out, f"Final test accuracy = {result.test_accuracy * 100:.1f}% (N={result.test_count})")
    else:
        fix = "add a test/ folder" if result.split_by_folders else "raise --testing-percentage"
        say(out, f"Final test accuracy = n/a (N=0: no test images; {fix})")
    if cfg.print_misclassified_test_images:
        say(out, "=== MISCLASSIFIED TEST IMAGES ===")
        for relpath, predicted, true in result.misclassified:
            say(out, f"{printable(relpath):>70}  predicted {predicted}, is {true}")
    if result.int8 is not None:
        say(out, result.int8.message, style="" if result.int8.written else "yellow")
    t = result.timings
    say(
        out,
        f"Wrote {result.output_graph} and {result.output_labels} "
        f"(ONNX matches Keras to {result.parity_max_diff:.1e}); "
        f"bottlenecks {t['bottlenecks_s']:.1f} s, head {t['head_s']:.1f} s, "
        + (f"fine-tuning {t['fine_tune_s']:.1f} s, " if "fine_tune_s" in t else "")
        + f"export {t['export_s']:.1f} s, "
        f"total {t['total_s']:.1f} s",
    )
    return 0


def _predictor(args: argparse.Namespace):
    from .predictor import Predictor, read_labels_file

    labels = read_labels_file(args.labels) if args.labels else None
    return Predictor(args.graph, args.providers, labels, args.input_size)


def cmd_classify(args: argparse.Namespace) -> int:
    from .batch import is_uri, list_uri
    from .data import list_images

    sources = [os.path.expanduser(s) for s in list(args.images) + list(args.image)]  # (a URI is left as it is)
    named = len(sources)  # a list file's URIs name files: not listed, one request each
    if args.list:
        sources += _read_list(args.list)
    if not sources:
        raise FlowerxError("give at least one image (or folder) to classify")
    if args.top_k <= 0:
        raise FlowerxError("--top-k must be positive")
    if args.ray is not None and not args.output:
        raise FlowerxError("--ray writes its rows to a file: give --output predictions.parquet (or .jsonl, .csv)")
    paths: list = []
    for n, source in enumerate(sources):
        if is_uri(source):
            if not args.output:
                raise FlowerxError(f"{source}: a storage URI is classified into a file: give --output")
            paths.extend(list_uri(source) if n < named else [source])
        else:
            paths.extend(list_images(source, args.follow_links) if os.path.isdir(source) else [Path(source)])
    if not paths:
        raise FlowerxError(f"no images found in {', '.join(sources)}")
    if args.output:
        return _classify_to_file(args, paths)
    predictor = _predictor(args)
    kind = "probabilities" if predictor.probabilities_out else "scores"
    if not predictor.probabilities_out and not args.json:
        warn(err, f"{args.graph}: its outputs are scores, not probabilities (they do not sum to 1)")
    results, failures = [], 0
    reporter = Reporter(args.verbosity if len(paths) > 1 and not args.json else -1, err, transient=True)
    try:
        for n, path in enumerate(paths):
            reporter.progress("Classifying", n, len(paths), "img")
            try:
                ranked = predictor.predict(path, args.top_k)
                results.append(
                    {"image": str(path), "predictions": [{"label": p.label, "score": p.score} for p in ranked]}
                )
            except ImageError as e:
                failures += 1
                results.append({"image": str(path), "error": str(e)})
                say(err, f"error: {e}")
                continue
            if not args.json:
                if len(paths) > 1:
                    say(out, path, style="bold")
                for p in ranked:
                    say(out, f"{p.label} {p.score:.5f}")
        reporter.progress("Classifying", len(paths), len(paths), "img")
    finally:
        reporter.close()
    if args.json:
        print(
            json.dumps(
                {"model": str(args.graph), "provider": predictor.provider, "output": kind, "results": results}, indent=2
            )
        )
    return 1 if failures else 0


def _read_list(path: str) -> list[str]:
    """A list file: one image path a line (blank lines skipped), relative to the current folder."""
    from .fileio import read_regular

    try:
        text = read_regular(os.path.expanduser(path), 256 << 20).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FlowerxError(f"cannot read the list file {path}: {getattr(e, 'strerror', None) or e}") from None
    return [os.path.expanduser(line.strip()) for line in text.splitlines() if line.strip()]


def _classify_to_file(args: argparse.Namespace, paths: list[Path]) -> int:
    from .batch import classify_to_file
    from .fileio import check_outputs

    if args.labels or args.input_size:
        raise FlowerxError("--output classifies with flowerx models only (their metadata): drop --labels/--input-size")
    if args.list:
        check_outputs({"--output": args.output}, {"--list": args.list})
    reporter = Reporter(args.verbosity, err, transient=True)
    try:
        result = classify_to_file(
            args.graph,
            paths,
            args.output,
            args.top_k,
            ray=args.ray is not None,
            address=args.ray or None,
            on_progress=lambda done, total: reporter.progress("Classifying", done, total, "img"),
        )
    finally:
        reporter.close()
    say(out, f"Wrote {result.output}: {result.images} images, {result.failed} could not be classified")
    return 1 if result.failed else 0


def _table(title: str, columns: list[str], left: tuple[str, ...] = ("label",)) -> Table:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(printable(title)), box=box.SIMPLE_HEAD)
    for column in columns:
        table.add_column(Text(printable(column)), justify="left" if column in left else "right", overflow="fold")
    return table


def _row(table: Table, *cells: object) -> None:
    from rich.text import Text

    table.add_row(*(Text(printable(c)) for c in cells))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .fileio import atomic_write, check_outputs

    if args.output:
        args.output = os.path.expanduser(args.output)
        inputs = {"--graph": args.graph, "--labels": args.labels}
        check_outputs({"--output": args.output}, inputs, {"image dir": args.image_dir})
    predictor = _predictor(args)
    reporter = Reporter(-1 if args.verbosity < 0 else 0, err, transient=True)
    try:
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            reporter.progress("Evaluating", done[0], None, "img")

        report = evaluate(predictor, args.image_dir, args.split, on_progress=advance, follow_links=args.follow_links)
    finally:
        reporter.close()
    for _, reason in report.failed:
        warn(err, f"skipped {reason}")
    if args.output:
        atomic_write(Path(args.output).expanduser(), report.to_json().encode())
    if args.json:
        print(report.to_json())
        return 0
    table = _table(
        f"{Path(args.graph).name} on {args.image_dir} ({report.split}): "
        f"accuracy {report.accuracy * 100:.1f}% (N={report.count})",
        ["label", "precision", "recall", "support"],
    )
    for i, label in enumerate(report.labels):
        _row(table, label, f"{report.precision[i]:.3f}", f"{report.recall[i]:.3f}", report.support[i])
    out.print(table)
    matrix = _table("confusion matrix (rows: true, columns: predicted)", ["", *report.labels], left=("",))
    for label, row in zip(report.labels, report.confusion):
        _row(matrix, label, *row)
    out.print(matrix)
    return 0


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


# (column, value of a row); the first ones are the default table, readable at 80 columns; --wide adds the rest.
BENCH_COLUMNS = [
    ("model", lambda r: r.model),
    ("runtime", lambda r: "flowerx" if r.runtime == "onnxruntime" else r.runtime),
    ("thr", lambda r: r.threads),
    ("ms", lambda r: _num(r.median_ms, ".2f")),
    ("x", lambda r: _num(r.ratio, ".2f")),
    ("img/s", lambda r: _num(r.throughput_ips, ".0f")),
    ("acc %", lambda r: _num(r.accuracy and r.accuracy * 100, ".1f")),
]
BENCH_WIDE = [
    ("weights", lambda r: r.weights),
    ("p90", lambda r: _num(r.p90_ms, ".2f")),
    ("p99", lambda r: _num(r.p99_ms, ".2f")),
    ("MB", lambda r: _num(r.file_mb, ".1f")),
    ("params M", lambda r: _num(r.params and r.params / 1e6, ".2f")),
    ("MMACs", lambda r: _num(r.macs and r.macs / 1e6, ".0f")),
    ("load s", lambda r: _num(r.load_s, ".2f")),
    ("peak MB", lambda r: _num(r.peak_mb, ".0f")),
]


def bench_table(report, wide: bool = False) -> tuple[Table, list[str]]:
    """The bench rows as a table (the main columns, or every one with wide), and a note per row that was
    skipped or failed (why, and what to install), printed under it."""
    from .bench import cpu_label

    columns = BENCH_COLUMNS + (BENCH_WIDE if wide else [])
    table = _table(
        f"flowerx bench: {cpu_label(report.machine)} (ms: median "
        f"batch-1 latency; x: latency / flowerx's, same threads; img/s at batch "
        f"{report.config.get('batch')})",
        [name for name, _ in columns],
        left=("model", "runtime"),
    )
    notes = []
    for r in report.rows:
        if r.status != "ok":
            notes.append(f"[{len(notes) + 1}] {r.model}, {BENCH_COLUMNS[1][1](r)}, {r.threads} thr: {r.status}")
            _row(
                table,
                r.model,
                BENCH_COLUMNS[1][1](r),
                r.threads,
                f"{r.status.split(':')[0]} [{len(notes)}]",
                *[""] * (len(columns) - 4),
            )
            continue
        _row(table, *(value(r) for _, value in columns))
    return table, notes


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    from .architectures import ARCHITECTURES, default_model_dir
    from .fileio import atomic_write, check_folder, check_outputs

    if args.quick and args.full:
        raise FlowerxError("--quick and --full exclude each other")
    outputs = {flag: path for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)) if path}
    outputs = {flag: os.path.expanduser(path) for flag, path in outputs.items()}
    args.json, args.csv, args.plot = (outputs.get(flag) for flag in ("--json", "--csv", "--plot"))
    if args.plot and Path(args.plot).suffix.lower() not in bench.PLOT_FORMATS:
        raise FlowerxError(f"--plot must end in {', '.join(bench.PLOT_FORMATS)}, not {Path(args.plot).name!r}")
    models = Path(args.model_dir or default_model_dir()).expanduser()
    weights = {f"weights {a.weights_file}": models / a.weights_file for a in ARCHITECTURES.values()}
    check_outputs(outputs, {**{f"--graph {g}": g for g in args.graph}, **weights}, {"image dir": args.image_dir})
    if args.work_dir:
        check_folder(args.work_dir, "--work-dir")
    options = {
        k: v
        for k, v in dict(
            graphs=tuple(os.path.expanduser(g) for g in args.graph) or None,
            image_dir=args.image_dir,
            model_dir=args.model_dir,
            work_dir=args.work_dir,
            runtimes=tuple(args.runtimes) if args.runtimes else None,
            threads=tuple(args.threads) if args.threads else None,
            runs=args.runs,
            seconds=args.seconds,
            batch=args.batch,
            rounds=args.rounds,
            architectures=bench.FULL_ARCHITECTURES if args.full else args.architectures,
        ).items()
        if v is not None
    }
    if args.graph and not args.architectures and not args.full:
        options.setdefault("architectures", [])
    cfg = bench.BenchConfig.quick(**options) if args.quick else bench.BenchConfig(**options)
    reporter = Reporter(-1 if args.verbosity < 0 else 0, err, transient=True)

    def step(description: str, done: int, total: int) -> None:
        reporter.progress("bench", done, total, "")
        reporter.message("detail", description)

    try:
        report = bench.run(cfg, step)
    finally:
        reporter.close()
    table, notes = bench_table(report, args.wide)
    out.print(table)
    for note in notes:
        say(out, note)
    for e in report.end_to_end:
        if e.get("speedup"):
            say(
                out,
                f"End to end, classify one image ({e['model']}): flowerx {e['flowerx_s']:.2f} s, "
                f"TensorFlow {e['tensorflow_s']:.2f} s: {e['speedup']:.1f}x faster",
            )
        else:
            say(
                out,
                f"End to end ({e['model']}): flowerx {_num(e['flowerx_s'], '.2f')} s ({e['flowerx_status']}); "
                f"TensorFlow: {e['tensorflow_status']}",
            )
    if args.json:
        atomic_write(args.json, report.to_json().encode())
    if args.csv:
        atomic_write(args.csv, report.to_csv().encode())
    if args.plot:
        bench.plot(report, args.plot)
    return 0


def cmd_export_int8(args: argparse.Namespace) -> int:
    _need_train_extra("export-int8")
    from .quantize import export_int8

    reporter = Reporter(args.verbosity, err)
    result = export_int8(
        os.path.expanduser(args.graph),
        args.image_dir,
        args.max_accuracy_drop,
        reporter.events(),
        follow_links=args.follow_links,
        calibration=args.int8_calibration,
    )
    if not result.written:
        say(err, f"error: {result.message}")
        return 1
    say(out, result.message)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .webexport import export_web

    result = export_web(args.graph, args.out, args.ort_from)
    say(out, f"Wrote {result.out}/ ({', '.join(result.files)}); onnxruntime-web from {result.ort}")
    say(out, f"Try it: python -m http.server -d {result.out} 8000, then open http://localhost:8000/")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServeConfig, serve
    except ModuleNotFoundError as e:
        raise FlowerxError(f'flowerx serve needs {e.name}: pip install "flowerx[serve]"') from None
    cfg = ServeConfig(
        graphs=args.graph, **{f.name: getattr(args, f.name) for f in fields(ServeConfig) if f.name in args}
    )
    cfg.check()
    if args.verbosity < 0:
        cfg.log_level = "warning"
    say(err, f"flowerx serve: http://{cfg.host}:{cfg.port}/ ({', '.join(cfg.models())})")
    serve(cfg)
    return 0


def cmd_download_flowers(args: argparse.Namespace) -> int:
    from .data import download_flowers

    reporter = Reporter(args.verbosity, err, transient=True)
    try:
        path = download_flowers(args.dest, lambda done, total: reporter.progress("flower_photos.tgz", done, total, "B"))
    finally:
        reporter.close()
    say(out, f"{path}: flower photos ready (CC-BY: keep {path / 'LICENSE.txt'} with any copy)")
    return 0


COMMANDS = {
    "train": cmd_train,
    "classify": cmd_classify,
    "evaluate": cmd_evaluate,
    "bench": cmd_bench,
    "export-int8": cmd_export_int8,
    "export": cmd_export,
    "serve": cmd_serve,
    "download-flowers": cmd_download_flowers,
}


def main(argv: list[str] | None = None) -> int:
    argv = _normalize_flags(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the first word: -q/-v may come before
    try:
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    except FlowerxError as e:
        say(err, f"error: {e}")
        return 2
    from PIL import Image

    # flowerx refuses oversized images itself, with one line per file; PIL's own warning would repeat it.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        return COMMANDS[args.command](args)
    except FlowerxError as e:
        say(err, f"error: {e}")
        return 2
    except KeyboardInterrupt:
        say(err, "interrupted: stopped; caches written so far are kept and the next run resumes")
        return 130
    except ModuleNotFoundError as e:  # an extra that is not installed, met on a lazy import
        if os.environ.get("FLOWERX_DEBUG"):
            raise
        hint = ' (pip install "flowerx[train]")' if (e.name or "").split(".")[0] in TRAIN_MODULES else ""
        say(err, f"error: flowerx {args.command} needs the {e.name} package{hint}")
        return 2
    except Exception as e:  # never a traceback at the CLI; FLOWERX_DEBUG=1 shows it
        if os.environ.get("FLOWERX_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        say(err, f"error: unexpected {type(e).__name__}: {first} (FLOWERX_DEBUG=1 shows the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
