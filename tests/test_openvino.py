"""Issue 14, target 7: onnxruntime's OpenVINO provider. onnxruntime-openvino replaces onnxruntime, so `make test`
runs this file twice: in the main venv (not installed: clear errors, skipped rows) and in .venv-openvino, a
serving install with onnxruntime swapped for onnxruntime-openvino as the README says (installed: it runs).
No TensorFlow here: that venv has none."""

import os

import numpy as np
import onnxruntime
import pytest
from conftest import solid, write_tiny_model

from flowerx import FlowerxError, Predictor, bench
from flowerx.predictor import openvino_has_bf16

INSTALLED = "OpenVINOExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture
def model(tmp_path):
    return write_tiny_model(tmp_path / "tiny.onnx")


def test_the_venv_has_what_it_was_made_for():
    """In .venv-openvino (FLOWERX_EXPECT_OPENVINO=1, set by make test-openvino) a missing provider is a failure,
    not a skip: a broken install would otherwise pass as "not installed"."""
    if os.environ.get("FLOWERX_EXPECT_OPENVINO") == "1":
        assert INSTALLED, f"onnxruntime-openvino is not working here: {onnxruntime.get_available_providers()}"
    else:
        pytest.skip("FLOWERX_EXPECT_OPENVINO is not set (make test-openvino sets it)")


@pytest.mark.skipif(INSTALLED, reason="onnxruntime-openvino is installed here")
def test_openvino_without_its_package_is_one_clear_error(model):
    for name in ("openvino", "openvino-bf16"):
        with pytest.raises(FlowerxError, match="needs onnxruntime-openvino in place of onnxruntime"):
            Predictor(model, providers=name)
    assert Predictor(model).provider == "CPUExecutionProvider"  # auto: the CPU
    with pytest.raises(FlowerxError, match="providers must be 'auto' or one of"):
        Predictor(model, providers="tpu")


@pytest.mark.skipif(not INSTALLED, reason="onnxruntime-openvino is not installed (it replaces onnxruntime)")
def test_openvino_runs_the_model_and_says_its_precision(model, tmp_path, monkeypatch):
    """Issue 14: where onnxruntime-openvino is installed, "auto" and "openvino" run on it, "openvino-bf16" says so."""
    image = solid(tmp_path / "green.png", (10, 200, 10))
    reference = Predictor(model, providers="cpu").probabilities([image])
    bf16 = openvino_has_bf16()
    for name, provider in (
        ("auto", "OpenVINOExecutionProvider"),
        ("openvino", "OpenVINOExecutionProvider"),
        ("openvino-bf16", "OpenVINOExecutionProvider " + ("(bf16)" if bf16 else "(fp32: this CPU has no bf16)")),
    ):
        predictor = Predictor(model, providers=name)
        assert predictor.provider == provider and predictor.predict(image, 1)[0].label == "green"
        assert np.abs(predictor.probabilities([image]) - reference).max() < (0.02 if bf16 and "bf16" in name else 1e-5)
    from flowerx import predictor as predictor_module

    asked, session = [], predictor_module.ort.InferenceSession

    def recording(path, options=None, providers=None, **more):  # OpenVINO does not report its options back
        asked.append(providers)
        return session(path, options, providers=providers, **more)

    monkeypatch.setattr(predictor_module.ort, "InferenceSession", recording)
    Predictor(model, providers="openvino", threads=1)  # OpenVINO's own thread option, not onnxruntime's
    assert asked[-1][0] == ("OpenVINOExecutionProvider", {"device_type": "CPU", "num_of_threads": "1"})


def test_openvino_rows_run_where_its_provider_is_installed_and_say_so_elsewhere(tmp_path):
    assert ("openvino" in bench.default_runtimes()) == INSTALLED == ("openvino-bf16" in bench.default_runtimes())
    model = bench._Model("m", "mobilenet_0.25_128", tmp_path, tmp_path / "missing.onnx")
    row = bench._measure(model, "openvino-bf16", 1, bench.BenchConfig.quick())
    if not INSTALLED:  # asked for by name: a row that says what to install, not a failure
        assert row.status.startswith("skipped:") and "onnxruntime-openvino" in row.status
    elif openvino_has_bf16():  # installed: it goes on to the model file, which this one lacks
        assert "no model.onnx" in row.status
    else:  # a bf16 row that would time fp32 is not run
        assert row.status == "skipped: OpenVINO has no bf16 on this CPU: it runs fp32, the openvino row"


def test_openvino_says_whether_this_cpu_has_bf16():
    """OpenVINO's own answer (its C library, shipped by onnxruntime-openvino), checked against the CPU's flags
    where Linux lists them; None without onnxruntime-openvino."""
    has = openvino_has_bf16()
    if not INSTALLED:
        assert has is None
        return
    assert isinstance(has, bool)
    if os.path.exists("/proc/cpuinfo"):
        flags = set(open("/proc/cpuinfo").read().split())
        # OpenVINO's CPU plugin runs bf16 on AVX512-BF16 or AMX, and on AVX2-VNNI-2 (Linux: these two flags)
        assert has == (bool(flags & {"avx512_bf16", "amx_bf16"}) or {"avx_vnni_int8", "avx_ne_convert"} <= flags)
