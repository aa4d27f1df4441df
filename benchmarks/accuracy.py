"""The README's accuracy table: head only / distortions / the default (fine-tuned when it fits) / int8, for
two MobileNets.

    python -m benchmarks.accuracy --shared ../shared --json benchmarks/results/accuracy.json

Each row is one `flowerx train` run in its own process on all the flower photos with the real weights:
test accuracy (the test split, N=319), validation accuracy, wall time and peak memory. The bottleneck
cache is filled by a first, untimed run per architecture, so every row's time is what a user pays once
the bottlenecks exist (the cold pass is in train_speed.json); rows with distortions include computing
their views, and fine-tuned rows decode every image each epoch, as they always do. The default row runs
with --seed 0, 1 and 2 (the head's initialisation, the fine-tuning's order and views): fine-tuning's accuracy
is a mean and spread, not one draw. Keep the machine quiet. Takes about 20 minutes on the 2-core machine,
half of it the three fine-tuned mobilenet_1.0_224 runs.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.train_speed import flowers_args, run_flowerx_train
from flowerx.bench import machine_info

DISTORT = ["--flip-left-right", "--random-scale", "15", "--random-brightness", "10", "--distorted-views", "4"]
SEEDS = (0, 1, 2)  # fine-tuning's rows: accuracy as mean and spread over these --seed values
ROWS: list[tuple[str, list[str], tuple[int, ...]]] = [
    ("head only", ["--head-only"], (0,)),
    ("head, distortions (4 cached views)", ["--head-only", *DISTORT], (0,)),
    ("default: fine-tuned when it fits --time-budget", [], SEEDS),
    ("head only, int8", ["--head-only", "--quantize", "int8"], (0,)),
    ("default, int8", ["--quantize", "int8"], (0, 1, 2)),  # reuses each seed's fine-tuning checkpoint
]
ARCHITECTURES = ("mobilenet_0.25_224", "mobilenet_1.0_224")


def train(arch: str, extra: list[str], shared: Path, work: Path, name: str) -> dict:
    out = work / arch / re.sub(r"\W+", "_", name)
    # The graph's name per seed: fine-tuning's checkpoint is named after it, so the int8 rows reuse each seed's.
    seed = extra[extra.index("--seed") + 1] if "--seed" in extra else "0"
    graph = out / f"model-seed{seed}.onnx"
    args = [*flowers_args(arch, shared, work / "bottlenecks", graph, head_only=False), *extra]
    wall, peak_mb, result = run_flowerx_train(args, out / "result.json")
    row = {
        "architecture": arch,
        "row": name,
        "flags": extra,
        "seed": int(seed),
        "wall_s": round(wall, 1),
        "peak_mb": int(peak_mb),
        "test_accuracy": round(result["test_accuracy"] * 100, 1),
        "validation_accuracy": round(result["validation_accuracy"] * 100, 1),
    }
    tuned = result["fine_tune"]
    row["fine_tuned"], row["head_only_why"] = tuned is not None, result.get("head_only_why", "")
    if tuned is not None:
        row["kept_epoch"], row["epochs_run"] = tuned["kept_epoch"], tuned["epochs_run"]
        row["reused_fine_tune_checkpoint"] = tuned["epochs_trained"] == 0  # time excludes it
    if result["int8"] is not None:
        row.update(
            int8_test_accuracy=round(result["int8"]["int8_accuracy"] * 100, 1), int8_written=result["int8"]["written"]
        )
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared", type=Path, help="folder with flower_photos/ and models/")
    parser.add_argument("--json", default="benchmarks/results/accuracy.json", type=Path)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowerx-accuracy-") as tmp:
        work = Path(tmp)
        for arch in args.architectures:
            train(arch, ["--head-only", "--how-many-training-steps", "1"], args.shared, work, "warm-up")  # the cache
            for name, extra, seeds in ROWS:
                for seed in seeds:
                    rows.append(train(arch, [*extra, "--seed", str(seed)], args.shared, work, name))
                    print_row(rows[-1])
                if len(seeds) > 1:
                    tests = [r["test_accuracy"] for r in rows[-len(seeds) :]]
                    line = f"{arch:<20} {name}: test mean {np.mean(tests):.1f}%, {min(tests):.1f}-{max(tests):.1f}%"
                    int8 = [r["int8_test_accuracy"] for r in rows[-len(seeds) :] if "int8_test_accuracy" in r]
                    if int8:
                        line += f"; int8 mean {np.mean(int8):.1f}%, {min(int8):.1f}-{max(int8):.1f}%"
                    print(line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=1))


def print_row(r: dict) -> None:
    print(
        f"{r['architecture']:<20} {r['row'][:36]:<36} seed {r['seed']}  test {r['test_accuracy']:5.1f}%  "
        f"validation {r['validation_accuracy']:5.1f}%  {r['wall_s']:7.1f} s  {r['peak_mb']:>5} MB"
        + (f"  kept epoch {r['kept_epoch']}/{r['epochs_run']}" if "kept_epoch" in r else "")
        + (f"  head only: {r['head_only_why']}" if r["head_only_why"] else "")
        + (
            f"  int8 {r['int8_test_accuracy']:.1f}% ({'written' if r['int8_written'] else 'refused'})"
            if "int8_test_accuracy" in r
            else ""
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
