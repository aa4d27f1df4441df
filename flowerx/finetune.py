"""`--fine-tune-blocks N`: after the head has converged, train the network's top N blocks with it.

Each epoch every training image is decoded again and freshly distorted (`--flip-left-right` and the other
distortion flags; a mild default when none is given), so the network never sees the same pixels twice: what
makes fine-tuning generalise on a few thousand photos, and why it cannot use the bottleneck cache.
BatchNorm layers keep their ImageNet statistics (inference mode), as is usual for small datasets. The
optimizer is Adam with a cosine-decayed learning rate: plain SGD diverges on MobileNet v1, whose frozen
BatchNorm layers scale some depthwise weights' gradients up enormously (measured: SGD at 1e-3 dropped
validation accuracy to chance within 20 steps). Validation, the kept epoch and the export use an exponential
moving average of the weights (measured on mobilenet_1.0_224: validation accuracy climbs more steadily, 95.8%
against 95.1% at the same epoch). Early stopping on validation accuracy, its patience counted from half the
epochs, keeps the best epoch, or the head alone when no epoch beat it. After each epoch a checkpoint
(weights, optimizer state, early-stopping state) is written atomically, so an interrupted run resumes at its
next epoch, and a rerun with the same data and settings computes nothing again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .architectures import Architecture
from .data import Distortion, ImageItem, prepare_image
from .errors import FlowerxError
from .events import Events
from .fileio import atomic_write

# Used when fine-tuning and no distortion flag is given: without distortions every epoch shows the network
# the same pixels, which it learns by heart. Mild on purpose: photos are not upside down or recoloured.
# No --random-crop: its margin always zooms in (views 1.1-1.2x larger than the test images); --random-scale
# alone zooms 1.0-1.15x at a random position, closer to what the network sees at test time.
DEFAULT_DISTORTION = Distortion(flip_left_right=True, random_scale=15, random_brightness=10)
LABEL_SMOOTHING = 0.1  # fine-tuning reaches ~100% train accuracy: softer targets keep it from over-confidence
EMA_DECAY = 0.99  # per step: validation, the kept epoch and the export use an average of the last ~100 steps' weights
PATIENCE = 3  # epochs without a better validation accuracy before stopping, counted from half the epochs:
# the first epochs, at the highest learning rate, often dip below the head alone before they climb past it
CHECKPOINT_VERSION = 1


def cut_layer(arch: Architecture, blocks: int) -> str:
    """The name of the last frozen layer when the top `blocks` blocks are trained."""
    if arch.family == "inception_v3":
        if not 1 <= blocks <= 10:
            raise FlowerxError("--fine-tune-blocks for inception_v3 must be 1-10 (its mixed blocks)")
        return f"mixed{10 - blocks}"
    if not 1 <= blocks <= 13:
        raise FlowerxError("--fine-tune-blocks for MobileNet v1 must be 1-13 (its depthwise-separable blocks)")
    return f"conv_pw_{13 - blocks}_relu" if blocks < 13 else "conv1_relu"


@dataclass
class FineTuneResult:
    kernel: np.ndarray
    bias: np.ndarray
    validation_accuracy: float
    epochs: int  # the kept epoch (0: fine-tuning never beat the head alone)
    test_predictions: np.ndarray  # argmax per test item, in the order given
    distortion: str = ""  # the fresh views' settings (Distortion.id)
    history: list[dict] = field(default_factory=list)  # per epoch: train loss/accuracy, validation accuracy


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _decode(item: ImageItem, size: int, distortion: Distortion | None, seed: int) -> np.ndarray:
    return prepare_image(item.path, size) if distortion is None else distortion.view(item.path, size, seed)


def _image_batches(
    items: Sequence[ImageItem],
    order: np.ndarray,
    size: int,
    batch_size: int,
    distortion: Distortion | None,
    seed: int,
    pool: ThreadPoolExecutor,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, uint8 images) per batch of order, decoded (and distorted) on all cores two batches ahead of
    the training step; PIL releases the GIL, so decoding overlaps TensorFlow's work."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pending: deque = deque()
    for b in batches:
        pending.append((b, [pool.submit(_decode, items[i], size, distortion, _seed(seed, i)) for i in b]))
        if len(pending) > 2:
            idx, futures = pending.popleft()
            yield idx, np.stack([f.result() for f in futures])
    while pending:
        idx, futures = pending.popleft()
        yield idx, np.stack([f.result() for f in futures])


def checkpoint_key(parts: dict, items: Sequence[ImageItem]) -> str:
    """What a checkpoint was made from: the settings (the head's too) and the images (paths, labels, sizes
    and modification times: cheap, where hashing every image again would not be). Any change gives another
    key, so a stale checkpoint is never resumed."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for item in items:
        st = item.path.stat()
        h.update(f"{item.relpath}\0{item.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _save(path: Path, state: dict, arrays: dict[str, list[np.ndarray]]) -> None:
    buffer = io.BytesIO()
    flat = {f"{name}_{i:05d}": a for name, values in arrays.items() for i, a in enumerate(values)}
    np.savez(buffer, state=np.array(json.dumps(state)), **flat)
    atomic_write(path, buffer.getvalue())


def _load(path: Path, key: str) -> tuple[dict, dict[str, list[np.ndarray]]] | None:
    """The checkpoint's (state, arrays) if it is this run's and readable, else None (start afresh)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            state = json.loads(str(data["state"]))
            if state.get("key") != key or state.get("version") != CHECKPOINT_VERSION:
                return None
            arrays: dict[str, list[np.ndarray]] = {}
            for name in sorted(n for n in data.files if n != "state"):  # name_00000, name_00001, ...
                arrays.setdefault(name.rsplit("_", 1)[0], []).append(data[name])
            return state, arrays
    except (OSError, ValueError, KeyError, EOFError, json.JSONDecodeError):
        return None


def fine_tune(
    base,
    features_model,
    arch: Architecture,
    blocks: int,
    items: Sequence[ImageItem],
    labels: np.ndarray,
    splits: dict[str, np.ndarray],
    kernel: np.ndarray,
    bias: np.ndarray,
    distortion: Distortion,
    learning_rate: float,
    max_epochs: int,
    batch_size: int,
    seed: int,
    checkpoint: Path,
    events: Events,
    summary_dir: Path | None = None,
    key_parts: dict | None = None,
) -> FineTuneResult:
    """Train the top `blocks` blocks of base (shared by features_model: uint8 image -> pooled features) and
    the head on freshly distorted training images; returns the best epoch's head (base keeps its weights).
    key_parts: what else the starting point depends on (the head's settings), for the checkpoint's key."""
    from .backbone import keras, tf

    size = arch.input_size
    distortion = distortion if distortion.active else DEFAULT_DISTORTION
    cut = [layer.name for layer in base.layers].index(cut_layer(arch, blocks))
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i > cut and not isinstance(layer, keras.layers.BatchNormalization)
    w = tf.Variable(kernel.astype(np.float32), name="head_kernel")
    b = tf.Variable(bias.astype(np.float32), name="head_bias")
    variables = list(features_model.trainable_variables) + [w, b]
    train = splits["train"]
    steps_per_epoch = max(1, len(train) // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max_epochs * steps_per_epoch)
    optimizer = keras.optimizers.Adam(schedule)
    optimizer.build(variables)
    ema = [tf.Variable(v.numpy(), trainable=False) for v in variables]  # starts at the head-only weights

    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor, y: tf.Tensor):
        with tf.GradientTape() as tape:
            logits = tf.matmul(features_model(x, training=False), w) + b
            targets = tf.one_hot(y, tf.shape(logits)[1]) * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / tf.cast(
                tf.shape(logits)[1], tf.float32
            )
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, logits))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        for average, v in zip(ema, variables):
            average.assign(EMA_DECAY * average + (1 - EMA_DECAY) * tf.convert_to_tensor(v))
        return loss, tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1), y), tf.float32))

    @tf.function(reduce_retracing=True)
    def logits_of(x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(features_model(x, training=False), w) + b

    pool = ThreadPoolExecutor(os.cpu_count() or 1)

    def predict(idx: np.ndarray) -> np.ndarray:
        out = [
            logits_of(tf.constant(x)).numpy().argmax(1) for _, x in _image_batches(items, idx, size, 64, None, 0, pool)
        ]
        return np.concatenate(out) if out else np.zeros(0, int)

    def snapshot(of: list = variables) -> list[np.ndarray]:
        return [v.numpy() for v in of]

    def restore(values: list[np.ndarray], to: list = variables) -> None:
        for v, value in zip(to, values):
            v.assign(value)

    def accuracy(idx: np.ndarray) -> float:
        """Accuracy of the averaged weights (the training weights are put back after)."""
        current = snapshot()
        restore(snapshot(ema))
        try:
            return float((predict(idx) == labels[idx]).mean())
        finally:
            restore(current)

    key = checkpoint_key(
        {
            "architecture": arch.name,
            "blocks": blocks,
            "learning_rate": learning_rate,
            "max_epochs": max_epochs,
            "batch_size": batch_size,
            "seed": seed,
            "distortion": distortion.id,
            "label_smoothing": LABEL_SMOOTHING,
            "ema": EMA_DECAY,
            "splits": {k: len(v) for k, v in splits.items()},
            **(key_parts or {}),
        },
        [items[i] for i in np.concatenate([train, splits["validation"]])],
    )
    loaded = _load(checkpoint, key)
    if loaded:
        state, arrays = loaded
        restore(arrays["current"])
        restore(arrays["ema"], ema)
        for v, value in zip(optimizer.variables, arrays["optimizer"]):
            v.assign(value)
        best = arrays["best"]
        events.info(
            f"Fine-tune: {'finished' if state['done'] else 'resuming'} after epoch {state['epoch']} "
            f"(checkpoint {checkpoint})"
        )
    else:
        start = accuracy(splits["validation"])
        state = {
            "version": CHECKPOINT_VERSION,
            "key": key,
            "epoch": 0,
            "best_epoch": 0,
            "best_accuracy": start,
            "start_accuracy": start,
            "history": [],
            "done": False,
        }
        best = snapshot()
        events.info(
            f"Fine-tune the top {blocks} block(s) on fresh views ({distortion.id}): validation "
            f"accuracy before {start * 100:5.1f}%"
        )
    writer = (
        tf.summary.create_file_writer(str(summary_dir / "fine_tune"))
        if summary_dir is not None
        else tf.summary.create_noop_writer()
    )
    rng_seed = _seed(seed, 7)
    try:
        while not state["done"] and state["epoch"] < max_epochs:
            epoch = state["epoch"] + 1
            t = time.perf_counter()
            order = np.random.default_rng(_seed(rng_seed, epoch)).permutation(train)
            order = order[: steps_per_epoch * batch_size] if len(order) >= batch_size else order
            losses, correct = [], 0.0
            for idx, x in _image_batches(items, order, size, batch_size, distortion, _seed(rng_seed, epoch, 1), pool):
                loss, hits = step(tf.constant(x), tf.constant(labels[idx], tf.int64))
                losses.append(float(loss))
                correct += float(hits)
            val = accuracy(splits["validation"])
            record = {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "train_accuracy": correct / len(order),
                "validation_accuracy": val,
                "seconds": time.perf_counter() - t,
            }
            state["history"].append(record)
            with writer.as_default():
                tf.summary.scalar("loss", record["loss"], step=epoch)
                tf.summary.scalar("train_accuracy", record["train_accuracy"], step=epoch)
                tf.summary.scalar("validation_accuracy", val, step=epoch)
            events.step(
                f"Fine-tune epoch {epoch:>2}/{max_epochs}: train accuracy {record['train_accuracy'] * 100:5.1f}%  "
                f"loss {record['loss']:.4f}  validation accuracy {val * 100:5.1f}%  "
                f"({record['seconds']:.0f} s, {len(order) / record['seconds']:.0f} img/s)"
            )
            if not np.isfinite(record["loss"]):
                raise FlowerxError(
                    f"fine-tuning diverged in epoch {epoch} (the loss is not finite): lower "
                    f"--fine-tune-learning-rate (it is {learning_rate:g}); no model written"
                )
            if val > state["best_accuracy"]:
                state["best_epoch"], state["best_accuracy"], best = epoch, val, snapshot(ema)
            state["epoch"] = epoch
            state["done"] = epoch >= max_epochs or epoch - max(state["best_epoch"], max_epochs // 2) >= PATIENCE
            _save(
                checkpoint,
                state,
                {
                    "current": snapshot(),
                    "ema": snapshot(ema),
                    "best": best,
                    "optimizer": [v.numpy() for v in optimizer.variables],
                },
            )
        restore(best)
        test = splits["test"]
        predictions = predict(test) if len(test) else np.zeros(0, int)
    finally:
        writer.flush()
        pool.shutdown(cancel_futures=True)
    return FineTuneResult(
        w.numpy(),
        b.numpy(),
        float(state["best_accuracy"]),
        int(state["best_epoch"]),
        predictions,
        distortion.id,
        state["history"],
    )
