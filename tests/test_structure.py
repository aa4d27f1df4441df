"""Issue 11: the shape of the code. Packages depend one way, importing changes nothing, the model contract is
one typed thing, benchmarks read data (not printed text) through public functions."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flowerx import FlowerxError
from flowerx.contract import Contract, NoMetadataError
from flowerx.parallel import chunked, map_ahead

ROOT = Path(__file__).resolve().parent.parent
TRAINING_PATH = ("train", "head", "finetune", "bottlenecks", "quantize", "parallel", "contract")


def _imports(path: Path, package: str) -> set[str]:
    """Modules of flowerx/exporters that a file imports, anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the package
                base = package if node.level == 1 else ""
                names = [f"{base}.{node.module}"] if node.module else [f"{base}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found.update(n for n in names if n.split(".")[0] in ("flowerx", "exporters"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in ("flowerx", "exporters"))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for package in ("flowerx", "exporters"):
        for path in (ROOT / package).glob("*.py"):
            module = package if path.stem == "__init__" else f"{package}.{path.stem}"
            graph[module] = {m for m in _imports(path, package) if m != module}
    return graph


def test_the_package_imports_form_a_dag():
    graph = _graph()
    modules = set(graph)
    edges = {m: {d for d in deps if d in modules} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in edges.get(module, ()):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path + [module, dep]))
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [])


def test_exporters_import_nothing_from_flowerx():
    for path in (ROOT / "exporters").glob("*.py"):
        assert not [m for m in _imports(path, "exporters") if m.startswith("flowerx")], path


def test_importing_flowerx_changes_nothing_in_the_host_process():
    code = """
import os, sys, warnings
import numpy, onnxruntime, rich.console  # third-party imports add warning filters of their own: not ours
from PIL import Image
before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters), dict(os.environ), os.fstat(2).st_ino)
import flowerx, flowerx.predictor, flowerx.data, flowerx.cli, flowerx.train, flowerx.evaluate, flowerx.bench
from flowerx import Predictor
after = (Image.MAX_IMAGE_PIXELS, list(warnings.filters), dict(os.environ), os.fstat(2).st_ino)
print(before == after)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stdout + result.stderr


@pytest.mark.slow
def test_tensorflow_noise_is_silenced_but_other_stderr_gets_through():
    pytest.importorskip("tensorflow")
    code = "import os\nfrom flowerx.backbone import tf\nos.write(2, b'a crash would say this\\n')\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "ok" and "a crash would say this" in result.stderr, result.stderr
    assert "oneDNN" not in result.stderr and "absl::InitializeLog" not in result.stderr, result.stderr


def test_benchmarks_use_public_functions_and_read_json_not_printed_text():
    for path in (ROOT / "benchmarks").glob("*.py"):
        tree = ast.parse(path.read_text())
        private = [
            a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("flowerx")
            for a in n.names
            if a.name.startswith("_")
        ]
        assert not private, (path.name, private)
        text = path.read_text()
        assert "Final test accuracy" not in text and "Fine-tune epoch" not in text, path.name  # no parsed output


def test_the_installed_package_does_not_need_benchmarks():
    for path in list((ROOT / "flowerx").glob("*.py")) + list((ROOT / "exporters").glob("*.py")):
        assert "benchmarks" not in " ".join(_imports(path, "flowerx")) and "benchmarks." not in path.read_text(), path


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout") :]
    listed = set(re.findall(r"`((?:flowerx|exporters)/\w+\.py)`", table))
    actual = {
        f"{p.parent.name}/{p.name}"
        for d in ("flowerx", "exporters")
        for p in (ROOT / d).glob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))


def test_no_long_functions_on_the_training_path():
    for name in TRAINING_PATH:
        source = (ROOT / "flowerx" / f"{name}.py").read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                assert "# long:" in body, f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines, no reason"


def test_train_flags_come_from_the_config_and_every_model_setting_is_recorded():
    from dataclasses import fields

    from flowerx.cli import build_parser
    from flowerx.train import NOT_RECORDED, TrainConfig

    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    flags = {opt for action in train._actions for opt in action.option_strings}
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in flags and f.metadata["help"]
    recorded = {f.name for f in fields(TrainConfig) if f.name not in NOT_RECORDED and f.metadata["group"] != "output"}
    assert {"seed", "train_batch_size", "distorted_views", "fine_tune_epochs", "max_accuracy_drop"} <= recorded


# --- The contract ---------------------------------------------------------------------------------------


def test_contract_round_trips_and_keeps_unknown_keys():
    contract = Contract(
        ["a", "b"],
        224,
        "mobilenet_1.0_224",
        input_mean=127.5,
        input_std=127.5,
        flowerx_version="0.1.0",
        training={"testing_percentage": 10, "validation_percentage": 10},
        extra={"weights": "random"},
    )
    meta = contract.to_metadata()
    assert list(meta)[:4] == ["weights", "labels", "input_size", "architecture"] and meta["resize"] == "bilinear"
    again = Contract.from_metadata(meta, "m.onnx")
    assert again == contract and again.split_percentages("m.onnx") == (10.0, 10.0)


def test_old_models_load_and_bad_metadata_is_one_error():
    old = {"labels": '["a", "b"]', "input_size": "224", "resize": "bilinear"}  # flowerx 0.1's first models
    assert Contract.from_metadata(old, "old.onnx").training == {}
    legacy = Contract.from_metadata({**old, "input_mean": "127.5", "input_std": "127.5"}, "old.onnx")
    assert legacy.input_mean == 127.5 and "input_mean" not in legacy.to_metadata()  # renamed on the way out
    with pytest.raises(NoMetadataError):
        Contract.from_metadata({}, "bare.onnx")
    with pytest.raises(FlowerxError, match="resize rule"):
        Contract.from_metadata({**old, "resize": "nearest"}, "m.onnx")
    for size in ("0", "x"):
        with pytest.raises(FlowerxError, match="input"):
            Contract.from_metadata({**old, "input_size": size}, "m.onnx")
    for size in (224.7, "224", [224], True):  # a caller's input size must be a whole number, not coerced
        with pytest.raises(FlowerxError, match="input size"):
            Contract.from_metadata({}, "bare.onnx", labels=["a", "b"], input_size=size)
    # What only describes the model never stops it from loading; a bad split record is said where it is used.
    odd = Contract.from_metadata({**old, "input_mean": "x", "training": "[1]"}, "m.onnx")
    assert odd.input_mean is None
    with pytest.raises(FlowerxError, match="not a JSON object"):
        odd.split_percentages("m.onnx")


# --- Decoding ahead ---------------------------------------------------------------------------------------


def test_map_ahead_keeps_order_bounds_work_in_flight_and_stops_on_failure():
    started, lock = [], threading.Lock()

    def work(chunk):
        with lock:
            started.append(chunk[0])
        time.sleep(0.01 * (chunk[0] % 3))
        if chunk[0] == 40:
            raise ValueError("bad chunk")
        return sum(chunk)

    with map_ahead(work, chunked(list(range(40)), 4), workers=2) as results:
        assert list(results) == [sum(range(i, i + 4)) for i in range(0, 40, 4)]
    started.clear()
    with pytest.raises(ValueError, match="bad chunk"), map_ahead(work, chunked(list(range(200)), 4), workers=2) as r:
        list(r)
    assert len(started) <= 11 + 2 * 2  # chunks 0-10, then at most the ones in flight; the rest never started
    started.clear()
    with map_ahead(work, chunked(list(range(400)), 4), workers=2, in_flight=3) as results:
        next(results)  # a consumer that stops early: leaving the block cancels what is queued
    assert len(started) <= 1 + 3 + 1
