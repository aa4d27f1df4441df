"""`flowerx bench --quick` end to end: every runtime in its own process, JSON with every figure positive."""

import json
import re

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
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"mobilenet_0.25_128 +flowerx +1 ", result.stdout) and "End to end" in result.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["onnxruntime"]
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
    assert rows["onnxruntime"]["ratio"] == 1.0
    assert 10e6 < rows["onnxruntime"]["macs"] < 20e6  # mobilenet_0.25_128: ~14 MMACs
    (e2e,) = report["end_to_end"]
    assert e2e["flowerx_s"] > 0 and e2e["tensorflow_s"] > 0 and e2e["speedup"] > 0
    assert (tmp_path / "chart.png").stat().st_size > 10_000
    assert (tmp_path / "bench.csv").read_text().startswith("model,runtime,threads")


def test_bench_bad_arguments(tmp_path):
    result = run_cli("bench", "--architectures", "mobilenet_9_224", "--work-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown architecture" in result.stderr and "Traceback" not in result.stderr


def test_openvino_rows_run_where_its_provider_is_installed_and_say_so_elsewhere(tmp_path):
    import onnxruntime

    installed = "OpenVINOExecutionProvider" in onnxruntime.get_available_providers()
    assert ("openvino" in bench.default_runtimes()) == installed == ("openvino-bf16" in bench.default_runtimes())
    model = bench._Model("m", "mobilenet_0.25_128", tmp_path, tmp_path / "missing.onnx")
    row = bench._measure(model, "openvino-bf16", 1, bench.BenchConfig.quick())
    if not installed:  # asked for by name: a row that says what to install, not a failure
        assert row.status.startswith("skipped:") and "onnxruntime-openvino" in row.status
    else:  # installed: it goes on to the model file, which this one lacks
        assert "no model.onnx" in row.status
