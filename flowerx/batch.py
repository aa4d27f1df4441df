"""Classifying many images into a file: `flowerx classify DIR --output predictions.jsonl|.csv|.parquet`.

One row per image, in the order the images were listed: its path, the top-k labels and scores, or the error
that kept it from being classified. Locally the images stream through a thread pool (decoding on every core,
one onnxruntime call per batch); with `ray` the same rows come from a Ray Data pipeline whose actors each hold
one Predictor (a local Ray instance, or a cluster's address), so the output is the same either way. Rows are
written as they come (the driver holds one batch, never all results) into a temporary file beside the output,
renamed into place at the end. No TensorFlow; Ray is imported only when asked for (`flowerx[ray]`).

Images can also come from storage URIs that pyarrow's file systems read (`s3://bucket/photos/`, `gs://...`,
`hdfs://...`, `file:///...`), on the driver and on every Ray worker alike: credentials as pyarrow finds them
(the usual environment variables and config files of each cloud); the rows' paths are the URIs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import IMAGE_EXTENSIONS, max_image_bytes
from .errors import FlowerxError, ImageError
from .fileio import check_outputs
from .parallel import chunked, map_ahead

FORMATS = (".jsonl", ".csv", ".parquet")
BATCH = 32


@dataclass
class Row:
    path: str
    labels: list[str]
    scores: list[float]
    error: str | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "labels": self.labels, "scores": self.scores, "error": self.error}


@dataclass
class BatchResult:
    output: Path
    images: int
    failed: int


_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(source: str) -> bool:
    return bool(_URI.match(source))


def _file_system(uri: str):
    try:
        from pyarrow import fs
    except ModuleNotFoundError:
        raise FlowerxError('storage URIs are read with pyarrow: pip install pyarrow (or "flowerx[ray]")') from None
    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow's errors: unknown scheme, no such bucket, no credentials, ...
        raise FlowerxError(f"cannot open {uri}: {str(e).splitlines()[0]}") from None


def list_uri(uri: str) -> list[str]:
    """The image files under a storage URI (recursively, sorted), as URIs; a URI of one file is itself."""
    from pyarrow import fs

    system, root = _file_system(uri)
    scheme = uri[: _URI.match(uri).end()]
    try:
        info = system.get_file_info(root)
        if info.type == fs.FileType.File:
            return [uri]
        if info.type != fs.FileType.Directory:
            raise FlowerxError(f"{uri} does not exist")
        found = system.get_file_info(fs.FileSelector(root, recursive=True))
    except OSError as e:
        raise FlowerxError(f"cannot list {uri}: {str(e).splitlines()[0]}") from None
    names = sorted(
        f.path
        for f in found
        if f.type == fs.FileType.File
        and os.path.splitext(f.path)[1].lower() in IMAGE_EXTENSIONS
        and not f.base_name.startswith(".")
    )
    return [scheme + name for name in names]


def read_uri(uri: str, limit: int) -> bytes:
    """One object's bytes (up to limit, else an ImageError, as for local files)."""
    system, path = _file_system(uri)
    try:
        with system.open_input_stream(path) as stream:
            data = stream.read(limit + 1)
    except (OSError, FlowerxError) as e:
        raise ImageError(uri, f"cannot read file ({str(e).splitlines()[0]})") from None
    if len(data) > limit:
        raise ImageError(uri, f"file is too large (over the limit of {limit / 2**20:.0f} MiB)")
    return data


def rows_of(predictor, paths: list[str], top_k: int) -> list[Row]:
    """The rows of a batch of image paths or URIs: decoded (a bad one becomes its error row), run together."""
    pixels, rows, good = [], [], []
    limit = max_image_bytes()
    for path in paths:
        try:
            pixels.append(predictor.preprocess(read_uri(path, limit) if is_uri(path) else path))
            good.append(len(rows))
            rows.append(Row(path, [], []))
        except ImageError as e:
            rows.append(Row(path, [], [], e.reason))
    if pixels:
        for i, probs in zip(good, predictor.probabilities(np.stack(pixels))):
            order = np.argsort(-probs, kind="stable")[:top_k]
            rows[i].labels = [predictor.labels[j] for j in order]
            rows[i].scores = [round(float(probs[j]), 6) for j in order]
    return rows


def _local_rows(graph: Path, paths: list[str], top_k: int) -> Iterator[list[Row]]:
    from .predictor import Predictor

    predictor = Predictor(graph)
    with map_ahead(lambda batch: rows_of(predictor, batch, top_k), chunked(paths, BATCH), in_flight=4) as batches:
        yield from batches


class _Writer:
    """Rows into a temporary file beside `output`, renamed over it when all are written."""

    def __init__(self, output: Path, top_k: int):
        self.output, self.top_k, self.kind = output, top_k, output.suffix.lower()

    def __enter__(self):
        self.output.parent.mkdir(parents=True, exist_ok=True)  # check_outputs found it writable
        # atomic_write's naming (its stale-file cleanup knows it) and mode (0644 under the umask); O_EXCL: a
        # new file of ours, the only one __exit__ removes or renames
        self.tmp = self.output.with_name(f".{self.output.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise FlowerxError(f"{self.tmp} is in the way (left by a run that died?): remove it") from None
        try:
            self._open()
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return self

    def _open(self) -> None:
        if self.kind == ".parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ModuleNotFoundError:
                raise FlowerxError('a .parquet output needs pyarrow: pip install pyarrow (or "flowerx[ray]")') from None
            self.pa = pa
            self.schema = pa.schema(
                [("path", pa.string()), ("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())),
                 ("error", pa.string())]
            )  # fmt: skip
            self.parquet = pq.ParquetWriter(self.tmp, self.schema)
        else:
            self.file = open(self.tmp, "w", encoding="utf-8", newline="")
            if self.kind == ".csv":
                self.csv = csv.writer(self.file)
                ranks = range(1, self.top_k + 1)
                self.csv.writerow(["path", *(f"label_{i}" for i in ranks), *(f"score_{i}" for i in ranks), "error"])

    def write(self, rows: list[Row]) -> None:
        if self.kind == ".parquet":
            columns = {k: [getattr(r, k) for r in rows] for k in ("path", "labels", "scores", "error")}
            self.parquet.write_table(self.pa.Table.from_pydict(columns, schema=self.schema))
        elif self.kind == ".csv":
            pad = lambda values: list(values) + [""] * (self.top_k - len(values))  # noqa: E731
            for r in rows:
                self.csv.writerow([r.path, *pad(r.labels), *pad([f"{s:.6f}" for s in r.scores]), r.error or ""])
        else:
            self.file.write("".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows))

    def __exit__(self, kind, value, traceback) -> None:
        (self.parquet if self.kind == ".parquet" else self.file).close()
        if kind is None:
            os.replace(self.tmp, self.output)
        else:
            self.tmp.unlink(missing_ok=True)


def classify_to_file(
    graph: str | os.PathLike,
    paths: Iterable[str | os.PathLike],
    output: str | os.PathLike,
    top_k: int = 5,
    ray: bool = False,
    address: str | None = None,
    actors: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> BatchResult:
    """Classify every image of `paths` into `output` (.jsonl, .csv or .parquet); see the module's doc."""
    output, graph = Path(output).expanduser(), Path(graph).expanduser()
    if output.suffix.lower() not in FORMATS:
        raise FlowerxError(f"--output must end in {', '.join(FORMATS)}, not {output.name!r}")
    paths = [str(p) for p in paths]
    check_outputs({"--output": output}, {"--graph": graph, **{f"image {p}": p for p in paths if not is_uri(p)}})
    if ray:
        from .onray import classify_rows

        batches = (
            [Row(**row) for row in rows] for rows in classify_rows(graph, paths, top_k, address, actors, rows_of)
        )
    else:
        batches = _local_rows(graph, paths, top_k)
    done = failed = 0
    with _Writer(output, top_k) as writer:
        for rows in batches:
            writer.write(rows)
            done += len(rows)
            failed += sum(r.error is not None for r in rows)
            if on_progress:
                on_progress(done, len(paths))
    return BatchResult(output, done, failed)


def read_rows(output: str | os.PathLike) -> list[dict]:
    """The rows of an output file as dicts (path, labels, scores, error), whatever its format (tests, tools)."""
    output = Path(output)
    if output.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(output).to_pylist()
    text = output.read_text("utf-8")
    if output.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines()]
    rows = []
    for record in list(csv.DictReader(io.StringIO(text))):
        labels = [v for k, v in record.items() if k.startswith("label_") and v]
        scores = [float(v) for k, v in record.items() if k.startswith("score_") and v]
        rows.append({"path": record["path"], "labels": labels, "scores": scores, "error": record["error"] or None})
    return rows
