"""The new last layer: a softmax over the cached bottlenecks, its training and its accuracy.

Used by training (flowerx.train) and by int8 export (flowerx.quantize) alike. TensorFlow is imported only
inside train_head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FlowerxError
from .events import QUIET, Events


@dataclass(frozen=True)
class HeadConfig:
    """How the softmax layer is trained (retrain.py's recipe by default)."""

    steps: int = 4000
    learning_rate: float = 0.01
    batch_size: int = 100
    eval_interval: int = 100  # evaluate on validation images (and report a step line) this often
    validation_batch_size: int = -1  # validation images per evaluation; -1: all
    seed: int = 0


def sample(indices: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """size of indices at random (all of them when size is -1 or covers them)."""
    return indices if size < 0 or size >= len(indices) else rng.choice(indices, size, replace=False)


STEPS_PER_CALL = 100  # batches gathered per graph call: bounds memory, whatever the dataset's size


def predict_logits(
    x: np.ndarray, idx: np.ndarray, kernel: np.ndarray, bias: np.ndarray, chunk: int = 65536
) -> np.ndarray:
    """Logits of the rows idx of x, a chunk at a time (x may be a memory-mapped file)."""
    parts = [x[idx[i : i + chunk]] @ kernel + bias for i in range(0, len(idx), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, kernel.shape[1]), np.float32)


def accuracy_of(x: np.ndarray, y: np.ndarray, idx: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> float:
    return float((predict_logits(x, idx, kernel, bias).argmax(1) == y[idx]).mean()) if len(idx) else float("nan")


def _sgd_steps(tf, kernel, bias, optimizer):
    """A graph function running len(xs) SGD steps in one call (no Python per step), writing train summaries."""

    @tf.function
    def run_steps(first, xs, ys):
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

    return run_steps


def train_head(
    x: np.ndarray,
    y: np.ndarray,
    splits: dict[str, np.ndarray],
    num_classes: int,
    cfg: HeadConfig,
    events: Events = QUIET,
    summary_dir: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Plain mini-batch SGD on a softmax layer (retrain.py's recipe; measured as good as Adam, L2,
    label smoothing or dropout on these features). Returns (kernel, bias, last validation accuracy).
    A run whose loss or weights stop being finite (a learning rate far too high) fails at once."""
    from .backbone import tf

    tf.random.set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    kernel = tf.Variable(tf.random.truncated_normal([x.shape[1], num_classes], stddev=0.001, seed=cfg.seed))
    bias = tf.Variable(tf.zeros([num_classes]))
    run_steps = _sgd_steps(tf, kernel, bias, tf.keras.optimizers.SGD(cfg.learning_rate))
    train_idx = splits["train"]
    batch = min(cfg.batch_size, len(train_idx))
    writers = [
        tf.summary.create_file_writer(str(summary_dir / name))
        if summary_dir is not None
        else tf.summary.create_noop_writer()
        for name in ("train", "validation")
    ]
    done, total, val_acc = 0, cfg.steps, float("nan")
    while done < total:
        end = min(done + cfg.eval_interval, total)
        while done < end:  # feed at most STEPS_PER_CALL batches at a time: x may be a memory-mapped file
            count = min(STEPS_PER_CALL, end - done)
            picks = rng.choice(train_idx, (count, batch))
            xs = tf.constant(x[picks.ravel()].reshape(count, batch, -1))
            with writers[0].as_default():
                loss, acc = run_steps(tf.constant(done, tf.int64), xs, tf.constant(y[picks], tf.int64))
            done += count
        val_idx = sample(splits["validation"], cfg.validation_batch_size, rng)
        val_acc = accuracy_of(x, y, val_idx, kernel.numpy(), bias.numpy())
        with writers[1].as_default():
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
    for writer in writers:
        writer.flush()
    return kernel.numpy(), bias.numpy(), val_acc
