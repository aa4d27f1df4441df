"""Fine-tuning: after the head has converged, train the network's top N blocks with it (`--fine-tune-blocks N`;
by default the architecture's recipe, `recipe`, when the run fits `--time-budget`: flowerx.train decides, from an
estimate made after the first steps, estimate_s).

Each epoch every training image is decoded again and freshly distorted (`--flip-left-right` and the other
distortion flags; a mild default when none is given), so the network never sees the same pixels twice: what
makes fine-tuning generalise on a few thousand photos, and why it cannot use the bottleneck cache.
BatchNorm layers keep their ImageNet statistics (inference mode), as is usual for small datasets. The
optimizer is Adam with a cosine-decayed learning rate: plain SGD diverges on MobileNet v1, whose frozen
BatchNorm layers scale some depthwise weights' gradients up enormously (measured: SGD at 1e-3 dropped
validation accuracy to chance within 20 steps). Validation, the kept epoch and the export use an exponential
moving average of the weights (measured on mobilenet_1.0_224: validation accuracy climbs more steadily, 95.8%
against 95.1% at the same epoch). Early stopping on validation accuracy, its patience counted from half the
epochs, keeps the best epoch, or the head alone when no epoch beat it. Progressive resizing (low_res): the
early epochs train on smaller views (a 160-pixel step costs half a 224-pixel one), the last ones at the
network's size, and only those may be kept. After each epoch a checkpoint
(weights, optimizer state, early-stopping state) is written atomically, so an interrupted run resumes at its
next epoch, and a rerun with the same data and settings computes nothing again.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .architectures import Architecture
from .data import Distortion, ImageItem, prepare_image
from .errors import FlowerxError
from .events import QUIET, Events
from .fileio import atomic_write
from .parallel import chunked, default_workers, map_ahead

# Used when fine-tuning and no distortion flag is given: without distortions every epoch shows the network
# the same pixels, which it learns by heart. Mild on purpose: photos are not upside down or recoloured.
# No --random-crop: its margin always zooms in (views 1.1-1.2x larger than the test images); --random-scale
# alone zooms 1.0-1.15x at a random position, closer to what the network sees at test time.
DEFAULT_DISTORTION = Distortion(flip_left_right=True, random_scale=15, random_brightness=10)
CHECKPOINT_VERSION = 3  # 2: images decoded to sRGB; 3: epochs record their view size, ties go to the later epoch
PREDICT_BATCH = 64
# With a time budget, the first steps are timed (after WARMUP_STEPS, which trace the graph) to estimate the run;
# an epoch of WARMUP_STEPS steps or fewer (64 training images) is not estimated.
WARMUP_STEPS, PROBE_STEPS = 2, 4
AHEAD_BATCHES = 3  # batches decoded ahead of the training step
# Where the recipe's epochs do not fit --time-budget, fewer do, down to this many (mobilenet_1.0_224, top 9 blocks,
# 3 epochs: validation 92.2% against the head's 89.9%, test 92.8% against 91.5%); below it, the head alone.
MIN_EPOCHS = 3


@dataclass(frozen=True)
class Probe:
    """What the first steps measured: step_s per step on views of side size (the network's: full), with steps
    steps an epoch, validation images, decode_s seconds of decoding per image (decode_time)."""

    step_s: float
    size: int
    full: int
    steps: int
    validation: int
    decode_s: float

    def run_s(self, cfg: FineTuneConfig) -> float:
        """Seconds of a fresh run of cfg: its validation before, every epoch and its validation."""
        return estimate_s(cfg, self.step_s, self.size, self.full, 0, self.steps, self.validation, 0, self.decode_s)


class OverBudget(Exception):
    """Fine-tuning would end after its deadline (found after its first steps; nothing new was kept). resumed:
    the run had resumed a checkpoint's epochs (which stays as it was)."""

    def __init__(self, estimate_s: float, left_s: float, probe: Probe):
        super().__init__(f"estimated {estimate_s:.0f} s more, {left_s:.0f} s left")
        self.estimate_s, self.left_s, self.probe, self.resumed = estimate_s, left_s, probe, False


@dataclass(frozen=True)
class FineTuneConfig:
    """How the top blocks are fine-tuned. The defaults are what was measured best on validation accuracy
    (mobilenet_1.0_224 on the flower photos: README, "Beyond the last layer")."""

    blocks: int  # top blocks trained (MobileNet v1: 1-13, 13 = all; Inception V3: 1-10)
    learning_rate: float = 1e-4  # Adam, cosine-decayed to 0 over max_epochs
    max_epochs: int = 12
    batch_size: int = 32
    distortion: Distortion = DEFAULT_DISTORTION  # fresh views each epoch; an inactive one means the default
    seed: int = 0
    # Fine-tuning reaches ~100% train accuracy: softer targets keep it from over-confidence.
    label_smoothing: float = 0.1
    # Per step: validation, the kept epoch and the export use an average of the last ~100 steps' weights.
    ema_decay: float = 0.99
    # Epochs without a better validation accuracy before stopping, counted from half the epochs: the first
    # epochs, at the highest learning rate, often dip below the head alone before they climb past it.
    patience: int = 3
    # Progressive resizing: the early epochs train on low_res-pixel views (a 160-pixel step costs half a
    # 224-pixel one), the last full_res_epochs at the network's own size, which validation and the export use.
    low_res: int = 0  # 0: every epoch at the network's size
    full_res_epochs: int = 2

    @property
    def views(self) -> Distortion:
        return self.distortion if self.distortion.active else DEFAULT_DISTORTION

    def first_kept_epoch(self, full: int) -> int:
        """The first epoch that trains at the network's size full, and so may be kept."""
        return self.max_epochs - self.full_res_epochs + 1 if 0 < self.low_res < full else 1

    def size(self, epoch: int, full: int) -> int:
        """The side of the training views in epoch (1-based)."""
        return self.low_res if epoch < self.first_kept_epoch(full) else full

    def schedule(self, full: int) -> str:
        """The epochs' view sizes in words, e.g. "6 epochs (4 at 160 px, then 2 at 224 px)"."""
        low = self.first_kept_epoch(full) - 1
        if low < 1:
            return f"{self.max_epochs} epoch{'s' * (self.max_epochs != 1)} at {full} px"
        return f"{self.max_epochs} epochs ({low} at {self.low_res} px, then {self.max_epochs - low} at {full} px)"


def recipe(arch: Architecture) -> tuple[int, int, int]:
    """The default (blocks, epochs, low_res) for arch, measured on mobilenet_1.0_224 and mobilenet_0.25_224 (README,
    "Beyond the last layer"). Where a full-size epoch is costly (MobileNet widths 0.75-1.0 at 192-224): the top 9
    of 13 blocks for 6 epochs at the network's size (a step back-propagates through less of the network, 0.7x
    the time of all 13, so every epoch can be full size: 1.0 validation point better than all 13 blocks with 4
    of the 6 epochs at 160 pixels, for 1.13x the time). Inception V3 keeps all its blocks and 160-pixel
    early epochs (not measured: no weights here). A narrow network is cheap at full size and learns nothing from
    small views (mobilenet_0.25_224 never beat its head with them): all 13 blocks, 12 epochs at its own size."""
    if arch.family == "inception_v3":
        return all_blocks(arch), 6, 160
    if arch.alpha >= 0.75 and arch.input_size >= 192:
        return 9, 6, 0
    return all_blocks(arch), 12, 0


def epochs_that_fit(cfg: FineTuneConfig, probe: Probe, seconds: float) -> int:
    """The most epochs, fewer than cfg.max_epochs and at least MIN_EPOCHS, that a fresh run of cfg takes at most
    seconds for, as the probe estimates it; 0 when not even MIN_EPOCHS do. (A run's time grows with its
    epochs: a binary search.)"""
    lo, hi = MIN_EPOCHS - 1, cfg.max_epochs - 1  # lo fits (or is the "none" below MIN_EPOCHS); hi is tried
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if probe.run_s(replace(cfg, max_epochs=mid)) <= seconds:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo >= MIN_EPOCHS else 0


def all_blocks(arch: Architecture) -> int:
    """The --fine-tune-blocks that trains the whole network."""
    return 10 if arch.family == "inception_v3" else 13


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
    resumed: bool = False  # a checkpoint of this run was found (a finished one: no epoch ran)
    trained: int = 0  # epochs this call ran (the rest of history came from the checkpoint)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@contextmanager
def _image_batches(
    items: Sequence[ImageItem],
    order: np.ndarray,
    size: int,
    batch_size: int,
    distortion: Distortion | None,
    seed: int,
    decode_s: list[float] | None = None,
) -> Iterator[Iterator[tuple[np.ndarray, np.ndarray]]]:
    """`with _image_batches(...) as batches:` (indices, uint8 images) per batch of order, each image decoded (and
    distorted) as its own task on all cores, up to AHEAD_BATCHES batches ahead of the training step; PIL
    releases the GIL, so decoding overlaps TensorFlow's work. decode_s, if given, gets each decode's wall
    seconds."""

    def decode(i: int) -> np.ndarray:
        t = time.perf_counter()
        if distortion is None:
            image = prepare_image(items[i].path, size)
        else:
            image = distortion.view(items[i].path, size, _seed(seed, i))
        if decode_s is not None:
            decode_s.append(time.perf_counter() - t)  # list.append is atomic
        return image

    with map_ahead(decode, order, in_flight=AHEAD_BATCHES * batch_size) as views:
        yield ((idx, np.stack([next(views) for _ in idx])) for idx in chunked(order, batch_size))


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


_UNREADABLE = (OSError, ValueError, KeyError, EOFError, json.JSONDecodeError)  # missing, partial or foreign


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
    except _UNREADABLE:
        return None


class _Tuner:
    """The TensorFlow side of one fine-tuning run: a copy of the network that takes images of any size, its
    trainable weights (top blocks + head), their moving average, the optimizer and the compiled step."""

    def __init__(self, base, arch: Architecture, cfg: FineTuneConfig, kernel, bias, steps: int):
        from .backbone import build_base, keras, tf

        self.tf, self.cfg, self.size, self.arch = tf, cfg, arch.input_size, arch
        self.net = build_base(arch, None, any_size=True)
        self.net.set_weights(base.get_weights())
        cut = [layer.name for layer in self.net.layers].index(cut_layer(arch, cfg.blocks))
        self.net.trainable = True
        for i, layer in enumerate(self.net.layers):
            layer.trainable = i > cut and not isinstance(layer, keras.layers.BatchNormalization)
        self.w = tf.Variable(kernel.astype(np.float32), name="head_kernel")
        self.b = tf.Variable(bias.astype(np.float32), name="head_bias")
        self.variables = list(self.net.trainable_variables) + [self.w, self.b]
        schedule = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, cfg.max_epochs * steps)
        self.optimizer = keras.optimizers.Adam(schedule)
        self.optimizer.build(self.variables)
        self.ema = [tf.Variable(v.numpy(), trainable=False) for v in self.variables]  # starts at the head alone
        self.step = tf.function(self._step, reduce_retracing=True)
        self.logits = tf.function(self._logits, reduce_retracing=True)

    def _logits(self, x):
        """uint8 images of any size -> the head's logits (normalised as the exported network does)."""
        tf, arch = self.tf, self.arch
        pixels = tf.cast(x, tf.float32) * (1.0 / arch.std) + (-arch.mean / arch.std)
        return tf.matmul(self.net(pixels, training=False), self.w) + self.b

    def _step(self, x, y):
        """One Adam step with label smoothing; updates the moving average. Returns (loss, correct count)."""
        tf, smoothing = self.tf, self.cfg.label_smoothing
        with tf.GradientTape() as tape:
            logits = self._logits(x)
            classes = tf.shape(logits)[1]
            targets = tf.one_hot(y, classes) * (1 - smoothing) + smoothing / tf.cast(classes, tf.float32)
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, logits))
        self.optimizer.apply_gradients(zip(tape.gradient(loss, self.variables), self.variables))
        for average, v in zip(self.ema, self.variables):
            average.assign(self.cfg.ema_decay * average + (1 - self.cfg.ema_decay) * tf.convert_to_tensor(v))
        return loss, tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1), y), tf.float32))

    def snapshot(self, of: list | None = None) -> list[np.ndarray]:
        return [v.numpy() for v in (self.variables if of is None else of)]

    def restore(self, values: list[np.ndarray], to: list | None = None) -> None:
        for v, value in zip(self.variables if to is None else to, values):
            v.assign(value)

    def predict(self, items: Sequence[ImageItem], idx: np.ndarray) -> np.ndarray:
        with _image_batches(items, idx, self.size, PREDICT_BATCH, None, 0) as batches:
            out = [self.logits(self.tf.constant(x)).numpy().argmax(1) for _, x in batches]
        return np.concatenate(out) if out else np.zeros(0, int)

    def averaged_accuracy(self, items: Sequence[ImageItem], labels: np.ndarray, idx: np.ndarray) -> float:
        """Accuracy of the averaged weights (the training weights are put back after)."""
        current = self.snapshot()
        self.restore(self.snapshot(self.ema))
        try:
            return float((self.predict(items, idx) == labels[idx]).mean())
        finally:
            self.restore(current)

    def arrays(self, best: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
        """Everything a checkpoint holds besides its state."""
        return {
            "current": self.snapshot(),
            "ema": self.snapshot(self.ema),
            "best": best,
            "optimizer": [v.numpy() for v in self.optimizer.variables],
        }

    def load(self, arrays: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
        """Put a checkpoint's weights back; returns its best weights."""
        self.restore(arrays["current"])
        self.restore(arrays["ema"], self.ema)
        for v, value in zip(self.optimizer.variables, arrays["optimizer"]):
            v.assign(value)
        return arrays["best"]


def decode_time(decode_s: Sequence[float], batch_size: int) -> float:
    """Wall seconds per image of decoding on all its threads, from each decode's wall time (measured while
    TensorFlow trained, so sharing the cores is counted)."""
    workers = min(default_workers(), AHEAD_BATCHES * batch_size)  # _image_batches' threads at work
    return float(np.median(decode_s)) / workers if len(decode_s) else 0.0


def estimate_s(
    cfg: FineTuneConfig,
    step_s: float,
    size: int,
    full: int,
    steps_left: int,
    steps: int,
    validation: int,
    epoch: int,
    decode_s: float = 0.0,
) -> float:
    """Seconds still to go in a run that takes step_s per step at side size now: steps_left more steps of this
    epoch (1-based), its validation, then the later epochs of `steps` steps (a step's cost grows with the
    pixels) and their validation (an image costs about a third of a trained one at full size: forward only),
    up to cfg.max_epochs (early stopping may end sooner). decode_s: decoding's seconds per image (decode_time);
    a step, or a validated image, lasts at least as long as decoding it, whatever the view's size (a JPEG
    decodes at about its own size)."""

    def step(side: int) -> float:
        return max(step_s * (side / size) ** 2, decode_s * cfg.batch_size)

    validate = validation * max(step_s * (full / size) ** 2 / cfg.batch_size / 3, decode_s)
    # the later epochs, epoch + 1 .. max_epochs: those before first_kept_epoch at low_res, the rest full size
    low = max(0, min(cfg.max_epochs + 1, cfg.first_kept_epoch(full)) - epoch - 1)
    later = steps * (low * step(cfg.size(epoch + 1, full)) + (cfg.max_epochs - epoch - low) * step(full))
    return steps_left * step(size) + later + validate * (cfg.max_epochs - epoch + 1)


def _epoch(
    tuner: _Tuner,
    items,
    labels: np.ndarray,
    splits: dict[str, np.ndarray],
    epoch: int,
    steps: int,
    deadline: float | None = None,
) -> tuple[dict, int]:
    """One epoch over fresh views of the training images (a seeded order), then validation: (its record,
    images trained on). deadline: a time.perf_counter() the whole run must end by, checked after the first
    steps (OverBudget)."""
    cfg, tf = tuner.cfg, tuner.tf
    t = time.perf_counter()
    rng_seed = _seed(cfg.seed, 7)
    order = np.random.default_rng(_seed(rng_seed, epoch)).permutation(splits["train"])
    order = order[: steps * cfg.batch_size] if len(order) >= cfg.batch_size else order
    losses, correct, estimate = [], 0.0, None
    seed, size = _seed(rng_seed, epoch, 1), cfg.size(epoch, tuner.size)
    batches_in_epoch = -(-len(order) // cfg.batch_size)
    probe_at = min(WARMUP_STEPS + PROBE_STEPS, batches_in_epoch)  # a short epoch: time what steps it has
    decode_s: list[float] | None = [] if deadline is not None else None  # timed only to estimate
    with _image_batches(items, order, size, cfg.batch_size, cfg.views, seed, decode_s) as batches:
        for step, (idx, x) in enumerate(batches, 1):
            if step == WARMUP_STEPS + 1:
                probe = time.perf_counter()
                if decode_s is not None:
                    decode_s.clear()  # decodes while the graph traced had the cores to themselves
            loss, hits = tuner.step(tf.constant(x), tf.constant(labels[idx], tf.int64))
            losses.append(float(loss))
            correct += float(hits)
            if deadline is not None and step == probe_at > WARMUP_STEPS:
                now = time.perf_counter()
                step_s, left = (now - probe) / (probe_at - WARMUP_STEPS), batches_in_epoch - step
                decoding = decode_time(decode_s or [], cfg.batch_size)
                timed = Probe(step_s, size, tuner.size, steps, len(splits["validation"]), decoding)
                to_go = estimate_s(cfg, step_s, size, tuner.size, left, steps, timed.validation, epoch, decoding)
                estimate = now - t + to_go
                if now + to_go > deadline:
                    raise OverBudget(to_go, deadline - now, timed)
    record = {"epoch": epoch, "size": size, "loss": float(np.mean(losses)), "train_accuracy": correct / len(order)}
    if estimate is not None:  # the run's estimated seconds from this epoch's start (checked against the deadline)
        record["estimated_s"] = estimate
    record["validation_accuracy"] = tuner.averaged_accuracy(items, labels, splits["validation"])
    record["seconds"] = time.perf_counter() - t
    return record, len(order)


def _key_settings(arch: Architecture, cfg: FineTuneConfig) -> dict:
    """What a checkpoint depends on. The names are those the key had before FineTuneConfig existed, so
    existing checkpoints stay valid."""
    settings = {
        "architecture": arch.name,
        "blocks": cfg.blocks,
        "learning_rate": cfg.learning_rate,
        "max_epochs": cfg.max_epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "distortion": cfg.views.id,
        "label_smoothing": cfg.label_smoothing,
        "ema": cfg.ema_decay,
    }
    if cfg.patience != FineTuneConfig.patience:
        settings["patience"] = cfg.patience
    if cfg.low_res:
        settings.update(low_res=cfg.low_res, full_res_epochs=cfg.full_res_epochs)
    return settings


def _run_key(
    arch: Architecture, cfg: FineTuneConfig, items: Sequence[ImageItem], splits: dict, key_parts: dict | None
) -> str:
    """The checkpoint key of a run: its settings, its splits' sizes, key_parts, and its training and
    validation images."""
    return checkpoint_key(
        {**_key_settings(arch, cfg), "splits": {k: len(v) for k, v in splits.items()}, **(key_parts or {})},
        [items[i] for i in np.concatenate([splits["train"], splits["validation"]])],
    )


def shortened_epochs(
    checkpoint: Path,
    arch: Architecture,
    cfg: FineTuneConfig,
    items: Sequence[ImageItem],
    splits: dict,
    key_parts: dict | None = None,
) -> int | None:
    """The epochs of the run that checkpoint holds when it is cfg's run shortened to fewer epochs to fit
    --time-budget (its shortened_from is cfg.max_epochs), so a rerun resumes or reuses it instead of training
    anew; else None (a run asked for with fewer epochs is another run)."""
    try:
        with np.load(checkpoint, allow_pickle=False) as data:
            state = json.loads(str(data["state"]))
    except _UNREADABLE:
        return None
    epochs = state.get("max_epochs")
    if state.get("version") != CHECKPOINT_VERSION or state.get("shortened_from") != cfg.max_epochs:
        return None
    if not isinstance(epochs, int) or not 0 < epochs < cfg.max_epochs:
        return None
    shortened = replace(cfg, max_epochs=epochs)
    return epochs if state.get("key") == _run_key(arch, shortened, items, splits, key_parts) else None


def fine_tune(
    base,
    arch: Architecture,
    cfg: FineTuneConfig,
    items: Sequence[ImageItem],
    labels: np.ndarray,
    splits: dict[str, np.ndarray],
    kernel: np.ndarray,
    bias: np.ndarray,
    checkpoint: Path,
    events: Events = QUIET,
    summary_dir: Path | None = None,
    key_parts: dict | None = None,
    deadline: float | None = None,
    shortened_from: int = 0,
) -> FineTuneResult:
    """Train the top cfg.blocks blocks of base and the head on freshly distorted training images; returns the
    best epoch's head, and puts the best epoch's weights into base (unchanged when no epoch beat the head).
    key_parts: what else the starting point depends on (the head's settings), for the checkpoint's key.
    deadline: a time.perf_counter() the run must end by: OverBudget after the first steps when it would not.
    shortened_from: the epochs asked for, where a budget shortened this run (in the checkpoint: shortened_epochs)."""
    train, validation = splits["train"], splits["validation"]
    steps = max(1, len(train) // cfg.batch_size)
    tuner = _Tuner(base, arch, cfg, kernel, bias, steps)
    key = _run_key(arch, cfg, items, splits, key_parts)
    state, best, resumed = _resume_or_start(checkpoint, key, tuner, items, labels, validation, events)
    state.update(max_epochs=cfg.max_epochs, shortened_from=shortened_from)  # what shortened_epochs reads
    tf = tuner.tf
    writer = (
        tf.summary.create_file_writer(str(summary_dir / "fine_tune"))
        if summary_dir is not None
        else tf.summary.create_noop_writer()
    )
    first = state["epoch"]  # the checkpoint's epochs
    try:
        while not state["done"] and state["epoch"] < cfg.max_epochs:
            record, images = _epoch(tuner, items, labels, splits, state["epoch"] + 1, steps, deadline)
            deadline = None  # estimated once, from the first epoch this process runs
            best = _record(state, record, images, best, tuner, writer, events)
            _save(checkpoint, state, tuner.arrays(best))
        tuner.restore(best)
        base.set_weights(tuner.net.get_weights())
        test = splits["test"]
        predictions = tuner.predict(items, test) if len(test) else np.zeros(0, int)
    except OverBudget as e:
        e.resumed = first > 0
        raise
    finally:
        writer.flush()
    return FineTuneResult(
        tuner.w.numpy(),
        tuner.b.numpy(),
        float(state["best_accuracy"]),
        int(state["best_epoch"]),
        predictions,
        cfg.views.id,
        state["history"],
        resumed=resumed,
        trained=state["epoch"] - first,
    )


def _resume_or_start(
    checkpoint: Path, key: str, tuner: _Tuner, items, labels: np.ndarray, validation: np.ndarray, events: Events
) -> tuple[dict, list[np.ndarray], bool]:
    """This run's checkpoint put back (state, best weights, True), or a fresh start measured on validation."""
    loaded = _load(checkpoint, key)
    if loaded:
        state, best = loaded[0], tuner.load(loaded[1])
        events.info(
            f"Fine-tune: {'finished' if state['done'] else 'resuming'} after epoch {state['epoch']} "
            f"(checkpoint {checkpoint})"
        )
        return state, best, True
    start = tuner.averaged_accuracy(items, labels, validation)
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
    events.info(
        f"Fine-tune the top {tuner.cfg.blocks} block(s), {tuner.cfg.schedule(tuner.size)}, on fresh views "
        f"({tuner.cfg.views.id}): validation accuracy before {start * 100:5.1f}%"
    )
    return state, tuner.snapshot(), False


def _record(state: dict, record: dict, images: int, best: list, tuner: _Tuner, writer, events: Events) -> list:
    """Log an epoch, keep the best weights so far, decide early stopping; returns the best weights."""
    epoch, val, tf, cfg = record["epoch"], record["validation_accuracy"], tuner.tf, tuner.cfg
    state["history"].append(record)
    with writer.as_default():
        for name in ("loss", "train_accuracy", "validation_accuracy"):
            tf.summary.scalar(name, record[name], step=epoch)
    events.step(
        f"Fine-tune epoch {epoch:>2}/{cfg.max_epochs}: train accuracy {record['train_accuracy'] * 100:5.1f}%  "
        f"loss {record['loss']:.4f}  validation accuracy {val * 100:5.1f}%  "
        f"({record['seconds']:.0f} s, {images / record['seconds']:.0f} img/s)"
    )
    if not np.isfinite(record["loss"]):
        raise FlowerxError(
            f"fine-tuning diverged in epoch {epoch} (the loss is not finite): lower "
            f"--fine-tune-learning-rate (it is {cfg.learning_rate:g}); no model written"
        )
    # Only full-size epochs may be kept (a network trained on smaller views is not done); a tie goes to the
    # later epoch, trained longer, but the head alone must be beaten outright.
    first = cfg.first_kept_epoch(tuner.size)
    if epoch >= first and (val > state["best_accuracy"] or (val == state["best_accuracy"] and state["best_epoch"])):
        state["best_epoch"], state["best_accuracy"], best = epoch, val, tuner.snapshot(tuner.ema)
    state["epoch"] = epoch
    state["done"] = (
        epoch >= cfg.max_epochs or epoch - max(state["best_epoch"], cfg.max_epochs // 2, first - 1) >= cfg.patience
    )
    return best
