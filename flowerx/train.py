"""`flowerx train`: cache bottlenecks, train a softmax layer on them, export base + head as one ONNX file.

TensorFlow is imported only inside the functions that need it, so that `TrainConfig` (used by the CLI to
build its parser) costs nothing to import.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from . import __version__
from .architectures import (
    Architecture,
    default_model_dir,
    feature_export_path,
    get_architecture,
    resolve_weights,
    weights_fingerprint,
)
from .bottlenecks import (
    CACHE_FORMATS,
    SHARD_THRESHOLD,
    BottleneckCache,
    BottleneckStats,
    get_bottlenecks,
    open_cache,
    stream_session,
)
from .contract import FEATURES, Contract
from .data import Dataset, Distortion, ImageItem, discover, prepare_image, split_names
from .errors import FlowerxError, ImageError
from .events import QUIET, Events
from .fileio import atomic_write, check_folder, check_outputs
from .finetune import (
    FineTuneConfig,
    FineTuneResult,
    OverBudget,
    cut_layer,
    epochs_that_fit,
    fine_tune,
    recipe,
    shortened_epochs,
)
from .head import HeadConfig, predict_logits, sample, train_head
from .quantize import CALIBRATIONS, Int8Result, check_int8_arguments, export_int8, int8_path


def _option(default, help: str, group: str, **more) -> object:
    """A config field with its command-line help and group (the CLI builds its flags from these)."""
    return field(default=default, metadata={"help": help, "group": group, **more})


GROUPS = ("data", "network", "head", "distortions", "fine-tuning", "int8", "output")


@dataclass
class TrainConfig:
    """Every knob of a training run; the CLI flags map one to one (retrain.py's names, kebab case)."""

    # data
    image_dir: str = _option(
        "",
        "folder of class subfolders of images (their names are the labels), or of "
        "train/, val/ and test/ folders of class subfolders (that split is used)",
        "data",
        required=True,
    )
    testing_percentage: float = _option(10.0, "percentage of images held out for the final test", "data")
    validation_percentage: float = _option(10.0, "percentage of images used for validation", "data")
    follow_links: bool = _option(
        False,
        "follow folder links that lead outside the image dir (each real folder and file is still read once)",
        "data",
    )
    # network
    architecture: str = _option(
        "mobilenet_1.0_224", "mobilenet_<1.0|0.75|0.50|0.25>_<224|192|160|128> or inception_v3", "network"
    )
    model_dir: str = _option(
        str(default_model_dir()),
        "pretrained-weights cache: the Keras weights file is looked for here, downloaded here if absent",
        "network",
    )
    bottleneck_dir: str = _option(
        ".flowerx/bottlenecks", "cache of per-image bottleneck features, reused by later runs", "network"
    )
    bottleneck_batch_size: int = _option(32, "images per network call when computing bottlenecks", "network")
    cache_format: str = _option(
        "auto",
        "bottleneck cache form: one .npy per image (files) or .npz shards of 4096 (shards, for network storage and "
        f"Ray); auto: what the cache already holds, else shards from {SHARD_THRESHOLD:,} images",
        "network",
        choices=CACHE_FORMATS,
    )
    ray: str = _option(
        "",
        "compute the bottlenecks (and distorted views) on Ray Data: a local Ray instance, or ADDRESS as ray.init "
        'takes it; the cache must be on a path every node reads ("flowerx[ray]")',
        "network",
        nargs="?",
        const="local",
        metavar="ADDRESS",
    )
    # head
    how_many_training_steps: int = _option(4000, "training steps of the softmax layer", "head")
    learning_rate: float = _option(0.01, "SGD learning rate of the softmax layer", "head")
    train_batch_size: int = _option(100, "bottlenecks per training step", "head")
    eval_step_interval: int = _option(100, "evaluate and print a step line every this many steps", "head")
    validation_batch_size: int = _option(-1, "validation images per evaluation (-1: all)", "head")
    test_batch_size: int = _option(-1, "test images for the final accuracy (-1: all)", "head")
    seed: int = _option(0, "random seed of the head's training (0 to 2**32-1)", "head")
    # distortions (retrain.py's flags; training images only)
    flip_left_right: bool = _option(False, "mirror training views at random", "distortions")
    random_crop: float = _option(0.0, "crop margin of training views, percent", "distortions")
    random_scale: float = _option(
        0.0, "random up-scaling of training views before the crop, up to this percent", "distortions"
    )
    random_brightness: float = _option(
        0.0, "multiply training views' brightness by 1 +- up to this percent", "distortions"
    )
    distorted_views: int = _option(
        4, "distorted views cached per training image when a distortion is on", "distortions"
    )
    # fine-tuning
    fine_tune_blocks: int = _option(
        -1,
        "after the head, also train the network's top N blocks on fresh distorted views (MobileNet 1-13, "
        "13 = all; Inception V3 1-10; 0: head only; -1: the architecture's recipe (the top 9 for MobileNet widths "
        "0.75-1.0 at 192-224 pixels, else all) when the run fits --time-budget)",
        "fine-tuning",
    )
    head_only: bool = _option(
        False, "train the new softmax layer only, as retrain.py did (--fine-tune-blocks 0)", "fine-tuning"
    )
    time_budget: float = _option(
        300.0,
        "seconds the whole run may take: with --fine-tune-blocks -1, fine-tuning runs when the estimate from "
        "its first steps fits, else with as many epochs as fit (at least 3), else the head alone is kept",
        "fine-tuning",
    )
    fine_tune_learning_rate: float = _option(
        0.0001, "Adam learning rate of fine-tuning (cosine-decayed over the epochs)", "fine-tuning"
    )
    fine_tune_epochs: int = _option(
        0,
        "fine-tuning epochs at most (early stopping on validation accuracy, patience 3 counted from half of them; "
        "0: the architecture's recipe, 6 for MobileNet widths 0.75-1.0 at 192-224 pixels and Inception V3, else 12)",
        "fine-tuning",
    )
    fine_tune_low_res: int = _option(
        -1,
        "progressive resizing: train the early fine-tuning epochs on views of this side in pixels (half the cost "
        "at 160 for a 224 network; 0, or one not below the network's: every epoch at the network's size; -1: "
        "the architecture's recipe, 160 for Inception V3, else 0)",
        "fine-tuning",
    )
    fine_tune_full_res_epochs: int = _option(
        2, "with --fine-tune-low-res: the last epochs that train at the network's own size", "fine-tuning"
    )
    # int8
    quantize: str = _option(
        "none",
        "also write <graph>.int8.onnx: static int8 (QDQ), head re-fitted to it",
        "int8",
        choices=("none", "int8"),
    )
    max_accuracy_drop: float = _option(
        1.0, "with --quantize int8: points of test accuracy the int8 model may lose, else it is not written", "int8"
    )
    int8_calibration: str = _option(
        "minmax",
        "with --quantize int8: activation ranges from the extremes, or a percentile (99.999) or entropy of "
        "histograms built batch by batch",
        "int8",
        choices=CALIBRATIONS,
    )
    # output
    output_graph: str = _option("model.onnx", "where to write the trained ONNX model", "output")
    output_labels: str = _option(
        "",
        "where to write the labels, one per line (default: <graph name>.labels.txt beside the graph)",
        "output",
        derived=True,
    )
    summaries_dir: str = _option(
        ".flowerx/summaries",
        "TensorBoard summaries (tensorboard --logdir DIR), one run folder per run; empty to disable",
        "output",
    )
    experiment_name: str = _option(
        "",
        "TensorBoard experiment: runs are kept under DIR/<name>/<date-time> (default: the architecture)",
        "output",
        derived=True,
    )
    print_misclassified_test_images: bool = _option(False, "list the test images the model gets wrong", "output")

    def __post_init__(self) -> None:
        for name in ("image_dir", "model_dir", "bottleneck_dir", "summaries_dir", "output_graph", "output_labels"):
            value = getattr(self, name)
            if value:  # ~ expanded once: the path checked is the path written
                setattr(self, name, os.path.expanduser(value))

    def check(self) -> None:
        """Reject impossible settings with one clear message, before any work."""
        if not self.image_dir:
            raise FlowerxError("--image-dir is required")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise FlowerxError(f"--{_flag(f.name)} must be a finite number, got {value}")
        for name in ("how_many_training_steps", "eval_step_interval", "train_batch_size", "bottleneck_batch_size"):
            if getattr(self, name) <= 0:
                raise FlowerxError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise FlowerxError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 <= self.seed < 2**32:
            raise FlowerxError(f"--seed must be in 0 to 2**32-1, got {self.seed}")
        for name in ("testing_percentage", "validation_percentage"):
            if not 0 <= getattr(self, name) < 100:
                raise FlowerxError(f"--{_flag(name)} must be in [0, 100), got {getattr(self, name)}")
        if self.testing_percentage + self.validation_percentage >= 100:
            raise FlowerxError(
                "--testing-percentage + --validation-percentage must leave images to train on "
                f"(they add up to {self.testing_percentage + self.validation_percentage})"
            )
        for name in ("random_crop", "random_scale", "random_brightness"):
            if not 0 <= getattr(self, name) < 100:
                raise FlowerxError(f"--{_flag(name)} must be a percentage in [0, 100)")
        if self.fine_tune_blocks < -1 or self.fine_tune_epochs < 0 or self.fine_tune_learning_rate <= 0:
            raise FlowerxError(
                "--fine-tune-blocks must be >= -1, --fine-tune-epochs >= 0, --fine-tune-learning-rate positive"
            )
        if self.time_budget <= 0:
            raise FlowerxError(f"--time-budget must be positive seconds, got {self.time_budget:g}")
        if self.fine_tune_low_res not in (-1, 0) and self.fine_tune_low_res < 96:
            raise FlowerxError(f"--fine-tune-low-res must be -1, 0 or at least 96 pixels, got {self.fine_tune_low_res}")
        if self.quantize == "int8":
            check_int8_arguments(self.max_accuracy_drop, self.int8_calibration)
        if self.distorted_views < 1:
            raise FlowerxError("--distorted-views must be at least 1")
        if self.quantize not in ("none", "int8"):
            raise FlowerxError(f"--quantize must be none or int8, not {self.quantize!r}")
        if self.cache_format not in CACHE_FORMATS:
            raise FlowerxError(f"--cache-format must be one of {', '.join(CACHE_FORMATS)}, not {self.cache_format!r}")
        for name in ("validation_batch_size", "test_batch_size"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise FlowerxError(f"--{_flag(name)} must be positive or -1 (all)")
        check_experiment_name(self.experiment_name)

    def check_paths(self, weights: Path | None = None, also: dict[str, str] | None = None) -> None:
        """Outputs (and the caller's own, also: flag -> path) distinct, writable, and not an input (the weights:
        where they will be, until they are found); cache and summary folders not files. Before any work."""
        outputs = {"--output-graph": self.output_graph, "--output-labels": self.labels_path, **(also or {})}
        if self.quantize == "int8":
            outputs["the int8 model"] = int8_path(self.output_graph)
        weights = weights or Path(self.model_dir).expanduser() / get_architecture(self.architecture).weights_file
        check_outputs(
            outputs, {"weights": weights}, {"image dir": self.image_dir, "bottleneck cache": self.bottleneck_dir}
        )
        check_folder(self.bottleneck_dir, "--bottleneck-dir")
        if self.summaries_dir:
            if not _is_utf8(self.summaries_dir):  # TensorBoard's writer cannot open such a path
                raise FlowerxError(f"--summaries-dir {self.summaries_dir!r} is not a UTF-8 path: choose another")
            check_folder(self.summaries_dir, "--summaries-dir")
            experiment = self.experiment_name or get_architecture(self.architecture).name
            check_folder(Path(self.summaries_dir) / experiment, "--experiment-name")

    @property
    def distortion(self) -> Distortion:
        return Distortion(self.flip_left_right, self.random_crop, self.random_scale, self.random_brightness)

    def fine_tune(self, arch: Architecture) -> FineTuneConfig:
        """The fine-tuning settings for arch: the flags, with the architecture's recipe where they say auto."""
        _, epochs, low_res = recipe(arch)
        return FineTuneConfig(
            self.fine_tune_blocks,
            self.fine_tune_learning_rate,
            self.fine_tune_epochs or epochs,
            distortion=self.distortion,
            seed=self.seed,
            low_res=low_res if self.fine_tune_low_res < 0 else self.fine_tune_low_res,
            full_res_epochs=self.fine_tune_full_res_epochs,
        )

    @property
    def head(self) -> HeadConfig:
        return HeadConfig(
            self.how_many_training_steps,
            self.learning_rate,
            self.train_batch_size,
            self.eval_step_interval,
            self.validation_batch_size,
            self.seed,
        )

    @property
    def labels_path(self) -> Path:
        graph = Path(self.output_graph).expanduser()
        return (
            Path(self.output_labels).expanduser() if self.output_labels else graph.with_name(f"{graph.stem}.labels.txt")
        )


def _flag(name: str) -> str:
    return name.replace("_", "-")


def check_experiment_name(name: str) -> None:
    """An experiment name is one folder name, never a path: it must not reach outside --summaries-dir."""
    if name and (
        name in (".", "..")
        or "/" in name
        or "\\" in name
        or os.sep in name
        or Path(name).is_absolute()
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or not _is_utf8(name)
    ):
        raise FlowerxError(
            f"--experiment-name must be a plain UTF-8 name (no /, \\, '..' or control characters), got {name!r}"
        )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def new_run_dir(parent: Path) -> Path:
    """A new folder parent/<UTC date-time> for this run's summaries (earlier runs are kept for comparison)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as e:
        raise FlowerxError(f"cannot make a run folder in {parent}: {e.strerror or e}") from None
    raise FlowerxError(f"cannot make a new run folder in {parent}")


@dataclass
class TrainResult:
    """What a run did, as data (the CLI prints it; `flowerx train --json` writes to_dict())."""

    architecture: str
    labels: list[str]
    image_count: int
    split_counts: dict[str, int]
    test_accuracy: float
    test_count: int
    validation_accuracy: float  # the head's last evaluation, or the kept fine-tuning epoch's
    output_graph: str
    output_labels: str
    bottlenecks: BottleneckStats
    parity_max_diff: float = float("nan")
    timings: dict[str, float] = field(default_factory=dict)
    misclassified: list[tuple[str, str, str]] = field(default_factory=list)  # (relpath, predicted, true)
    fine_tune: dict | None = None  # kept epoch, epochs run, resumed, ... when fine-tuning
    head_only_why: str = ""  # why the run kept the head alone when --fine-tune-blocks -1 let it choose
    split_by_folders: bool = False  # the image dir's train/, val/, test/ folders gave the split
    int8: Int8Result | None = None  # when --quantize int8

    def to_dict(self) -> dict:
        """Plain JSON data: NaN becomes None, paths strings."""
        data = asdict(self)
        if self.int8 is not None:
            data["int8"]["path"] = str(self.int8.path)
        return _json_safe(data)


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class _Networks:
    """The frozen network, built on first use: as Keras (for training and the export's parity check) and
    as a cached ONNX export that computes the bottlenecks on onnxruntime, faster than TensorFlow here."""

    def __init__(
        self, arch: Architecture, weights: Path, cache: BottleneckCache, items: Sequence[ImageItem], events: Events
    ):
        self.arch, self.weights, self.items, self.events = arch, weights, items, events
        # converted once per machine and weights file, shared by every bottleneck cache (a first run in a new
        # --bottleneck-dir pays only decode and inference); inside the cache if the user cache is not writable
        self.onnx_path = feature_export_path(arch, cache.weights_id)
        self.fallback_path = cache.dir / "features.onnx"
        self._base, self._keras, self._fn = None, None, None

    def base(self):
        if self._base is None:
            from .backbone import build_base

            self._base = build_base(self.arch, self.weights)
        return self._base

    def keras(self):
        """uint8 image -> pooled features (sharing base()'s layers)."""
        if self._keras is None:
            from .backbone import build_feature_model

            self._keras = build_feature_model(self.arch, self.base())
        return self._keras

    def sample_images(self, count: int = 8) -> np.ndarray:
        """A few real images of the dataset, for parity checks."""
        images = []
        for item in self.items:
            try:
                images.append(prepare_image(item.path, self.arch.input_size))
            except ImageError:
                continue
            if len(images) == count:
                break
        if not images:
            raise FlowerxError("none of the images can be read")
        return np.stack(images)

    def features_onnx(self) -> Path:
        """The feature network as ONNX (uint8 image -> features), converted once per architecture and
        weights and checked against Keras on real images."""
        if not self.onnx_path.is_file() and self.fallback_path.is_file():
            self.onnx_path = self.fallback_path
        if not self.onnx_path.is_file():
            from exporters import ExportError
            from exporters.onnx_export import FEATURES_ATOL, check_parity, keras_to_onnx

            task = f"Preparing {self.arch.name} (one-time export to ONNX)"
            self.events.progress(task, 0, None, "")
            data = keras_to_onnx(self.keras(), self.arch.input_size, output=FEATURES).SerializeToString()
            try:
                check_parity(data, self.keras(), self.sample_images(4), atol=FEATURES_ATOL, top1=False)
            except ExportError as e:
                raise FlowerxError(str(e)) from None
            try:
                atomic_write(self.onnx_path, data)
            except FlowerxError as e:  # a read-only home, say: keep it with the bottleneck cache instead
                self.events.detail(f"{e}; keeping the export in {self.fallback_path.parent}")
                self.onnx_path = self.fallback_path
                atomic_write(self.onnx_path, data)
            self.events.progress(task, 1, 1, "")
        return self.onnx_path

    def batch_fn(self) -> Callable:
        """The feature network as a stream_session, built once."""
        if self._fn is None:
            self._fn = stream_session(self.features_onnx().read_bytes())  # bytes: any folder name works
        return self._fn


def _pass(
    events: Events,
    title: str,
    items,
    cache: BottleneckCache,
    make_model: Callable,
    batch_size: int,
    view=None,
    keys: list | None = None,
):
    """One bottleneck pass, reporting progress and warnings (keys: as get_bottlenecks takes them)."""
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        events.progress(title, done[0], len(items), "img")

    events.progress(title, 0, len(items), "img")
    return get_bottlenecks(
        items, cache, make_model, batch_size, on_progress=advance, view=view, on_warning=events.warning, keys=keys
    )


EXPORT_RESERVE_S = 15  # --time-budget keeps this for the export after fine-tuning (about 5-10 s here)
INT8_RESERVE_S = 75  # and this for --quantize int8 (mobilenet_1.0_224 48-56 s here, half of it bias correction)
MIN_SPLIT = 20  # a validation or test split smaller than this gets a warning: one image moves it 5+ points
# where things are (or ran, or how the cache stores them), not the model
NOT_RECORDED = ("image_dir", "model_dir", "bottleneck_dir", "cache_format", "ray")


@dataclass
class _Job:
    """What the steps of one training run share."""

    cfg: TrainConfig
    events: Events
    arch: Architecture
    dataset: Dataset
    cache: BottleneckCache
    networks: _Networks
    summary_dir: Path | None = None  # this run's TensorBoard folder, made when the head starts training
    timings: dict[str, float] = field(default_factory=dict)
    deadline: float | None = None  # --fine-tune-blocks -1: a time.perf_counter() the run must end by

    @contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t


def run(cfg: TrainConfig, events: Events = QUIET) -> TrainResult:
    """The whole job, step by step: data and weights -> bottlenecks -> split -> (views) -> head ->
    (fine-tuning) -> test accuracy -> ONNX export -> (int8). Reports through events; never prints."""
    start = time.perf_counter()
    job = _prepare(cfg, events, start)
    cfg = job.cfg  # --fine-tune-blocks -1 and --head-only resolved
    with job.timed("bottlenecks_s"):
        features, ok, stats = _bottlenecks(job)
    labels = np.array([item.label for item in job.dataset.items])
    splits = _split(job, labels, ok)
    head_only_why = _head_only_why(job, splits, start)
    if head_only_why:
        cfg = job.cfg = replace(cfg, fine_tune_blocks=0)
    kernel, bias, val_acc = _head(job, features, labels, splits)
    test_idx = sample(splits["test"], cfg.test_batch_size, np.random.default_rng(cfg.seed + 1))
    predicted = predict_logits(features, test_idx, kernel, bias).argmax(1)
    tuned, features_proto = None, None  # the cached features.onnx, unless fine-tuning changed the network
    if cfg.fine_tune_blocks:
        tuned, features_proto, head_only_why = _fine_tune(job, labels, {**splits, "test": test_idx}, kernel, bias)
        if tuned is not None:
            kernel, bias, val_acc, predicted = (
                tuned.kernel,
                tuned.bias,
                tuned.validation_accuracy,
                tuned.test_predictions,
            )
        cfg = job.cfg  # no blocks fine-tuned when the estimate did not fit --time-budget
    test_acc = float((predicted == labels[test_idx]).mean()) if len(test_idx) else float("nan")
    result = TrainResult(
        architecture=job.arch.name,
        labels=job.dataset.labels,
        image_count=int(ok.sum()),
        split_counts={k: int(len(v)) for k, v in splits.items()},
        test_accuracy=test_acc,
        test_count=int(len(test_idx)),
        validation_accuracy=val_acc,
        output_graph=str(cfg.output_graph),
        output_labels=str(cfg.labels_path),
        bottlenecks=stats,
        timings=job.timings,
        misclassified=[
            (job.dataset.items[i].relpath, job.dataset.labels[p], job.dataset.labels[labels[i]])
            for i, p in zip(test_idx, predicted)
            if p != labels[i]
        ],
        fine_tune=_fine_tune_record(cfg, job.arch, tuned),
        head_only_why=head_only_why,
        split_by_folders=job.dataset.presplit,
    )
    with job.timed("export_s"):
        result.parity_max_diff = _export(job, result, splits, kernel, bias, features_proto)
    if cfg.quantize == "int8":
        with job.timed("int8_s"):
            result.int8 = export_int8(
                cfg.output_graph, cfg.image_dir, cfg.max_accuracy_drop, events, cfg.head, cfg.follow_links,
                calibration=cfg.int8_calibration,
            )  # fmt: skip
    job.timings["total_s"] = time.perf_counter() - start
    return result


def _prepare(cfg: TrainConfig, events: Events, start: float) -> _Job:
    """Everything that can fail fast, before any long work: settings, output paths, data, weights."""
    cfg.check()
    arch = get_architecture(cfg.architecture)
    if cfg.head_only and cfg.fine_tune_blocks > 0:
        raise FlowerxError(f"--head-only and --fine-tune-blocks {cfg.fine_tune_blocks} contradict each other")
    auto = cfg.fine_tune_blocks == -1 and not cfg.head_only
    cfg = replace(cfg, fine_tune_blocks=recipe(arch)[0] if auto else 0 if cfg.head_only else cfg.fine_tune_blocks)
    if cfg.fine_tune_blocks:
        cut_layer(arch, cfg.fine_tune_blocks)  # an impossible block count fails now, not after the bottlenecks
        if not 1 <= cfg.fine_tune_full_res_epochs <= cfg.fine_tune(arch).max_epochs:
            raise FlowerxError("--fine-tune-full-res-epochs must be in 1 to the fine-tuning epochs")
    cfg.check_paths()
    dataset = discover(cfg.image_dir, cfg.follow_links)
    for name, why in dataset.skipped_folders:
        events.warning(f"skipping folder {name}/: {why}")
    weights = resolve_weights(
        arch, cfg.model_dir, lambda done, total: events.progress(f"Downloading {arch.weights_file}", done, total, "B")
    )
    cfg.check_paths(weights)
    events.info(
        f"{arch.name}: {len(dataset.items)} images in {len(dataset.labels)} classes "
        f"({', '.join(dataset.labels)})"
        + (" (split by its train/val/test folders; the split percentages do not apply)" if dataset.presplit else "")
    )
    cache = open_cache(cfg.bottleneck_dir, arch, weights_fingerprint(weights), len(dataset.items), cfg.cache_format)
    events.detail(f"weights {weights}; bottleneck cache {cache.dir} ({'shards' if cache.sharded else 'files'})")
    networks = _Networks(arch, weights, cache, dataset.items, events)
    reserve = EXPORT_RESERVE_S + (INT8_RESERVE_S if cfg.quantize == "int8" else 0)
    deadline = start + cfg.time_budget - reserve if auto else None
    return _Job(cfg, events, arch, dataset, cache, networks, deadline=deadline)


def _on_ray(job: _Job, title: str, items: Sequence[ImageItem], view=None) -> list | None:
    """With --ray: the pass's missing cache entries computed on Ray first; returns the images' keys, with which
    the local pass then loads the entries without reading the images again (None without --ray)."""
    if not job.cfg.ray:
        return None
    from .onray import fill_cache

    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        job.events.progress(f"{title} on Ray", done[0], len(items), "img")

    address = None if job.cfg.ray == "local" else job.cfg.ray
    t = time.perf_counter()
    done = fill_cache(items, job.cache, job.networks.features_onnx(), view, address, on_progress=advance)
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(done.statuses.items()))
    job.timings["ray_fixed_s"] = job.timings.get("ray_fixed_s", 0.0) + done.start_s + done.stop_s
    job.events.detail(
        f"{title} on Ray: {statuses} on {len(done.nodes)} node(s) ({time.perf_counter() - t:.1f} s, of which "
        f"{done.start_s + done.stop_s:.1f} s starting and stopping Ray)"
    )
    return done.keys


def _bottlenecks(job: _Job) -> tuple[np.ndarray, np.ndarray, BottleneckStats]:
    """Every image's bottleneck: cached where possible, computed in batches otherwise."""
    t = time.perf_counter()
    keys = _on_ray(job, "Bottlenecks", job.dataset.items)
    features, ok, stats = _pass(
        job.events,
        "Bottlenecks",
        job.dataset.items,
        job.cache,
        job.networks.batch_fn,
        job.cfg.bottleneck_batch_size,
        keys=keys,
    )
    job.events.info(
        f"Bottlenecks: {stats.cached} cached, {stats.computed} computed"
        + (f", {stats.corrupt} damaged entries recomputed" if stats.corrupt else "")
        + (f", {len(stats.failed)} images skipped" if stats.failed else "")
        + f" ({time.perf_counter() - t:.1f} s)"
    )
    return features, ok, stats


def _split(job: _Job, labels: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
    """The readable images' train/validation/test indices, with a warning for what cannot mean much."""
    cfg, dataset, events = job.cfg, job.dataset, job.events
    names = split_names(dataset.items, cfg.validation_percentage, cfg.testing_percentage)
    splits = {s: np.flatnonzero((names == s) & ok) for s in ("train", "validation", "test")}
    if len(splits["train"]) == 0:
        raise FlowerxError("no readable training images left after the split")
    missing = [dataset.labels[c] for c in range(len(dataset.labels)) if not (labels[splits["train"]] == c).any()]
    if missing:
        events.warning(f"no training images for: {', '.join(missing)}")
    for name, wanted in (("validation", cfg.validation_percentage), ("test", cfg.testing_percentage)):
        count = len(splits[name])
        if count < MIN_SPLIT and (wanted > 0 or dataset.presplit):
            events.warning(
                f"only {count} {name} images: its accuracy means little (one image moves it {100 / count:.0f} points)"
                if count
                else f"no {name} images"
                + (f" (no {'val' if name == 'validation' else name}/ folder)" if dataset.presplit else "")
            )
    if cfg.fine_tune_blocks and not len(splits["validation"]) and job.deadline is None:
        need = "a val/ folder" if dataset.presplit else "--validation-percentage > 0"
        raise FlowerxError(f"fine-tuning stops early on validation accuracy: it needs {need}")
    return splits


def _head_only_why(job: _Job, splits: dict[str, np.ndarray], start: float) -> str:
    """With --fine-tune-blocks -1: why this run cannot fine-tune ("" when it may try: its first steps then
    estimate whether it fits --time-budget)."""
    if job.deadline is None or not job.cfg.fine_tune_blocks:
        return ""
    why = ""
    if len(splits["validation"]) < MIN_SPLIT:
        why = f"{len(splits['validation'])} validation images, too few to choose a fine-tuned epoch on"
    elif time.perf_counter() >= job.deadline:
        why = f"--time-budget {job.cfg.time_budget:g} s already spent ({time.perf_counter() - start:.0f} s)"
    if why:
        job.events.info(f"Training the head alone: {why}")
    return why


def _head(
    job: _Job, features: np.ndarray, labels: np.ndarray, splits: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, float]:
    """The softmax layer on the bottlenecks (and the distorted views', when a distortion is on)."""
    cfg = job.cfg
    if cfg.summaries_dir:
        job.summary_dir = new_run_dir(Path(cfg.summaries_dir) / (cfg.experiment_name or job.arch.name))
        job.events.detail(f"TensorBoard summaries in {job.summary_dir}")
    x, y, head_splits = features, labels, splits
    if job.cfg.distortion.active:
        with job.timed("views_s"):
            x, y, head_splits = _with_views(job, features, labels, splits)
    with job.timed("head_s"):
        return train_head(x, y, head_splits, len(job.dataset.labels), job.cfg.head, job.events, job.summary_dir)


def _with_views(
    job: _Job, features: np.ndarray, labels: np.ndarray, splits: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A training set grown by the distorted views of each training image (cached like the bottlenecks):
    returns (features, labels, splits) with the views' rows appended to the train split."""
    cfg, items, t = job.cfg, job.dataset.items, time.perf_counter()
    train = splits["train"]
    rows, ys, train_rows, computed = [features], [labels], [train], 0
    for k in range(1, cfg.distorted_views + 1):
        keys = _on_ray(job, f"Views {k}/{cfg.distorted_views}", [items[i] for i in train], (cfg.distortion, k))
        view, ok, stats = _pass(
            job.events,
            f"Views {k}/{cfg.distorted_views}",
            [items[i] for i in train],
            job.cache,
            job.networks.batch_fn,
            cfg.bottleneck_batch_size,
            view=(cfg.distortion, k),
            keys=keys,
        )
        train_rows.append(sum(map(len, rows)) + np.arange(ok.sum()))
        rows.append(view[ok])
        ys.append(labels[train][ok])
        computed += stats.computed
    job.events.info(
        f"Distorted views ({cfg.distortion.id}): {cfg.distorted_views} per training image, "
        f"{computed} computed ({time.perf_counter() - t:.1f} s)"
    )
    return np.concatenate(rows), np.concatenate(ys), {**splits, "train": np.concatenate(train_rows)}


def _fine_tune(job: _Job, labels: np.ndarray, splits: dict[str, np.ndarray], kernel: np.ndarray, bias: np.ndarray):
    """Fine-tune the top blocks on fresh views of the images; returns (FineTuneResult, the tuned feature
    network as ONNX or None when no epoch beat the head alone, ""), or (None, None, why) when the first steps'
    estimate did not fit --time-budget (job.cfg then says no blocks were fine-tuned)."""
    from exporters.onnx_export import keras_to_onnx

    cfg, events = job.cfg, job.events
    checkpoint = job.cache.dir / f"fine-tune-{Path(cfg.output_graph).stem}.npz"
    head = [
        cfg.how_many_training_steps,
        cfg.learning_rate,
        cfg.train_batch_size,
        cfg.distortion.id,
        cfg.distorted_views,
    ]  # the head's starting point, part of the checkpoint's key
    key_parts = {"head": head}
    t = time.perf_counter()
    tuned = _fine_tune_in_budget(job, labels, splits, kernel, bias, checkpoint, key_parts)
    seconds = job.timings["fine_tune_s"] = time.perf_counter() - t  # with any attempt cut short
    if isinstance(tuned, str):
        return None, None, tuned
    if tuned.epochs:
        events.info(
            f"Fine-tuned the top {job.cfg.fine_tune_blocks} block(s): kept epoch {tuned.epochs} (validation "
            f"accuracy {tuned.validation_accuracy * 100:.1f}%, {seconds:.1f} s)"
        )
        return tuned, keras_to_onnx(job.networks.keras(), job.arch.input_size, output=FEATURES), ""
    events.info(f"Fine-tuning never beat the head alone on validation accuracy: kept the head alone ({seconds:.1f} s)")
    return tuned, None, ""


def _fine_tune_in_budget(
    job: _Job, labels: np.ndarray, splits: dict, kernel: np.ndarray, bias: np.ndarray, checkpoint: Path, key_parts: dict
) -> FineTuneResult | str:
    """fine_tune within job.deadline (--fine-tune-blocks -1; none with N): where its first steps say the epochs
    asked for would not fit, a fresh run of as many as fit (at least MIN_EPOCHS), else the head alone: then the
    reason is returned and job.cfg says no blocks were fine-tuned. A rerun resumes a run a budget shortened."""
    cfg, events = job.cfg, job.events
    asked = cfg.fine_tune(job.arch)
    shortened_from = 0  # the epochs asked for, once the run has fewer to fit the budget
    earlier = job.deadline is not None and shortened_epochs(
        checkpoint, job.arch, asked, job.dataset.items, splits, key_parts
    )
    if earlier:  # an earlier run shortened this one to fit its budget: resume (or reuse) it rather than start anew
        events.info(f"Fine-tuning {earlier} epochs, as an earlier run of these settings chose to fit --time-budget")
        job.cfg, shortened_from = replace(cfg, fine_tune_epochs=earlier), asked.max_epochs
    while True:
        ft, attempt = job.cfg.fine_tune(job.arch), time.perf_counter()
        try:
            return fine_tune(
                job.networks.base(),
                job.arch,
                ft,
                job.dataset.items,
                labels,
                splits,
                kernel,
                bias,
                checkpoint,
                events,
                job.summary_dir,
                key_parts=key_parts,
                deadline=job.deadline,
                shortened_from=shortened_from,
            )
        except OverBudget as e:
            left = f"{max(0, e.left_s):.0f} s of --time-budget {cfg.time_budget:g} left"
            why = f"fine-tuning {ft.max_epochs} epochs would take about {e.estimate_s:.0f} s more, {left}"
            # a fresh start pays again what this attempt spent before its estimate (building, tracing); one that
            # had resumed a checkpoint does not start afresh, which would overwrite that checkpoint's epochs
            fit = 0 if e.resumed else epochs_that_fit(ft, e.probe, e.left_s - (time.perf_counter() - attempt))
            if fit:
                # fewer epochs keep --fine-tune-full-res-epochs at full size, so the low-res ones go first
                events.info(f"Fine-tuning {replace(ft, max_epochs=fit).schedule(job.arch.input_size)} instead: {why}")
                job.cfg, shortened_from = replace(cfg, fine_tune_epochs=fit), asked.max_epochs
                continue
            job.cfg = replace(cfg, fine_tune_blocks=0)  # the epochs as asked: cfg is the run's before any cut
            kept = f"; its checkpoint stays for a later run ({checkpoint.name})" if e.resumed else ""
            blocks = recipe(job.arch)[0]
            events.info(f"Kept the head alone: {why}{kept} (--fine-tune-blocks {blocks} fine-tunes anyway)")
            return why


def _fine_tune_record(cfg: TrainConfig, arch: Architecture, tuned: FineTuneResult | None) -> dict | None:
    if tuned is None:
        return None
    ft = cfg.fine_tune(arch)
    # the estimate of the last process that made one: a run resumed under the default estimates again from its
    # first epoch; one resumed with --fine-tune-blocks N makes none, so an earlier process's estimate stays
    estimated = next((record for record in reversed(tuned.history) if "estimated_s" in record), {})
    since = estimated.get("epoch")
    return {
        "blocks": cfg.fine_tune_blocks,
        "kept_epoch": tuned.epochs,
        "epochs_run": len(tuned.history),
        "epochs_trained": tuned.trained,  # by this process: fewer than epochs_run where it resumed a checkpoint
        "learning_rate": cfg.fine_tune_learning_rate,
        "distortion": tuned.distortion,
        "epoch_sizes": [record["size"] for record in tuned.history],  # side of the training views, per epoch
        # --fine-tune-blocks -1: the time of the epochs from estimated_from_epoch on, as estimated after that
        # epoch's first steps (up to max_epochs: early stopping may end sooner) and as it was (epochs_s: all
        # epochs, those of an earlier process too)
        "estimated_s": estimated.get("estimated_s"),
        "estimated_from_epoch": since,
        "estimated_epochs_s": _rounded(sum(r["seconds"] for r in tuned.history[since - 1 :])) if since else None,
        "epochs_s": _rounded(sum(record["seconds"] for record in tuned.history)),
        "resumed": tuned.resumed,
        "validation_accuracy": _rounded(tuned.validation_accuracy),
        # the recipe's settings (the architecture's where the flags said auto), recorded with the model
        **{k: getattr(ft, k) for k in ("max_epochs", "low_res", "full_res_epochs", "batch_size", "label_smoothing")},
        **{k: getattr(ft, k) for k in ("ema_decay", "patience")},
    }


def _rounded(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def training_record(cfg: TrainConfig, result: TrainResult) -> dict:
    """The run as the model's `training` metadata: its figures and every setting that shaped the model."""
    return {
        "test_accuracy": _rounded(result.test_accuracy) if result.test_count else None,
        "test_count": result.test_count,
        "validation_accuracy": _rounded(result.validation_accuracy),
        "image_count": result.image_count,
        "split_counts": result.split_counts,
        "testing_percentage": cfg.testing_percentage,
        "validation_percentage": cfg.validation_percentage,
        "split": "folders" if result.split_by_folders else "hash",
        "steps": cfg.how_many_training_steps,
        "learning_rate": cfg.learning_rate,
        "distortion": cfg.distortion.id if cfg.distortion.active else None,
        "fine_tune_blocks": cfg.fine_tune_blocks,
        "fine_tune": result.fine_tune,
        "config": {
            f.name: getattr(cfg, f.name)
            for f in fields(cfg)
            if f.name not in NOT_RECORDED and f.metadata["group"] != "output"
        },
        "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _export(job: _Job, result: TrainResult, splits: dict[str, np.ndarray], kernel, bias, features_proto) -> float:
    """Base + head as one ONNX file with its contract, checked against Keras on real images, then written
    (with its labels file) atomically. Returns the parity check's max difference."""
    import onnx

    from exporters import ExportError
    from exporters.onnx_export import append_head, export

    from .backbone import build_classifier

    arch, items = job.arch, job.dataset.items
    model = build_classifier(job.networks.keras(), kernel, bias)
    check_idx = (list(splits["validation"]) + list(splits["train"]))[:8]
    check_images = np.stack([prepare_image(items[i].path, arch.input_size) for i in check_idx])
    combined = append_head(features_proto or onnx.load(str(job.networks.features_onnx())), kernel, bias)
    contract = Contract(
        labels=job.dataset.labels,
        input_size=arch.input_size,
        architecture=arch.name,
        input_mean=arch.mean,
        input_std=arch.std,
        flowerx_version=__version__,
        training=training_record(job.cfg, result),
    )
    try:
        data, diff = export(model, arch.input_size, contract.description(__version__), check_images, proto=combined)
    except ExportError as e:
        raise FlowerxError(str(e)) from None
    atomic_write(job.cfg.output_graph, data)
    atomic_write(job.cfg.labels_path, ("\n".join(job.dataset.labels) + "\n").encode())
    return diff
