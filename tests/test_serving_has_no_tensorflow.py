"""The serving path (import flowerx, Predictor, classify, evaluate, export web, serve) never imports TensorFlow,
tf2onnx or onnx, for models of either contract version."""

import subprocess
import sys

from conftest import solid, write_tiny_model, write_tiny_v2_model

PROBE = """
import sys
import flowerx
from flowerx import Predictor
from flowerx.cli import main
code = main(["classify", sys.argv[1], "--graph", sys.argv[2]])
code += main(["evaluate", "--graph", sys.argv[2], "--image-dir", sys.argv[3]])
code += main(["classify", sys.argv[1], "--graph", sys.argv[4]])
code += main(["export", "web", "--graph", sys.argv[4], "--out", sys.argv[5]])
import flowerx.serve  # the HTTP server's whole module graph
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf2onnx", "onnx", "keras"))
print("HEAVY", heavy, "CODE", code)
"""


def test_classify_and_evaluate_import_no_training_stack(tmp_path):
    model = write_tiny_model(tmp_path / "m.onnx")
    write_tiny_v2_model(tmp_path / "v2.onnx")
    for label, colour in (("red", (250, 0, 0)), ("green", (0, 250, 0))):
        (tmp_path / "set" / label).mkdir(parents=True)
        solid(tmp_path / "set" / label / "1.png", colour)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            *map(str, (tmp_path / "set" / "red" / "1.png", model, tmp_path / "set", tmp_path / "v2.onnx")),
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "HEAVY [] CODE 0" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


LEAN = """
import sys
from flowerx.cli import main
code = main(["classify", sys.argv[1], "--graph", sys.argv[2]])
unused = ("rich", "tarfile", "urllib.request", "pyarrow", "ray", "PIL.ImageCms", "starlette", "tensorflow")
print("UNUSED", sorted(m for m in unused if m in sys.modules), "CODE", code)
"""


def test_classifying_one_image_imports_only_what_it_uses(tmp_path):
    """Issue 14: `flowerx classify one.jpg` pays for no download, archive, table or progress-bar code."""
    model, image = write_tiny_model(tmp_path / "m.onnx"), solid(tmp_path / "red.png", (250, 0, 0))
    result = subprocess.run([sys.executable, "-c", LEAN, str(image), str(model)], capture_output=True, text=True)
    assert result.stdout.startswith("red ") and "UNUSED [] CODE 0" in result.stdout, result.stdout + result.stderr
