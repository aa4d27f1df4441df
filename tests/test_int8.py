"""int8 export on a small real subset (needs $FLOWERX_SHARED)."""

import json
import re

import numpy as np
import pytest
from conftest import DAISY, run_cli, subset

from flowerx import Predictor


@pytest.mark.slow
def test_quantize_int8_writes_a_faithful_smaller_model_or_refuses(shared, tmp_path):
    data = subset(shared, tmp_path / "data", per_class=25)
    graph = tmp_path / "out" / "model.onnx"
    result = run_cli(
        "train",
        "--image-dir",
        str(data),
        "--architecture",
        "mobilenet_0.25_224",
        "--model-dir",
        str(shared / "models"),
        "--bottleneck-dir",
        str(tmp_path / "bn"),
        "--summaries-dir",
        "",
        "--output-graph",
        str(graph),
        "--how-many-training-steps",
        "300",
        "--testing-percentage",
        "30",
        "--quantize",
        "int8",
        "--max-accuracy-drop",
        "100",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"int8 test accuracy [\d.]+% vs float [\d.]+% \(N=\d+, drop -?[\d.]+ points", result.stdout)
    int8 = graph.with_name("model.int8.onnx")
    fp32, q = Predictor(graph), Predictor(int8)
    assert q.labels == fp32.labels and q.input_size == fp32.input_size == 224
    assert "int8" in q.metadata["quantization"] and json.loads(q.metadata["training"])["float_test_accuracy"] >= 0
    assert int8.stat().st_size < graph.stat().st_size * 0.6  # int8 weights (the small net's graph overhead stays)
    images = [p for p in sorted(data.rglob("*.jpg"))[::5]]
    agree = np.mean([fp32.predict(p)[0][0] == q.predict(p)[0][0] for p in images])
    assert agree >= 0.8, agree
    assert q.predict(shared / DAISY)[0][0] == "daisy"

    refused = run_cli("export-int8", "--graph", str(graph), "--image-dir", str(data), "--max-accuracy-drop", "-100")
    assert refused.returncode == 1 and "int8 model not written" in refused.stderr and "Traceback" not in refused.stderr
