"""`flowerx train`: cache bottlenecks, train a softmax layer on them, export base + head as one ONNX file.

TensorFlow is imported only inside the functions that need it, so that `TrainConfig` (used by the CLI to
build its parser) costs nothing to import.
"""

from __future__ import annotations

import datetime
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import __version__
from .architectures import Architecture, default_model_dir, get_architecture, resolve_weights, weights_fingerprint
from .bottlenecks import BottleneckCache, BottleneckStats, get_bottlenecks, stream_session
from .data import RESIZE_RULE, Distortion, ImageItem, discover, prepare_image, split_of
from .errors import FlowerxError, ImageError
from .fileio import atomic_write


@dataclass
class TrainConfig:
    """Every knob of a training run; the CLI flags map one to one (retrain.py's names, kebab case)."""

    image_dir: str = ""
    architecture: str = "mobilenet_1.0_224"
    model_dir: str = str(default_model_dir())
    bottleneck_dir: str = ".flowerx/bottlenecks"
    summaries_dir: str = ".flowerx/summaries"
    experiment_name: str = ""  # TensorBoard run name; default: the architecture
    output_graph: str = "model.onnx"
    output_labels: str = ""  # default: labels.txt beside the output graph
    how_many_training_steps: int = 4000
    learning_rate: float = 0.01
    testing_percentage: float = 10.0
    validation_percentage: float = 10.0
    eval_step_interval: int = 100
    train_batch_size: int = 100
    validation_batch_size: int = -1  # -1: the whole validation set at each evaluation
    test_batch_size: int = -1  # -1: the whole test set
    print_misclassified_test_images: bool = False
    bottleneck_batch_size: int = 32
    seed: int = 0
    flip_left_right: bool = False  # distortions, as retrain.py's flags; they apply to training images only
    random_crop: float = 0.0
    random_scale: float = 0.0
    random_brightness: float = 0.0
    distorted_views: int = 4  # distorted views cached per training image when any distortion is on
    fine_tune_blocks: int = 0  # after the head, also train the network's top N blocks (0: head only)
    fine_tune_learning_rate: float = 0.0001  # Adam, cosine-decayed to 0 over fine_tune_epochs
    fine_tune_epochs: int = 12  # at most; early stopping on validation accuracy (patience 3)
    quantize: str = "none"  # "int8": also write <graph>.int8.onnx (static QDQ, head re-fitted)
    max_accuracy_drop: float = 1.0  # points of test accuracy the int8 model may lose, else it is not written

    def check(self) -> None:
        """Reject impossible settings with one clear message."""
        if not self.image_dir:
            raise FlowerxError("--image-dir is required")
        for name in ("how_many_training_steps", "eval_step_interval", "train_batch_size", "bottleneck_batch_size"):
            if getattr(self, name) <= 0:
                raise FlowerxError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise FlowerxError(f"--learning-rate must be positive, got {self.learning_rate}")
        for name in ("testing_percentage", "validation_percentage"):
            if not 0 <= getattr(self, name) < 100:
                raise FlowerxError(f"--{name.replace('_', '-')} must be in [0, 100), got {getattr(self, name)}")
        if self.testing_percentage + self.validation_percentage >= 100:
            raise FlowerxError(
                "--testing-percentage + --validation-percentage must leave images to train on "
                f"(they add up to {self.testing_percentage + self.validation_percentage})"
            )
        for name in ("random_crop", "random_scale", "random_brightness"):
            if not 0 <= getattr(self, name) < 100:
                raise FlowerxError(f"--{name.replace('_', '-')} must be a percentage in [0, 100)")
        if self.fine_tune_blocks < 0 or self.fine_tune_epochs < 1 or self.fine_tune_learning_rate <= 0:
            raise FlowerxError("--fine-tune-blocks must be >= 0, --fine-tune-epochs and --fine-tune-learning-rate positive")
        if self.distorted_views < 1:
            raise FlowerxError("--distorted-views must be at least 1")
        if self.quantize not in ("none", "int8"):
            raise FlowerxError(f"--quantize must be none or int8, not {self.quantize!r}")
        for name in ("validation_batch_size", "test_batch_size"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise FlowerxError(f"--{name.replace('_', '-')} must be positive or -1 (all)")

    @property
    def distortion(self) -> Distortion:
        return Distortion(self.flip_left_right, self.random_crop, self.random_scale, self.random_brightness)

    @property
    def labels_path(self) -> Path:
        return Path(self.output_labels) if self.output_labels else Path(self.output_graph).parent / "labels.txt"


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

    def __init__(self, arch: Architecture, weights: Path, folder: Path, items: Sequence[ImageItem]):
        self.arch, self.weights, self.folder, self.items = arch, weights, folder, items
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

            data = keras_to_onnx(self.keras(), self.arch.input_size, output="features").SerializeToString()
            check_parity(data, self.keras(), self.sample_images(4), atol=FEATURES_ATOL, top1=False)
            atomic_write(self.onnx_path, data)
        return self.onnx_path

    def batch_fn(self) -> Callable:
        """The feature network as a stream_session, built once."""
        if self._fn is None:
            self._fn = stream_session(self.features_onnx())
        return self._fn


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=False,
    )


def _pass(console: Console, title: str, items, cache: BottleneckCache, make_model: Callable, batch_size: int,
          view=None):
    """One bottleneck pass with a progress bar and warnings above it."""
    t = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task(title, total=len(items), rate="")

        def advance(n: int) -> None:
            done = progress.tasks[0].completed + n
            elapsed = time.perf_counter() - t
            progress.update(task, advance=n, rate=f"{done / elapsed:.0f} img/s" if elapsed > 0 else "")

        return get_bottlenecks(
            items, cache, make_model, batch_size, on_progress=advance, view=view,
            on_warning=lambda m: progress.console.print(f"[yellow]warning:[/] {m}", highlight=False),
        )


def _sample(indices: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return indices if size < 0 or size >= len(indices) else rng.choice(indices, size, replace=False)


FINE_TUNE_BATCH = 32
STEPS_PER_CALL = 100  # batches gathered per graph call: bounds memory, whatever the dataset's size


def predict_logits(x: np.ndarray, idx: np.ndarray, kernel: np.ndarray, bias: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Logits of the rows idx of x, a chunk at a time (x may be a memory-mapped file)."""
    parts = [x[idx[i : i + chunk]] @ kernel + bias for i in range(0, len(idx), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, kernel.shape[1]), np.float32)


def accuracy_of(x: np.ndarray, y: np.ndarray, idx: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> float:
    return float((predict_logits(x, idx, kernel, bias).argmax(1) == y[idx]).mean()) if len(idx) else float("nan")


def train_head(
    x: np.ndarray, y: np.ndarray, splits: dict[str, np.ndarray], num_classes: int, cfg: TrainConfig,
    console: Console, summary_dir: Path | None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Plain mini-batch SGD on a softmax layer (retrain.py's recipe; measured as good as Adam, L2,
    label smoothing or dropout on these features). Returns (kernel, bias, last validation accuracy)."""
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
                loss, acc = run_steps(tf.constant(done, tf.int64), tf.constant(x[picks.ravel()].reshape(count, batch, -1)),
                                      tf.constant(y[picks], tf.int64))
            done += count
        val_idx = _sample(splits["validation"], cfg.validation_batch_size, rng)
        val_acc = evaluate(val_idx)
        with val_writer.as_default():
            tf.summary.scalar("accuracy", val_acc, step=done - 1)
        console.print(
            f"Step {done:>5}/{total}: train accuracy {float(acc) * 100:5.1f}%  cross entropy {float(loss):.4f}  "
            f"validation accuracy {val_acc * 100:5.1f}% (N={len(val_idx)})",
            highlight=False,
        )
    train_writer.flush()
    val_writer.flush()
    return kernel.numpy(), bias.numpy(), val_acc


def _with_views(cfg: TrainConfig, console: Console, items: Sequence[ImageItem], features: np.ndarray,
                labels: np.ndarray, splits: dict[str, np.ndarray], cache: BottleneckCache, make_model: Callable,
                timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A training set grown by the distorted views of each training image (cached like the bottlenecks):
    returns (features, labels, splits) with the views' rows appended to the train split."""
    t = time.perf_counter()
    train = splits["train"]
    rows, ys, train_rows, computed = [features], [labels], [train], 0
    for k in range(1, cfg.distorted_views + 1):
        view, ok, stats = _pass(console, f"views {k}/{cfg.distorted_views}", [items[i] for i in train], cache,
                                make_model, cfg.bottleneck_batch_size, view=(cfg.distortion, k))
        train_rows.append(sum(map(len, rows)) + np.arange(ok.sum()))
        rows.append(view[ok])
        ys.append(labels[train][ok])
        computed += stats.computed
    timings["views_s"] = time.perf_counter() - t
    console.print(f"Distorted views ({cfg.distortion.id}): {cfg.distorted_views} per training image, "
                  f"{computed} computed ({timings['views_s']:.1f} s)", highlight=False)
    return np.concatenate(rows), np.concatenate(ys), {**splits, "train": np.concatenate(train_rows)}


def _fine_tune(cfg: TrainConfig, console: Console, arch: Architecture, items: Sequence[ImageItem], labels: np.ndarray,
               splits: dict[str, np.ndarray], kernel: np.ndarray, bias: np.ndarray, networks: _Networks,
               checkpoint: Path, summary_dir: Path | None, timings: dict[str, float]):
    """Fine-tune the top blocks on fresh views of the images; returns (FineTuneResult, the tuned feature
    network as ONNX)."""
    from exporters.onnx_export import keras_to_onnx

    from .finetune import fine_tune

    t = time.perf_counter()
    tuned = fine_tune(networks.base(), networks.keras(), arch, cfg.fine_tune_blocks, items, labels, splits, kernel,
                      bias, cfg.distortion, cfg.fine_tune_learning_rate, cfg.fine_tune_epochs, FINE_TUNE_BATCH,
                      cfg.seed, checkpoint, console, summary_dir,
                      key_parts={"head": [cfg.how_many_training_steps, cfg.learning_rate, cfg.train_batch_size,
                                          cfg.distortion.id, cfg.distorted_views]})
    timings["fine_tune_s"] = time.perf_counter() - t
    if tuned.epochs:
        console.print(f"Fine-tuned the top {cfg.fine_tune_blocks} block(s): kept epoch {tuned.epochs} (validation "
                      f"accuracy {tuned.validation_accuracy * 100:.1f}%, {timings['fine_tune_s']:.1f} s)", highlight=False)
    else:
        console.print("Fine-tuning never beat the head alone on validation accuracy: kept the head alone "
                      f"({timings['fine_tune_s']:.1f} s)", highlight=False)
    return tuned, keras_to_onnx(networks.keras(), arch.input_size, output="features") if tuned.epochs else None


def run(cfg: TrainConfig, console: Console | None = None) -> TrainResult:
    """The whole job: data -> bottlenecks -> head -> test accuracy -> ONNX export."""
    console = console or Console(stderr=True)
    cfg.check()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    arch = get_architecture(cfg.architecture)
    if cfg.fine_tune_blocks:
        from .finetune import cut_layer

        cut_layer(arch, cfg.fine_tune_blocks)  # an impossible block count fails now, not after the bottlenecks
    dataset = discover(cfg.image_dir)
    for name in dataset.skipped_folders:
        console.print(f"[yellow]warning:[/] skipping folder {name}/: no images in it", highlight=False)
    weights = resolve_weights(arch, cfg.model_dir)  # fail fast, before any long work
    console.print(
        f"{arch.name}: {len(dataset.items)} images in {len(dataset.labels)} classes "
        f"({', '.join(dataset.labels)})", highlight=False,
    )

    # Bottlenecks: cached where possible, computed in batches otherwise.
    weights_id = weights_fingerprint(weights)
    cache = BottleneckCache(cfg.bottleneck_dir, arch, weights_id)
    networks = _Networks(arch, weights, cache.dir, dataset.items)
    t = time.perf_counter()
    features, ok, stats = _pass(console, "Bottlenecks", dataset.items, cache, networks.batch_fn, cfg.bottleneck_batch_size)
    timings["bottlenecks_s"] = time.perf_counter() - t
    console.print(
        f"Bottlenecks: {stats.cached} cached, {stats.computed} computed"
        + (f", {stats.corrupt} damaged entries recomputed" if stats.corrupt else "")
        + (f", {len(stats.failed)} images skipped" if stats.failed else "")
        + f" ({timings['bottlenecks_s']:.1f} s)", highlight=False,
    )

    labels = np.array([item.label for item in dataset.items])
    split_names = np.array([split_of(i.relpath, cfg.validation_percentage, cfg.testing_percentage) for i in dataset.items])
    splits = {s: np.flatnonzero((split_names == s) & ok) for s in ("train", "validation", "test")}
    if len(splits["train"]) == 0:
        raise FlowerxError("no readable training images left after the split")
    missing = [dataset.labels[c] for c in range(len(dataset.labels)) if not (labels[splits["train"]] == c).any()]
    if missing:
        console.print(f"[yellow]warning:[/] no training images for: {', '.join(missing)}", highlight=False)
    if cfg.fine_tune_blocks and not len(splits["validation"]):
        raise FlowerxError("fine-tuning stops early on validation accuracy: it needs --validation-percentage > 0")
    head_x, head_y, head_splits = features, labels, splits
    if cfg.distortion.active:
        head_x, head_y, head_splits = _with_views(cfg, console, dataset.items, features, labels, splits, cache,
                                                  networks.batch_fn, timings)

    # The softmax layer, with TensorBoard summaries.
    summary_dir = None
    if cfg.summaries_dir:
        summary_dir = Path(cfg.summaries_dir).expanduser() / (cfg.experiment_name or arch.name)
        shutil.rmtree(summary_dir, ignore_errors=True)  # one run per experiment name
    t = time.perf_counter()
    kernel, bias, val_acc = train_head(head_x, head_y, head_splits, len(dataset.labels), cfg, console, summary_dir)
    timings["head_s"] = time.perf_counter() - t

    rng = np.random.default_rng(cfg.seed + 1)
    test_idx = _sample(splits["test"], cfg.test_batch_size, rng)
    predicted = predict_logits(features, test_idx, kernel, bias).argmax(1)
    features_proto = None  # the cached features.onnx, unless fine-tuning changed the network
    fine_tune_info = None
    if cfg.fine_tune_blocks:
        checkpoint = cache.dir / f"fine-tune-{Path(cfg.output_graph).stem}.npz"
        tuned, features_proto = _fine_tune(cfg, console, arch, dataset.items, labels, {**splits, "test": test_idx},
                                           kernel, bias, networks, checkpoint, summary_dir, timings)
        kernel, bias, val_acc, predicted = tuned.kernel, tuned.bias, tuned.validation_accuracy, tuned.test_predictions
        fine_tune_info = {"blocks": cfg.fine_tune_blocks, "kept_epoch": tuned.epochs,
                          "epochs_run": len(tuned.history), "learning_rate": cfg.fine_tune_learning_rate,
                          "distortion": tuned.distortion}
    test_acc = float((predicted == labels[test_idx]).mean()) if len(test_idx) else float("nan")
    misclassified = [
        (dataset.items[i].relpath, dataset.labels[p], dataset.labels[labels[i]])
        for i, p in zip(test_idx, predicted) if p != labels[i]
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
        int8 = export_int8(cfg.output_graph, cfg.image_dir, cfg.max_accuracy_drop, console,
                           cfg.how_many_training_steps, cfg.learning_rate, cfg.seed)
        timings["int8_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    return TrainResult(
        architecture=arch.name, labels=dataset.labels, image_count=int(ok.sum()),
        split_counts={k: int(len(v)) for k, v in splits.items()}, test_accuracy=test_acc,
        test_count=int(len(test_idx)), validation_accuracy=val_acc, output_graph=str(cfg.output_graph),
        output_labels=str(cfg.labels_path), bottlenecks=stats, parity_max_diff=diff, timings=timings,
        misclassified=misclassified, int8=int8,
    )
