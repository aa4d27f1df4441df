"""Bad input at the command line: one clear line on stderr, a non-zero exit, never a traceback."""

import json

import pytest
from conftest import run_cli, solid, write_tiny_model

from flowerx.cli import _normalize_flags, build_parser


def one_line_error(result, code, pattern):
    assert result.returncode == code, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert pattern in lines[0], lines[0]


def test_retrain_py_spellings_are_accepted():
    args = build_parser().parse_args(
        _normalize_flags(
            ["train", "--image_dir", "x", "--how_many_training_steps=500", "--print_misclassified_test_images"]
        )
    )
    assert args.image_dir == "x" and args.how_many_training_steps == 500 and args.print_misclassified_test_images


def test_train_help_documents_defaults():
    result = run_cli("train", "-h")
    assert result.returncode == 0
    for flag in (
        "--image-dir",
        "--bottleneck-dir",
        "--how-many-training-steps",
        "--learning-rate",
        "--print-misclassified-test-images",
        "--validation-batch-size",
        "(default: 4000)",
    ):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--architecture", "mobilenet_0.6_224"], "unknown architecture"),
        (["--testing-percentage", "60", "--validation-percentage", "40"], "must leave images to train on"),
        (["--how-many-training-steps", "0"], "must be positive"),
        (["--learning-rate", "-1"], "must be positive"),
    ],
)
def test_train_bad_arguments(tmp_path, args, pattern):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        solid(tmp_path / label / "1.png", (1, 2, 3))
    one_line_error(run_cli("train", "--image-dir", str(tmp_path), *args), 2, pattern)


def test_train_missing_image_dir(tmp_path):
    one_line_error(run_cli("train", "--image-dir", str(tmp_path / "nope")), 2, "does not exist")


def test_train_missing_weights_offline_names_present_ones(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        solid(tmp_path / label / "1.png", (1, 2, 3))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mobilenet_2_5_224_tf_no_top.h5").write_bytes(b"x")
    result = run_cli(
        "train",
        "--image-dir",
        str(tmp_path),
        "--architecture",
        "mobilenet_0.50_224",
        "--model-dir",
        str(tmp_path / "models"),
    )
    # No network here (or a real download, which is out of scope for tests): either way no traceback.
    if result.returncode != 0:
        one_line_error(result, 2, "weights present there: mobilenet_0.25_224")


def test_classify_reports_each_bad_file_and_classifies_the_rest(tmp_path):
    model = write_tiny_model(tmp_path / "m.onnx")
    good = solid(tmp_path / "red.png", (220, 10, 10))
    (tmp_path / "text.jpg").write_text("hello")
    result = run_cli(
        "classify",
        str(good),
        str(tmp_path / "text.jpg"),
        str(tmp_path / "missing.jpg"),
        "--graph",
        str(model),
        "--top-k",
        "1",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.splitlines()[-1].startswith("red ")
    assert "text.jpg: not an image" in result.stderr and "missing.jpg: no such file" in result.stderr


def test_classify_json_and_folder(tmp_path):
    model = write_tiny_model(tmp_path / "m.onnx")
    (tmp_path / "imgs").mkdir()
    solid(tmp_path / "imgs" / "b.png", (0, 0, 250))
    solid(tmp_path / "imgs" / "g.png", (0, 250, 0))
    result = run_cli("classify", str(tmp_path / "imgs"), "--graph", str(model), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["predictions"][0]["label"] for r in report["results"]] == ["blue", "green"]


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda p: (p.write_text("nope"), p)[1], "not a valid ONNX model"),
        (lambda p: write_tiny_model(p, metadata={}), "no flowerx metadata"),
        (lambda p: p.parent / "absent.onnx", "no such model file"),
    ],
)
def test_classify_bad_model(tmp_path, make, pattern):
    model = make(tmp_path / "m.onnx")
    one_line_error(run_cli("classify", str(solid(tmp_path / "x.png", (1, 1, 1))), "--graph", str(model)), 2, pattern)


def test_model_without_metadata_works_with_labels_and_size(tmp_path):
    model = write_tiny_model(tmp_path / "m.onnx", metadata={})
    (tmp_path / "labels.txt").write_text("r\ng\nb\n")
    result = run_cli(
        "classify",
        "--image",
        str(solid(tmp_path / "x.png", (0, 250, 0))),
        "--graph",
        str(model),
        "--labels",
        str(tmp_path / "labels.txt"),
        "--input-size",
        "8",
        "--top-k",
        "1",
    )
    assert result.returncode == 0 and result.stdout.startswith("g 1.0"), result.stdout + result.stderr


def test_results_go_to_stdout_while_a_progress_bar_holds_it(monkeypatch, capsys):
    """rich swaps sys.stdout for a proxy printing through the bar's (stderr) console while a bar shows;
    result lines must still reach the real stdout, as they are ('x[/]y.jpg' is a name, not markup)."""
    import io

    from rich.console import Console
    from rich.file_proxy import FileProxy

    from flowerx import cli

    real, bar = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", FileProxy(Console(file=bar), real))
    cli.say(cli._Console(), "x[/]y.jpg 0.9")
    assert real.getvalue() == "x[/]y.jpg 0.9\n" and bar.getvalue() == ""
