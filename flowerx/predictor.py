"""The Predictor: runs a flowerx ONNX model on onnxruntime. No TensorFlow, tf2onnx or onnx here.

Everything the model needs to be fed correctly (labels, input size, resize rule) comes from the model's
own metadata, so callers never guess. Everything read from a model is checked when it loads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import data
from .contract import LABELS, OUTPUT, Contract, check_labels
from .data import ImageSource, prepare_image
from .errors import FlowerxError
from .fileio import RefusedFile, check_regular, read_regular, user_cache_dir

log = logging.getLogger("flowerx")
OPENVINO = "OpenVINOExecutionProvider"
_BF16 = json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}})  # the `precision` option "BF16" falls back to CPU
PROVIDERS: dict[str, list] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "openvino": [(OPENVINO, {"device_type": "CPU"}), "CPUExecutionProvider"],
    # reduced precision, opt-in: bf16 where the CPU has it (AMX, AVX512-BF16, AVX2-VNNI-2); measure its accuracy first
    "openvino-bf16": [(OPENVINO, {"device_type": "CPU", "load_config": _BF16}), "CPUExecutionProvider"],
}


@functools.cache
def openvino_has_bf16() -> bool | None:
    """Whether OpenVINO runs bf16 natively on this CPU (AMX, AVX512-BF16, AVX2-VNNI-2), as its own CPU plugin
    says through the C library onnxruntime-openvino ships; None when that cannot be asked. Elsewhere the bf16
    hint is ignored and OpenVINO runs fp32 (measured on an AVX2-only CPU: fp32's probabilities, to 3e-6)."""
    import ctypes
    import glob

    found = glob.glob(os.path.join(os.path.dirname(ort.__file__), "capi", "*openvino_c.*"))
    try:
        lib = ctypes.CDLL(sorted(found, key=len)[0])
        core, value = ctypes.c_void_p(), ctypes.c_char_p()
        if lib.ov_core_create(ctypes.byref(core)) != 0:
            return None
        try:
            if lib.ov_core_get_property(core, b"CPU", b"OPTIMIZATION_CAPABILITIES", ctypes.byref(value)) != 0:
                return None
            try:
                return "BF16" in (value.value or b"").decode(errors="replace").split()
            finally:
                lib.ov_free(value)
        finally:
            lib.ov_core_free(core)
    except (IndexError, OSError, AttributeError):  # no such library, or not the C API it should be
        return None


MAX_LABELS_FILE = 16 << 20
CPU_RUN_BATCH = 8  # images per onnxruntime run on the CPU (Predictor._run)
SESSIONS_KEPT = 16  # optimised sessions kept in the user cache; the least recently written go first
_SESSION_NAME = re.compile(r"[0-9a-f]{32}\.ort")
_SESSION_TEMP = re.compile(r"\.[0-9a-f]{32}\.[0-9]+\.[0-9]+\.tmp\.ort")  # _load_session's temp names
STALE_TEMP_S = 3600  # a session's temp file this old was left by a killed process (writing one takes seconds)


class Prediction(tuple):
    """One ranked label. Unpacks as (label, score), like the tuples of earlier flowerx; also has .label,
    .score, .index (the class's position in the model's labels) and to_dict() for JSON."""

    def __new__(cls, label: str, score: float, index: int) -> Prediction:
        self = super().__new__(cls, (label, score))
        self.index = index
        return self

    @property
    def label(self) -> str:
        return self[0]

    @property
    def score(self) -> float:
        return self[1]

    def to_dict(self) -> dict:
        return {"label": self.label, "score": self.score, "index": self.index}

    def __getnewargs__(self):
        return (self.label, self.score, self.index)

    def __repr__(self) -> str:
        return f"Prediction(label={self.label!r}, score={self.score:.6f}, index={self.index})"


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """A labels file: one label per line (UTF-8), blank lines ignored."""
    path = Path(path).expanduser()
    try:
        text = read_regular(path, MAX_LABELS_FILE).decode("utf-8")
    except FileNotFoundError:
        raise FlowerxError(f"{path}: no such labels file") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = str(e) if isinstance(e, RefusedFile) else getattr(e, "strerror", None) or e
        raise FlowerxError(f"cannot read labels file {path}: {reason}") from None
    return check_labels([line.strip() for line in text.splitlines() if line.strip()], str(path))


def _check_top_k(top_k: object) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise FlowerxError(f"top_k must be a whole number >= 1 (or None for all labels), got {top_k!r}")


def _options(threads: int, optimize: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


@functools.cache
def _cpu_flags() -> str:
    """What the optimised graph depends on besides onnxruntime: the CPU's instruction sets (NCHWc block size)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def session_cache_path(path: Path) -> Path | None:
    """Where the user cache keeps this model file as onnxruntime optimised it on this machine (ORT format),
    keyed by the file (path, size, modification time, inode: a rewritten model gets a new entry), the
    onnxruntime version and the CPU; None if the file cannot be looked at."""
    try:
        st = path.stat()
    except OSError:
        return None
    parts = [os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, ort.__version__, platform.machine()]
    key = hashlib.sha256(("|".join(map(str, parts)) + _cpu_flags()).encode("utf-8", "surrogateescape"))
    return user_cache_dir() / "sessions" / f"{key.hexdigest()[:32]}.ort"


def _load_session(path: Path, threads: int, providers: list[str]) -> ort.InferenceSession:
    """The model's onnxruntime session. On the CPU its optimised graph is kept in the user cache (written
    atomically on the first load), and later loads read it with no optimisation to redo: 35 ms instead of
    75 for mobilenet_1.0_224 in a new process, a sixth of `flowerx classify one.jpg`. A cache that cannot be read or
    written is passed over: the model then loads as it always did."""
    cached = session_cache_path(path) if providers == PROVIDERS["cpu"] else None
    if cached is not None and cached.is_file():
        try:
            return ort.InferenceSession(str(cached), _options(threads, optimize=False), providers=providers)
        except Exception:  # damaged or from elsewhere: made again below
            log.info("flowerx: cannot load the cached session %s; optimising the model again", cached)
    options = _options(threads)
    tmp = None
    if cached is not None:
        tmp = cached.with_name(f".{cached.stem}.{os.getpid()}.{threading.get_ident()}.tmp.ort")  # .ort: that format
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            options.optimized_model_filepath = str(tmp)
        except OSError:
            tmp = None
    source: str | bytes = str(path)
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8: onnxruntime takes the bytes instead
        source = read_regular(path)
    try:
        session = ort.InferenceSession(source, options, providers=providers)
        if tmp is not None and tmp.is_file():
            try:
                os.replace(tmp, cached)
                _prune(cached.parent)
            except OSError:  # the cache only: the session is good
                pass
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return session


def _prune(folder: Path) -> None:
    """Keep the SESSIONS_KEPT newest optimised sessions (files flowerx named: 32 hex digits + .ort), and drop
    the temp files (.<32 hex>.<pid>.<thread>.tmp.ort) that killed processes left, once STALE_TEMP_S old."""
    ours: list[tuple[int, Path]] = []  # (modification time, path)
    now = time.time()
    for p in folder.glob("*.ort"):
        try:  # another process may rename or remove any of these meanwhile
            st = p.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):  # flowerx writes only regular files here: a link or folder is not ours
            continue
        if _SESSION_NAME.fullmatch(p.name):
            ours.append((st.st_mtime_ns, p))
        elif _SESSION_TEMP.fullmatch(p.name) and now - st.st_mtime > STALE_TEMP_S:
            p.unlink(missing_ok=True)
    for _, old in sorted(ours)[:-SESSIONS_KEPT]:
        old.unlink(missing_ok=True)


class Predictor:
    """Classify images with an exported flowerx model.

    >>> p = Predictor("model.onnx")
    >>> p.predict("daisy.jpg", top_k=1)
    [Prediction(label='daisy', score=0.995..., index=0)]

    providers: "auto" (CUDA when onnxruntime-gpu and a GPU are present, else OpenVINO when onnxruntime-openvino
    is installed, else the CPU), "cpu", "cuda", "openvino" or "openvino-bf16" (reduced precision: opt-in).
    labels / input_size: only for ONNX models without flowerx metadata.
    max_image_bytes: image files larger than this are refused unread (default: 64 MiB or FLOWERX_MAX_IMAGE_MB).
    Images: a path (str or os.PathLike, ~ expanded), bytes-like, a PIL image (never modified) or a uint8 array.
    `probabilities_out` is False for a model whose outputs are not probabilities (rows not summing to 1):
    its scores are still ranked, and the CLI calls them scores.
    Thread-safe: one Predictor may serve many threads at once.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: str = "auto",
        labels: Sequence[str] | None = None,
        input_size: int | None = None,
        threads: int = 0,
        max_image_bytes: int | None = None,
    ):
        if not isinstance(path, (str, os.PathLike)):
            raise FlowerxError(f"the model must be a path (str or os.PathLike), not {type(path).__name__}")
        self.path = check_regular(Path(path).expanduser(), "model file")  # a FIFO or device would hang the load
        if not isinstance(providers, str) or (providers != "auto" and providers not in PROVIDERS):
            raise FlowerxError(
                f"providers must be 'auto' or one of {', '.join(map(repr, PROVIDERS))}, not {providers!r}"
            )
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise FlowerxError(f"threads must be a whole number >= 0 (0: onnxruntime's default), got {threads!r}")
        if max_image_bytes is not None and not (isinstance(max_image_bytes, int) and max_image_bytes > 0):
            raise FlowerxError(f"max_image_bytes must be a positive whole number, got {max_image_bytes!r}")
        if max_image_bytes is None:
            data.max_image_bytes()  # FLOWERX_MAX_IMAGE_MB is read at each image; a bad one fails here, once
        self.max_image_bytes = max_image_bytes
        available = ort.get_available_providers()
        if providers == "cuda" and "CUDAExecutionProvider" not in available:
            raise FlowerxError(
                "providers='cuda' needs onnxruntime-gpu in place of onnxruntime, and a GPU (README: On a GPU)"
            )
        if providers.startswith("openvino") and OPENVINO not in available:
            raise FlowerxError(
                f"providers={providers!r} needs onnxruntime-openvino in place of onnxruntime (README: OpenVINO)"
            )
        chosen = providers
        if providers == "auto":  # CUDA, else OpenVINO (fp32), else the CPU: what is installed
            chosen = "cuda" if "CUDAExecutionProvider" in available else "openvino" if OPENVINO in available else "cpu"
        wanted = PROVIDERS[chosen]
        if chosen.startswith("openvino") and threads:  # OpenVINO ignores onnxruntime's thread count: its own option
            wanted = [(OPENVINO, {**wanted[0][1], "num_of_threads": str(threads)}), *wanted[1:]]
        try:
            self.session = _load_session(self.path, threads, wanted)
        except Exception as e:  # onnxruntime raises its own types for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FlowerxError(f"{self.path}: not a valid ONNX model ({first[:200]})") from None
        self.provider = self.session.get_providers()[0]
        if self.provider == OPENVINO and chosen == "openvino-bf16":  # the precision is part of what ran
            self.provider += {True: " (bf16)", False: " (fp32: this CPU has no bf16)", None: " (bf16 asked)"}[
                openvino_has_bf16()
            ]
        if providers == "cuda" and self.provider != "CUDAExecutionProvider":
            raise FlowerxError("CUDA was asked for but onnxruntime could not start it (no GPU or CUDA libraries?)")
        log.info("flowerx: running %s on %s", self.path.name, self.provider)

        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.labels, self.input_size = self._read_contract(labels, input_size)
        self._input = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self._output = OUTPUT if OUTPUT in outputs else outputs[0]
        self.probabilities_out = self._warm_up()
        if LABELS in outputs and self.contract.version >= 2 and labels is None:  # given labels override both
            self._check_labels_output()

    def _read_contract(self, labels: Sequence[str] | None, input_size: int | None) -> tuple[list[str], int]:
        name = self.path.name
        self.contract = Contract.from_metadata(self.metadata, name, labels, input_size)
        labels, input_size = self.contract.labels, self.contract.input_size
        size = int(input_size)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        # Contract 2 takes any size (H and W dynamic) and resizes inside; version 1 wants S x S.
        dynamic = len(shape) == 4 and not any(isinstance(d, int) for d in shape[1:3])
        self.any_size = self.contract.version >= 2 and dynamic
        if (
            len(inputs) != 1
            or len(shape) != 4
            or shape[3] != 3
            or any(isinstance(d, int) and d != size for d in shape[1:3])
        ):
            raise FlowerxError(f"{name}: input must be one [N, {size}, {size}, 3] tensor, got {shape}")
        if inputs[0].type != "tensor(uint8)":
            raise FlowerxError(f"{name}: input must be uint8 RGB, got {inputs[0].type}")
        probs = next((o for o in outputs if o.name == OUTPUT), outputs[0])
        out = probs.shape
        if probs.type not in ("tensor(float)", "tensor(double)", "tensor(float16)"):
            raise FlowerxError(f"{name}: output must be float scores, got {probs.type}")
        if len(out) != 2:
            raise FlowerxError(f"{name}: output must be one [N, classes] tensor, got shape {out}")
        if isinstance(out[1], int) and out[1] != len(labels):
            raise FlowerxError(f"{name}: the model has {out[1]} outputs but {len(labels)} labels")
        return [str(label) for label in labels], size

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """The model on a ready batch, its output checked: [N, classes], finite. On the CPU a big batch runs
        CPU_RUN_BATCH images at a time (one output): a CPU gains no speed from more, and onnxruntime's memory
        grows with the batch (peak RSS 499 MB for 32 images of mobilenet_1.0_224, 187 MB for 8)."""
        step = CPU_RUN_BATCH if self.provider == "CPUExecutionProvider" else len(batch)
        parts = [
            self.session.run([self._output], {self._input: np.ascontiguousarray(batch[i : i + step])})[0]
            for i in range(0, len(batch), step)  # callers never run an empty batch
        ]
        out = np.concatenate(parts).astype(np.float32)
        if not isinstance(out, np.ndarray) or out.shape != (len(batch), len(self.labels)):
            raise FlowerxError(
                f"{self.path.name}: the model returned shape {getattr(out, 'shape', '?')}, "
                f"not [{len(batch)}, {len(self.labels)}]"
            )
        if not np.isfinite(out).all():
            raise FlowerxError(f"{self.path.name}: the model returned scores that are not finite (NaN or inf)")
        return out

    def _warm_up(self) -> bool:
        """One run on a grey image: checks the output, warms the session, tells whether outputs are
        probabilities (each row >= 0, summing to 1)."""
        try:
            out = self._run(np.full((1, self.input_size, self.input_size, 3), 128, np.uint8))
        except FlowerxError:
            raise
        except Exception as e:  # onnxruntime's own failures on a model that loads but cannot run
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FlowerxError(f"{self.path.name}: the model fails on a test image ({first[:200]})") from None
        return bool((out >= 0).all() and abs(float(out.sum()) - 1) < 1e-3)

    def _check_labels_output(self) -> None:
        """A contract-2 model's `labels` output (UTF-8 JSON bytes) must say what its metadata says."""
        grey = np.full((1, self.input_size, self.input_size, 3), 128, np.uint8)
        try:
            data = self.session.run([LABELS], {self._input: grey})[0]
            labels = json.loads(np.asarray(data, np.uint8).tobytes().decode("utf-8"))
        except Exception as e:  # a tensor that is not UTF-8 JSON bytes
            raise FlowerxError(f"{self.path.name}: unreadable `{LABELS}` output ({str(e)[:100]})") from None
        if labels != self.labels:
            raise FlowerxError(f"{self.path.name}: its `{LABELS}` output and its labels metadata differ")

    def __repr__(self) -> str:
        shown = ", ".join(map(repr, self.labels[:5])) + (", ..." if len(self.labels) > 5 else "")
        return (
            f"Predictor({str(self.path)!r}, architecture={self.contract.architecture or '?'!r}, "
            f"labels=[{shown}] ({len(self.labels)}), input_size={self.input_size}, provider={self.provider!r})"
        )

    def preprocess(self, image: ImageSource) -> np.ndarray:
        """One image -> uint8 [S, S, 3], exactly as the model was trained (raises ImageError)."""
        return prepare_image(image, self.input_size, self.max_image_bytes)

    def probabilities(self, images: Sequence[ImageSource] | np.ndarray) -> np.ndarray:
        """Class probabilities [N, num_classes] in label order, for images or a ready uint8 [N, S, S, 3] batch
        (a contract-2 model also takes [N, H, W, 3] of any size and resizes it itself; an ndarray of 2 or 3
        dimensions is one image). No images: an empty [0, num_classes] array."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            images = [images]
        if isinstance(images, np.ndarray):
            size = self.input_size
            ready = images.ndim == 4 and images.shape[3] == 3 and images.dtype == np.uint8
            if not ready or (images.shape[1:3] != (size, size) and not (self.any_size and min(images.shape[1:3]))):
                want = "[N, H, W, 3]" if self.any_size else f"[N, {size}, {size}, 3]"
                raise FlowerxError(f"a ready batch must be uint8 {want}, got {images.dtype} {list(images.shape)}")
            batch = images
        else:
            images = _as_list(images, "probabilities")
            batch = np.stack([self.preprocess(image) for image in images]) if images else None
        if batch is None or not len(batch):
            return np.zeros((0, len(self.labels)), np.float32)
        return self._run(batch)

    def _ranked(self, probs: np.ndarray, top_k: int | None) -> list[Prediction]:
        order = np.argsort(-probs, kind="stable")[: top_k or len(self.labels)]
        return [Prediction(self.labels[i], float(probs[i]), int(i)) for i in order]

    def predict(self, image: ImageSource, top_k: int | None = None) -> list[Prediction]:
        """Ranked predictions for one image (path, bytes, PIL image or uint8 array), best first."""
        _check_top_k(top_k)
        if isinstance(image, (list, tuple, set)):
            raise FlowerxError("predict() takes one image; use predict_batch() for a list of images")
        return self._ranked(self.probabilities([image])[0], top_k)

    def predict_batch(
        self, images: Iterable[ImageSource], top_k: int | None = None, batch_size: int = 32
    ) -> list[list[Prediction]]:
        """predict() for many images, decoded in parallel and run in batches. Raises on the first bad image."""
        _check_top_k(top_k)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FlowerxError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        images = _as_list(images, "predict_batch")
        results = []
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(images), batch_size):
                batch = np.stack(list(pool.map(self.preprocess, images[start : start + batch_size])))
                results.extend(self._ranked(p, top_k) for p in self._run(batch))
        return results


def _as_list(images: object, method: str) -> list:
    """A collection of images as a list; one image (or a folder's path) passed by mistake is a clear error."""
    if (
        isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike))
        or images is None
        or type(images).__module__.startswith("PIL.")
    ):
        raise FlowerxError(
            f"{method}() takes a list of images, not one {type(images).__name__}; for a folder, "
            "pass flowerx.data.list_images(folder)"
        )
    if isinstance(images, np.ndarray):
        return list(images)
    try:
        return list(images)
    except TypeError:
        raise FlowerxError(f"{method}() takes a list of images, not {type(images).__name__}") from None
