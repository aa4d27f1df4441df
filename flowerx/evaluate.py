"""`flowerx evaluate`: accuracy, per-class precision/recall and the confusion matrix of an exported model
on a labelled folder (optionally only the training run's test split), decoding on all cores. No TensorFlow.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from .data import discover, split_names
from .errors import FlowerxError, ImageError
from .parallel import chunked, map_ahead
from .predictor import Predictor

SPLITS = ("all", "train", "validation", "test")


@dataclass
class Evaluation:
    labels: list[str]
    split: str
    count: int
    accuracy: float
    precision: list[float]
    recall: list[float]
    support: list[int]
    confusion: list[list[int]]  # rows: true label, columns: predicted label
    failed: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def evaluate(
    predictor: Predictor,
    image_dir: str,
    split: str = "all",
    batch_size: int = 32,
    on_progress: Callable[[int], None] = lambda n: None,
    follow_links: bool = False,
) -> Evaluation:
    """Classify every image of image_dir (whose subfolder names must be the model's labels)."""
    if split not in SPLITS:
        raise FlowerxError(f"--split must be one of {', '.join(SPLITS)}")
    dataset = discover(image_dir, follow_links)
    unknown = [name for name in dataset.labels if name not in predictor.labels]
    if unknown:
        raise FlowerxError(f"folders {', '.join(unknown)} are not labels of the model ({', '.join(predictor.labels)})")
    items = dataset.items
    if split != "all":
        percentages = predictor.contract.split_percentages(predictor.path.name)
        if percentages is None and not dataset.presplit:
            raise FlowerxError("the model does not record its training split; use --split all")
        names = split_names(items, *(percentages or (0.0, 0.0)))
        items = [item for item, name in zip(items, names) if name == split]
    if not items:
        raise FlowerxError(f"no images in the {split} split of {image_dir}")

    k = len(predictor.labels)
    confusion = np.zeros((k, k), np.int64)
    failed = []

    def decode(chunk: list) -> tuple[list, list, list, list]:
        """A chunk's images (decoded on a worker thread), their true label indices, and what failed."""
        images, truth, bad = [], [], []
        for item in chunk:
            try:
                images.append(predictor.preprocess(item.path))
                truth.append(predictor.labels.index(dataset.labels[item.label]))
            except ImageError as e:
                bad.append((item.relpath, str(e)))
        return chunk, images, truth, bad

    with map_ahead(decode, chunked(items, batch_size)) as decoded:
        for chunk, images, truth, bad in decoded:
            failed.extend(bad)
            if images:
                predicted = predictor.probabilities(np.stack(images)).argmax(1)
                np.add.at(confusion, (np.array(truth), predicted), 1)
            on_progress(len(chunk))
    correct = np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(correct / confusion.sum(0))
        recall = np.nan_to_num(correct / confusion.sum(1))
    count = int(confusion.sum())
    return Evaluation(
        labels=predictor.labels,
        split=split,
        count=count,
        accuracy=float(correct.sum() / count) if count else 0.0,
        precision=[round(float(p), 6) for p in precision],
        recall=[round(float(r), 6) for r in recall],
        support=[int(s) for s in confusion.sum(1)],
        confusion=confusion.tolist(),
        failed=failed,
    )
