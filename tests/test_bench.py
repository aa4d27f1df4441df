"""`flowerx bench --quick` end to end: every runtime in its own process, JSON with every figure positive."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from flowerx import bench

pytest.importorskip("tensorflow")


def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench",
        "--quick",
        "--json",
        str(out),
        "--csv",
        str(tmp_path / "bench.csv"),
        "--plot",
        str(tmp_path / "chart.png"),
        "--work-dir",
        str(tmp_path / "work"),
        "--model-dir",
        str(tmp_path / "no-weights"),
        "--rounds",
        "2",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"mobilenet_0.25_128 +flowerx +1 ", result.stdout) and "End to end" in result.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["onnxruntime"]
    isa = set(report["machine"]["isa"])  # the instruction sets the figures depend on, read from /proc/cpuinfo
    assert isa <= set(bench.ISA_FLAGS) and ("avx2" in isa) == ("avx2" in Path("/proc/cpuinfo").read_text())
    rows = {r["runtime"]: r for r in report["rows"]}
    openvino = {"openvino", "openvino-bf16"} if bench.OPENVINO_RUNTIMES[0] in bench.default_runtimes() else set()
    assert set(rows) == {"onnxruntime", "tensorflow", "litert", "litert-int8"} | openvino
    measured = [r for r in report["rows"] if r["status"] == "ok"]
    assert rows["onnxruntime"]["status"] == "ok" and rows["tensorflow"]["status"] == "ok"
    if rows["litert"]["status"] == "ok":  # LiteRT installed: its own full-integer model runs too
        assert rows["litert-int8"]["status"] == "ok" and rows["litert-int8"]["file_mb"] < rows["litert"]["file_mb"] / 2
    for row in measured:
        assert row["weights"] == "random"  # no weights in that folder: random, BN calibrated
        for key in (
            "median_ms",
            "p90_ms",
            "p99_ms",
            "throughput_ips",
            "file_mb",
            "params",
            "macs",
            "load_s",
            "peak_mb",
            "ratio",
        ):
            assert row[key] > 0, (row["runtime"], key)
        assert row["median_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert len(row["rounds_ms"]) == 2 and row["median_ms"] == min(row["rounds_ms"])  # the lower of two
    assert rows["onnxruntime"]["ratio"] == 1.0
    assert 10e6 < rows["onnxruntime"]["macs"] < 20e6  # mobilenet_0.25_128: ~14 MMACs
    (e2e,) = report["end_to_end"]
    assert e2e["flowerx_s"] > 0 and e2e["tensorflow_s"] > 0 and e2e["speedup"] > 0
    assert (tmp_path / "chart.png").stat().st_size > 10_000
    assert (tmp_path / "bench.csv").read_text().startswith("model,runtime,threads")


def _row(runtime: str, status: str = "ok", ms: float | None = None) -> bench.Row:
    return bench.Row("m", runtime, 1, "random", status=status, median_ms=ms, p90_ms=ms and ms * 1.1)


def test_rounds_keep_the_median_process_and_pair_the_ratios():
    """--rounds N: one row per model, runtime and threads, the median process's figures with it; ratios are
    the median of the rounds' own ratios (a round's two runtimes measured seconds apart), so one slow
    process in one round cannot make the ratio."""
    ours = [_row("onnxruntime", ms=ms) for ms in (1.0, 2.0, 1.1)]  # the second round's process was slow
    lite = [_row("litert", ms=ms) for ms in (0.9, 1.8, 1.2)]
    failed = [_row("tensorflow", status="failed: worker crashed"), _row("tensorflow", ms=5.0)]
    skipped = [_row("litert-int8", status="skipped: not installed")] * 3
    rows = bench.merge_rounds([ours[0], lite[0], failed[0], skipped[0], ours[1], lite[1], failed[1], ours[2], lite[2]])
    by = {r.runtime: r for r in rows}
    assert [r.runtime for r in rows] == ["onnxruntime", "litert", "tensorflow", "litert-int8"]  # first-seen order
    assert by["onnxruntime"] is ours[2] and by["onnxruntime"].rounds_ms == [1.0, 2.0, 1.1]  # median 1.1, p90 kept
    assert by["tensorflow"].median_ms == 5.0 and by["tensorflow"].rounds_ms == [5.0]  # the failed round dropped
    assert by["litert-int8"].status.startswith("skipped")
    bench._set_ratios(rows)
    assert by["litert"].ratio == pytest.approx(0.9)  # ratios 0.9, 0.9, 1.09: median 0.9 (medians' ratio: 1.09)
    assert by["onnxruntime"].ratio == 1.0
    assert bench.latency_ratio([2.0, 4.0], [1.0]) == pytest.approx(3.0)  # rounds that do not pair: medians


def test_bench_bad_arguments(tmp_path):
    result = run_cli("bench", "--architectures", "mobilenet_9_224", "--work-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown architecture" in result.stderr and "Traceback" not in result.stderr


def test_int8_accuracy_table_gives_each_seed_and_the_mean():
    from benchmarks.report import int8_accuracy_table

    def row(seed: int, test: float) -> dict:
        figures = {"validation": 80.0 + seed, "test": test}
        return {"architecture": "mobilenet_0.25_224", "seed": seed, "float": figures, "flowerx_int8": figures,
                "litert_int8": {"validation": 70.0, "test": 60.0}}  # fmt: skip

    table = int8_accuracy_table({"rows": [row(0, 90.0), row(1, 87.0)]}).splitlines()
    assert table[2] == "| mobilenet_0.25_224 | 0 | 80.0 / 90.0% | 80.0 / 90.0% | 70.0 / 60.0% |"
    assert table[-1] == "| mobilenet_0.25_224 | **mean** | 80.5 / 88.5% | 80.5 / 88.5% | 70.0 / 60.0% |"
    assert len(table) == 5  # header, rule, two seeds, the mean


def test_frozen_features_table_gives_each_variant_against_flowerx_bottleneck():
    from benchmarks.frozen_features import VARIANTS, design
    from benchmarks.report import frozen_features_table

    def row(name: str, cost: float, validation: list[float], test: list[float]) -> dict:
        runs = [{"validation": v, "test": t} for v, t in zip(validation, test)]
        return {"name": name, "features": 1024, "cost": cost, "runs": runs,
                "validation": sum(validation) / len(validation), "test": sum(test) / len(test)}  # fmt: skip

    rows = [row("base", 1.0, [89.9] * 3, [91.5] * 3), row("288 px", 1.65, [91.0, 92.0, 93.0], [91.8] * 3)]
    report = {"architecture": "mobilenet_1.0_224", "rows": rows}
    table = frozen_features_table(report).splitlines()
    assert table[2] == "| base | 1024 | 1.00x | 89.9% | 91.5% |"
    assert table[3] == "| 288 px | 1024 | 1.65x | 92.0% (91.0-93.0%); +2.1 | 91.8%; +0.3 |"
    # The head's input: joined layers are z-scored on the training rows, a mirror is averaged in.
    layers = ("conv_pw_11_relu", "conv_pw_12_relu", "conv_pw_13_relu")
    features = {
        (224, name, m): np.full((4, 2), 10.0 * k + m, np.float32) for k, name in enumerate(layers) for m in (0, 1)
    }
    features[224, "conv_pw_13_relu", False][0] = 0.0
    mirrored = design(VARIANTS[4], features, np.arange(4))
    assert mirrored.shape == (4, 2) and mirrored[1, 0] == 20.5 and mirrored[0, 0] == 10.5
    joined = design(VARIANTS[3], features, np.arange(4))
    assert joined.shape == (4, 6) and abs(joined[:, 4:].mean()) < 1e-5 and joined[:, :4].max() == 0


def test_fine_tune_targets_say_what_each_run_gave_and_how_far_target_1_is():
    from benchmarks.accuracy import DEFAULT, HEAD, PINNED, ROWS
    from benchmarks.report import fine_tune_targets

    def row(arch: str, name: str, seed: int, test: float, wall_s: float, tuned: bool = True, **extra) -> dict:
        return {"architecture": arch, "row": name, "seed": seed, "test_accuracy": test, "wall_s": wall_s,
                "validation_accuracy": test - 1, "peak_mb": 2000, "fine_tuned": tuned, **extra}  # fmt: skip

    big, flags = "mobilenet_1.0_224", list(next(r.flags for r in ROWS if r.name == PINNED))
    assert flags == ["--fine-tune-blocks", "9"]  # the default's recipe for it, pinned
    rows = [row(big, HEAD, 0, 91.5, 11, False), row(big, DEFAULT, 0, 91.5, 28, False), row(big, DEFAULT, 1, 93.0, 280)]
    pinned = [row(big, PINNED, s, t, 600, flags=[*flags, "--seed", str(s)], kept_epoch=6,
                  measured="2026-12-05 22:00") for s, t in ((0, 92.0), (1, 93.0))]  # fmt: skip
    lines = fine_tune_targets({"rows": rows + pinned}).splitlines()
    assert "(`--fine-tune-blocks 9`, kept epochs 6, 6): test 92.5% (92.0-93.0%)" in lines[0]
    assert "head alone's 91.5%" in lines[0] and "10.0 min" in lines[0] and "measured 2026-12-05" in lines[0]
    assert lines[0].endswith("missed: 1.5 points short, 2.5x the time).")
    assert lines[1] == (
        "- The default `flowerx train` (its default `--time-budget`), mobilenet_1.0_224: fine-tuned on 1 of 2 "
        "seeds, test 92.2% (91.5-93.0%) against the head alone's 91.5%; the whole run 154 s (28-280 s)."
    )
    fast = [{**r, "test_accuracy": 93.96, "wall_s": 200} for r in pinned]  # 94.0% as printed: met
    assert fine_tune_targets({"rows": rows + fast}).splitlines()[0].endswith("under 3000 MB: met).")
    alone = fine_tune_targets({"rows": pinned}).splitlines()  # rows merged without a head-only run
    assert len(alone) == 1 and "(no head-only row)" in alone[0]
    assert "test 91.5% against" in fine_tune_targets({"rows": rows[:2]})  # one value, or all the same: no range


def test_accuracy_rows_rerun_alone_replace_their_own_and_keep_shared_checkpoints_together():
    from benchmarks.accuracy import choose, merge

    assert [row.key for row in choose(["pinned"])] == ["pinned"] and len(choose(None)) == 6
    with pytest.raises(SystemExit, match="default-int8 reuses default's"):
        choose(["default-int8"])  # alone, it would fine-tune anew, not reuse the default's checkpoints
    with pytest.raises(SystemExit, match="unknown row"):
        choose(["fine-tuned"])
    old = [{"architecture": "a", "row": "r", "seed": s, "test_accuracy": 1.0} for s in (0, 1)]
    again = [{"architecture": "a", "row": "r", "seed": 1, "test_accuracy": 2.0}]
    assert [r["test_accuracy"] for r in merge(old, again)] == [1.0, 2.0]
