"""`flowerx export web`: the static page's files, its pinned onnxruntime-web, and the folders it refuses.
The page itself runs in a real browser in test_conformance.py."""

import base64
import hashlib
import json
from pathlib import Path

import pytest
from conftest import run_cli, write_tiny_model, write_tiny_v2_model

from flowerx import FlowerxError
from flowerx.webexport import MARKER, ORT_SCRIPT, ORT_SCRIPT_SRI, ORT_WEB_CDN, ORT_WEB_VERSION, export_web

CLIENTS = Path(__file__).resolve().parents[1] / "benchmarks" / "clients"


@pytest.fixture
def v2_model(tmp_path):
    labels = ["daisy", "<script>alert(1)</script>", "rosé & co"]
    return write_tiny_v2_model(tmp_path / "model.onnx", labels, training={"test_accuracy": 0.9})


def test_export_web_writes_a_page_with_the_pinned_cdn_script(v2_model, tmp_path):
    out = tmp_path / "site"
    result = export_web(v2_model, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "flowerx.css", "flowerx.js", "index.html", "labels.txt", "model.onnx", "page.js"]
    )
    assert result.files and (out / "model.onnx").read_bytes() == v2_model.read_bytes()
    page = (out / "index.html").read_text()
    assert f'src="{ORT_WEB_CDN}{ORT_SCRIPT}" integrity="{ORT_SCRIPT_SRI}" crossorigin="anonymous"' in page
    assert f"onnxruntime-web@{ORT_WEB_VERSION}/" in page and "{{" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page  # labels are text
    assert "rosé &amp; co" in page and "Test accuracy 90.0%" in page
    assert (out / "labels.txt").read_text().splitlines()[1] == "<script>alert(1)</script>"
    export_web(v2_model, out)  # an earlier export is written over; anything else is refused


def test_the_pinned_integrity_hash_is_npms_file():
    script = CLIENTS / "node_modules" / "onnxruntime-web" / "dist" / ORT_SCRIPT
    if not script.is_file():
        pytest.skip("onnxruntime-web is not installed in benchmarks/clients (make clients)")
    package = json.loads((script.parents[1] / "package.json").read_text())
    assert package["version"] == ORT_WEB_VERSION
    assert ORT_SCRIPT_SRI == "sha384-" + base64.b64encode(hashlib.sha384(script.read_bytes()).digest()).decode()


def test_export_web_copies_onnxruntime_web_for_offline_use(v2_model, tmp_path):
    modules = CLIENTS / "node_modules"
    if not (modules / "onnxruntime-web").is_dir():
        pytest.skip("onnxruntime-web is not installed in benchmarks/clients (make clients)")
    out = tmp_path / "offline"
    result = export_web(v2_model, out, modules)
    assert sorted(p.name for p in (out / "ort").iterdir()) == sorted(
        [ORT_SCRIPT, "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]
    )
    page = (out / "index.html").read_text()
    assert f'src="ort/{ORT_SCRIPT}">' in page and "cdn." not in page and "local copy" in result.ort


def test_export_web_refuses_what_it_must_not_write(v2_model, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FlowerxError, match="files that flowerx did not write"):
        export_web(v2_model, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(FlowerxError, match="needs contract 2"):
        export_web(write_tiny_model(tmp_path / "old.onnx"), tmp_path / "new")
    earlier = tmp_path / "earlier"
    export_web(v2_model, earlier)
    with pytest.raises(FlowerxError, match="is the --graph file"):  # the export's own model.onnx as input
        export_web(earlier / "model.onnx", earlier)
    with pytest.raises(FlowerxError, match="no onnxruntime-web under"):
        export_web(v2_model, tmp_path / "x", tmp_path)


def test_cli_export_web(v2_model, tmp_path):
    done = run_cli("export", "web", "--graph", str(v2_model), "--out", str(tmp_path / "site"))
    assert done.returncode == 0, done.stderr
    assert "python -m http.server" in done.stdout and (tmp_path / "site" / "index.html").is_file()
    bad = run_cli("export", "web", "--graph", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "s2"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
