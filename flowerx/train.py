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
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from . import __version__
from .architectures import Architecture, default_model_dir, get_architecture, resolve_weights, weights_fingerprint
from .bottlenecks import BottleneckCache, BottleneckStats, get_bottlenecks, stream_session
from .data import RESIZE_RULE, Distortion, ImageItem, discover, prepare_image, split_names
from .errors import FlowerxError, ImageError
from .events import QUIET, Events
from .fileio import atomic_write, check_folder, check_outputs


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
        0,
        "after the head, also train the network's top N blocks on fresh distorted "
        "views (0: head only; MobileNet 1-13, 13 = all; Inception V3 1-10)",
        "fine-tuning",
    )
    fine_tune_learning_rate: float = _option(
        0.0001, "Adam learning rate of fine-tuning (cosine-decayed over the epochs)", "fine-tuning"
    )
    fine_tune_epochs: int = _option(
        12,
        "fine-tuning epochs at most (early stopping on validation accuracy, patience 3 counted from half of them)",
        "fine-tuning",
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
        if self.fine_tune_blocks < 0 or self.fine_tune_epochs < 1 or self.fine_tune_learning_rate <= 0:
            raise FlowerxError(
                "--fine-tune-blocks must be >= 0, --fine-tune-epochs and --fine-tune-learning-rate positive"
            )
        if self.distorted_views < 1:
            raise FlowerxError("--distorted-views must be at least 1")
        if self.quantize not in ("none", "int8"):
            raise FlowerxError(f"--quantize must be none or int8, not {self.quantize!r}")
        for name in ("validation_batch_size", "test_batch_size"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise FlowerxError(f"--{_flag(name)} must be positive or -1 (all)")
        check_experiment_name(self.experiment_name)

    def check_paths(self, weights: Path | None = None) -> None:
        """Outputs distinct, writable, and not an input; cache and summary folders not files. Before any work."""
        outputs = {"--output-graph": self.output_graph, "--output-labels": self.labels_path}
        if self.quantize == "int8":
            from .quantize import int8_path

            outputs["the int8 model"] = int8_path(self.output_graph)
        check_outputs(outputs, {"weights": weights} if weights else None)
        check_folder(self.bottleneck_dir, "--bottleneck-dir")
        if self.summaries_dir:
            check_folder(self.summaries_dir, "--summaries-dir")

    @property
    def distortion(self) -> Distortion:
        return Distortion(self.flip_left_right, self.random_crop, self.random_scale, self.random_brightness)

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
    ):
        raise FlowerxError(
            f"--experiment-name must be a plain name (no /, \\, '..' or control characters), got {name!r}"
        )


def new_run_dir(parent: Path) -> Path:
    """A new folder parent/<UTC date-time> for this run's summaries (earlier runs are kept for comparison)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FlowerxError(f"cannot make a new run folder in {parent}")


@dataclass
class TrainResult:
    architecture: str
    labels: list[str]
    image_count: int
    split_counts: dict[str, int]
    test_accuracy: float
    test_count: int
    validation_accuracy: float
    output_graph: str
    output_labels: str
    bottlenecks: BottleneckStats
    parity_max_diff: float
    timings: dict[str, float] = field(default_factory=dict)
    misclassified: list[tuple[str, str, str]] = field(default_factory=list)  # (relpath, predicted, true)
    int8: object | None = None  # quantize.Int8Result when --quantize int8


class _Networks:
    """The frozen network, built on first use: as Keras (for training and the export's parity check) and
    as a cached ONNX export that computes the bottlenecks on onnxruntime, faster than TensorFlow here."""

    def __init__(self, arch: Architecture, weights: Path, folder: Path, items: Sequence[ImageItem], events: Events):
        self.arch, self.weights, self.folder, self.items, self.events = arch, weights, folder, items, events
        self.onnx_path = folder / "features.onnx"
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
        if not self.onnx_path.is_file():
            from exporters.onnx_export import FEATURES_ATOL, check_parity, keras_to_onnx

            task = f"Preparing {self.arch.name} (one-time export to ONNX)"
            self.events.progress(task, 0, None, "")
            data = keras_to_onnx(self.keras(), self.arch.input_size, output="features").SerializeToString()
            check_parity(data, self.keras(), self.sample_images(4), atol=FEATURES_ATOL, top1=False)
            atomic_write(self.onnx_path, data)
            self.events.progress(task, 1, 1, "")
        return self.onnx_path

    def batch_fn(self) -> Callable:
        """The feature network as a stream_session, built once."""
        if self._fn is None:
            self._fn = stream_session(self.features_onnx())
        return self._fn


def _pass(events: Events, title: str, items, cache: BottleneckCache, make_model: Callable, batch_size: int, view=None):
    """One bottleneck pass, reporting progress and warnings."""
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        events.progress(title, done[0], len(items), "img")

    events.progress(title, 0, len(items), "img")
    return get_bottlenecks(
        items, cache, make_model, batch_size, on_progress=advance, view=view, on_warning=events.warning
    )


def _sample(indices: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return indices if size < 0 or size >= len(indices) else rng.choice(indices, size, replace=False)


FINE_TUNE_BATCH = 32
STEPS_PER_CALL = 100  # batches gathered per graph call: bounds memory, whatever the dataset's size


def predict_logits(
    x: np.ndarray, idx: np.ndarray, kernel: np.ndarray, bias: np.ndarray, chunk: int = 65536
) -> np.ndarray:
    """Logits of the rows idx of x, a chunk at a time (x may be a memory-mapped file)."""
    parts = [x[idx[i : i + chunk]] @ kernel + bias for i in range(0, len(idx), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, kernel.shape[1]), np.float32)


def accuracy_of(x: np.ndarray, y: np.ndarray, idx: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> float:
    return float((predict_logits(x, idx, kernel, bias).argmax(1) == y[idx]).mean()) if len(idx) else float("nan")


def train_head(
    x: np.ndarray,
    y: np.ndarray,
    splits: dict[str, np.ndarray],
    num_classes: int,
    cfg: TrainConfig,
    events: Events,
    summary_dir: Path | None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Plain mini-batch SGD on a softmax layer (retrain.py's recipe; measured as good as Adam, L2,
    label smoothing or dropout on these features). Returns (kernel, bias, last validation accuracy).
    A run whose loss or weights stop being finite (a learning rate far too high) fails at once."""
    from .backbone import tf

    tf.random.set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    kernel = tf.Variable(tf.random.truncated_normal([x.shape[1], num_classes], stddev=0.001, seed=cfg.seed))
    bias = tf.Variable(tf.zeros([num_classes]))
    optimizer = tf.keras.optimizers.SGD(cfg.learning_rate)
    train_idx = splits["train"]
    batch = min(cfg.train_batch_size, len(train_idx))

    @tf.function
    def run_steps(first: tf.Tensor, xs: tf.Tensor, ys: tf.Tensor):
        """len(xs) SGD steps inside one graph call (no Python per step), writing train summaries."""
        loss, accuracy = tf.constant(0.0), tf.constant(0.0)
        for i in tf.range(tf.shape(xs, out_type=tf.int64)[0]):
            xb, yb = xs[i], ys[i]
            with tf.GradientTape() as tape:
                logits = tf.matmul(xb, kernel) + bias
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits))
            optimizer.apply_gradients(zip(tape.gradient(loss, [kernel, bias]), [kernel, bias]))
            accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), yb), tf.float32))
            tf.summary.scalar("cross_entropy", loss, step=first + i)
            tf.summary.scalar("accuracy", accuracy, step=first + i)
        return loss, accuracy

    def evaluate(idx: np.ndarray) -> float:
        return accuracy_of(x, y, idx, kernel.numpy(), bias.numpy())

    if summary_dir is not None:
        train_writer = tf.summary.create_file_writer(str(summary_dir / "train"))
        val_writer = tf.summary.create_file_writer(str(summary_dir / "validation"))
    else:
        train_writer = val_writer = tf.summary.create_noop_writer()
    done, total, val_acc = 0, cfg.how_many_training_steps, float("nan")
    while done < total:
        end = min(done + cfg.eval_step_interval, total)
        while done < end:  # feed at most STEPS_PER_CALL batches at a time: x may be a memory-mapped file
            count = min(STEPS_PER_CALL, end - done)
            picks = rng.choice(train_idx, (count, batch))
            with train_writer.as_default():
                loss, acc = run_steps(
                    tf.constant(done, tf.int64),
                    tf.constant(x[picks.ravel()].reshape(count, batch, -1)),
                    tf.constant(y[picks], tf.int64),
                )
            done += count
        val_idx = _sample(splits["validation"], cfg.validation_batch_size, rng)
        val_acc = evaluate(val_idx)
        with val_writer.as_default():
            tf.summary.scalar("accuracy", val_acc, step=done - 1)
        events.step(
            f"Step {done:>5}/{total}: train accuracy {float(acc) * 100:5.1f}%  cross entropy {float(loss):.4f}  "
            f"validation accuracy {val_acc * 100:5.1f}% (N={len(val_idx)})"
        )
        if not (np.isfinite(float(loss)) and np.isfinite(kernel.numpy()).all() and np.isfinite(bias.numpy()).all()):
            raise FlowerxError(
                f"training diverged at step {done} (the loss or the weights are no longer finite): "
                f"lower --learning-rate (it is {cfg.learning_rate:g}); no model written"
            )
    train_writer.flush()
    val_writer.flush()
    return kernel.numpy(), bias.numpy(), val_acc


def _with_views(
    cfg: TrainConfig,
    events: Events,
    items: Sequence[ImageItem],
    features: np.ndarray,
    labels: np.ndarray,
    splits: dict[str, np.ndarray],
    cache: BottleneckCache,
    make_model: Callable,
    timings: dict[str, float],
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A training set grown by the distorted views of each training image (cached like the bottlenecks):
    returns (features, labels, splits) with the views' rows appended to the train split."""
    t = time.perf_counter()
    train = splits["train"]
    rows, ys, train_rows, computed = [features], [labels], [train], 0
    for k in range(1, cfg.distorted_views + 1):
        view, ok, stats = _pass(
            events,
            f"Views {k}/{cfg.distorted_views}",
            [items[i] for i in train],
            cache,
            make_model,
            cfg.bottleneck_batch_size,
            view=(cfg.distortion, k),
        )
        train_rows.append(sum(map(len, rows)) + np.arange(ok.sum()))
        rows.append(view[ok])
        ys.append(labels[train][ok])
        computed += stats.computed
    timings["views_s"] = time.perf_counter() - t
    events.info(
        f"Distorted views ({cfg.distortion.id}): {cfg.distorted_views} per training image, "
        f"{computed} computed ({timings['views_s']:.1f} s)"
    )
    return np.concatenate(rows), np.concatenate(ys), {**splits, "train": np.concatenate(train_rows)}


def _fine_tune(
    cfg: TrainConfig,
    events: Events,
    arch: Architecture,
    items: Sequence[ImageItem],
    labels: np.ndarray,
    splits: dict[str, np.ndarray],
    kernel: np.ndarray,
    bias: np.ndarray,
    networks: _Networks,
    checkpoint: Path,
    summary_dir: Path | None,
    timings: dict[str, float],
):
    """Fine-tune the top blocks on fresh views of the images; returns (FineTuneResult, the tuned feature
    network as ONNX)."""
    from exporters.onnx_export import keras_to_onnx

    from .finetune import fine_tune

    t = time.perf_counter()
    tuned = fine_tune(
        networks.base(),
        networks.keras(),
        arch,
        cfg.fine_tune_blocks,
        items,
        labels,
        splits,
        kernel,
        bias,
        cfg.distortion,
        cfg.fine_tune_learning_rate,
        cfg.fine_tune_epochs,
        FINE_TUNE_BATCH,
        cfg.seed,
        checkpoint,
        events,
        summary_dir,
        key_parts={
            "head": [
                cfg.how_many_training_steps,
                cfg.learning_rate,
                cfg.train_batch_size,
                cfg.distortion.id,
                cfg.distorted_views,
            ]
        },
    )
    timings["fine_tune_s"] = time.perf_counter() - t
    if tuned.epochs:
        events.info(
            f"Fine-tuned the top {cfg.fine_tune_blocks} block(s): kept epoch {tuned.epochs} (validation "
            f"accuracy {tuned.validation_accuracy * 100:.1f}%, {timings['fine_tune_s']:.1f} s)"
        )
    else:
        events.info(
            "Fine-tuning never beat the head alone on validation accuracy: kept the head alone "
            f"({timings['fine_tune_s']:.1f} s)"
        )
    return tuned, keras_to_onnx(networks.keras(), arch.input_size, output="features") if tuned.epochs else None


MIN_SPLIT = 20  # a validation or test split smaller than this gets a warning: one image moves it 5+ points


def run(cfg: TrainConfig, events: Events = QUIET) -> TrainResult:
    """The whole job: data -> bottlenecks -> head -> test accuracy -> ONNX export. Reports through events."""
    cfg.check()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    arch = get_architecture(cfg.architecture)
    if cfg.fine_tune_blocks:
        from .finetune import cut_layer

        cut_layer(arch, cfg.fine_tune_blocks)  # an impossible block count fails now, not after the bottlenecks
    cfg.check_paths()
    dataset = discover(cfg.image_dir, cfg.follow_links)
    for name, why in dataset.skipped_folders:
        events.warning(f"skipping folder {name}/: {why}")
    weights = resolve_weights(
        arch, cfg.model_dir, lambda done, total: events.progress(f"Downloading {arch.weights_file}", done, total, "B")
    )  # fail fast, before any long work
    cfg.check_paths(weights)
    events.info(
        f"{arch.name}: {len(dataset.items)} images in {len(dataset.labels)} classes "
        f"({', '.join(dataset.labels)})" + (" (split given by its train/val/test folders)" if dataset.presplit else "")
    )
    events.detail(f"weights {weights}; bottleneck cache {cfg.bottleneck_dir}")

    # Bottlenecks: cached where possible, computed in batches otherwise.
    weights_id = weights_fingerprint(weights)
    cache = BottleneckCache(cfg.bottleneck_dir, arch, weights_id)
    networks = _Networks(arch, weights, cache.dir, dataset.items, events)
    t = time.perf_counter()
    features, ok, stats = _pass(
        events, "Bottlenecks", dataset.items, cache, networks.batch_fn, cfg.bottleneck_batch_size
    )
    timings["bottlenecks_s"] = time.perf_counter() - t
    events.info(
        f"Bottlenecks: {stats.cached} cached, {stats.computed} computed"
        + (f", {stats.corrupt} damaged entries recomputed" if stats.corrupt else "")
        + (f", {len(stats.failed)} images skipped" if stats.failed else "")
        + f" ({timings['bottlenecks_s']:.1f} s)"
    )

    labels = np.array([item.label for item in dataset.items])
    names = split_names(dataset.items, cfg.validation_percentage, cfg.testing_percentage)
    splits = {s: np.flatnonzero((names == s) & ok) for s in ("train", "validation", "test")}
    if len(splits["train"]) == 0:
        raise FlowerxError("no readable training images left after the split")
    missing = [dataset.labels[c] for c in range(len(dataset.labels)) if not (labels[splits["train"]] == c).any()]
    if missing:
        events.warning(f"no training images for: {', '.join(missing)}")
    for name, wanted in (("validation", cfg.validation_percentage), ("test", cfg.testing_percentage)):
        if len(splits[name]) < MIN_SPLIT and (wanted > 0 or dataset.presplit):
            events.warning(
                f"only {len(splits[name])} {name} images: its accuracy means little "
                f"(one image moves it {100 / max(1, len(splits[name])):.0f} points)"
            )
    if cfg.fine_tune_blocks and not len(splits["validation"]):
        raise FlowerxError("fine-tuning stops early on validation accuracy: it needs --validation-percentage > 0")
    head_x, head_y, head_splits = features, labels, splits
    if cfg.distortion.active:
        head_x, head_y, head_splits = _with_views(
            cfg, events, dataset.items, features, labels, splits, cache, networks.batch_fn, timings
        )

    # The softmax layer, with TensorBoard summaries.
    summary_dir = None
    if cfg.summaries_dir:
        summary_dir = new_run_dir(Path(cfg.summaries_dir).expanduser() / (cfg.experiment_name or arch.name))
        events.detail(f"TensorBoard summaries in {summary_dir}")
    t = time.perf_counter()
    kernel, bias, val_acc = train_head(head_x, head_y, head_splits, len(dataset.labels), cfg, events, summary_dir)
    timings["head_s"] = time.perf_counter() - t

    rng = np.random.default_rng(cfg.seed + 1)
    test_idx = _sample(splits["test"], cfg.test_batch_size, rng)
    predicted = predict_logits(features, test_idx, kernel, bias).argmax(1)
    features_proto = None  # the cached features.onnx, unless fine-tuning changed the network
    fine_tune_info = None
    if cfg.fine_tune_blocks:
        checkpoint = cache.dir / f"fine-tune-{Path(cfg.output_graph).stem}.npz"
        tuned, features_proto = _fine_tune(
            cfg,
            events,
            arch,
            dataset.items,
            labels,
            {**splits, "test": test_idx},
            kernel,
            bias,
            networks,
            checkpoint,
            summary_dir,
            timings,
        )
        kernel, bias, val_acc, predicted = tuned.kernel, tuned.bias, tuned.validation_accuracy, tuned.test_predictions
        fine_tune_info = {
            "blocks": cfg.fine_tune_blocks,
            "kept_epoch": tuned.epochs,
            "epochs_run": len(tuned.history),
            "learning_rate": cfg.fine_tune_learning_rate,
            "distortion": tuned.distortion,
        }
    test_acc = float((predicted == labels[test_idx]).mean()) if len(test_idx) else float("nan")
    misclassified = [
        (dataset.items[i].relpath, dataset.labels[p], dataset.labels[labels[i]])
        for i, p in zip(test_idx, predicted)
        if p != labels[i]
    ]

    # Export base + head as one ONNX file, checked against Keras on real validation images.
    t = time.perf_counter()
    import onnx

    from exporters.onnx_export import append_head, export

    from .backbone import build_classifier

    model = build_classifier(networks.keras(), kernel, bias)
    check_idx = (list(splits["validation"]) + list(splits["train"]))[:8]
    check_images = np.stack([prepare_image(dataset.items[i].path, arch.input_size) for i in check_idx])
    combined = append_head(features_proto or onnx.load(str(networks.features_onnx())), kernel, bias)
    metadata = {
        "labels": dataset.labels,
        "input_size": str(arch.input_size),
        "architecture": arch.name,
        "resize": RESIZE_RULE,
        "input_mean": str(arch.mean),
        "input_std": str(arch.std),
        "flowerx_version": __version__,
        "training": {
            "test_accuracy": round(test_acc, 6) if len(test_idx) else None,
            "test_count": int(len(test_idx)),
            "validation_accuracy": round(val_acc, 6) if val_acc == val_acc else None,
            "image_count": int(ok.sum()),
            "split_counts": {k: int(len(v)) for k, v in splits.items()},
            "testing_percentage": cfg.testing_percentage,
            "validation_percentage": cfg.validation_percentage,
            "split": "folders" if dataset.presplit else "hash",
            "steps": cfg.how_many_training_steps,
            "learning_rate": cfg.learning_rate,
            "distortion": cfg.distortion.id if cfg.distortion.active else None,
            "fine_tune_blocks": cfg.fine_tune_blocks,
            "fine_tune": fine_tune_info,
            "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    data, diff = export(model, arch.input_size, metadata, check_images, proto=combined)
    atomic_write(cfg.output_graph, data)
    atomic_write(cfg.labels_path, ("\n".join(dataset.labels) + "\n").encode())
    timings["export_s"] = time.perf_counter() - t
    int8 = None
    if cfg.quantize == "int8":
        from .quantize import export_int8

        t = time.perf_counter()
        int8 = export_int8(
            cfg.output_graph,
            cfg.image_dir,
            cfg.max_accuracy_drop,
            events,
            cfg.how_many_training_steps,
            cfg.learning_rate,
            cfg.seed,
            cfg.follow_links,
        )
        timings["int8_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    return TrainResult(
        architecture=arch.name,
        labels=dataset.labels,
        image_count=int(ok.sum()),
        split_counts={k: int(len(v)) for k, v in splits.items()},
        test_accuracy=test_acc,
        test_count=int(len(test_idx)),
        validation_accuracy=val_acc,
        output_graph=str(cfg.output_graph),
        output_labels=str(cfg.labels_path),
        bottlenecks=stats,
        parity_max_diff=diff,
        timings=timings,
        misclassified=misclassified,
        int8=int8,
    )
