"""Issue 10: what a hostile folder, a hostile model and a careless user broke. One test (or more) per item,
numbered as in the issue; tests/README.md lists them."""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import make_image, run_cli, small_train_args, solid, subset, write_tiny_model
from PIL import Image

from flowerx import FlowerxError, ImageError, Prediction, Predictor, fileio
from flowerx.data import discover, list_images, prepare_image, split_names, split_of
from flowerx.train import TrainConfig, new_run_dir

ROOT = Path(__file__).resolve().parent.parent
ESC = "\x1b"


def one_line_error(result, code, pattern):
    assert result.returncode == code, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert pattern in lines[0], lines[0]


@pytest.fixture
def two_classes(tmp_path) -> Path:
    data = tmp_path / "data"
    for label, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        (data / label).mkdir(parents=True)
        for i in range(3):
            solid(data / label / f"{i}.png", colour)
    return data


# 1. --experiment-name is a name, never a path; earlier runs are kept -------------------------------------


def _train_experiment(data: Path, summaries: Path, name: str, cwd: Path | None = None):
    return run_cli(
        "train", "--image-dir", str(data), "--summaries-dir", str(summaries), "--experiment-name", name, cwd=cwd
    )


@pytest.mark.parametrize("name", ["VICTIM", "../VICTIM", "a/b", "..", "x\x1by"])
def test_experiment_name_that_is_a_path_is_refused_and_deletes_nothing(tmp_path, two_classes, name):
    victim = tmp_path / "VICTIM"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    name = str(victim) if name == "VICTIM" else name
    result = _train_experiment(two_classes, tmp_path / "sum", name, cwd=tmp_path)
    one_line_error(result, 2, "--experiment-name must be a plain")
    assert (victim / "precious.txt").read_text() == "keep me"


def test_each_run_gets_its_own_summary_folder(tmp_path):
    first, second = new_run_dir(tmp_path / "exp"), new_run_dir(tmp_path / "exp")
    assert first != second and first.parent == second.parent == tmp_path / "exp"  # never reused, never deleted


# 2. Non-finite numbers never make a model ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--learning-rate", "nan"),
        ("--learning-rate", "inf"),
        ("--random-scale", "nan"),
        ("--max-accuracy-drop", "-inf"),
    ],
)
def test_non_finite_flags_are_refused_up_front(two_classes, flag, value):
    one_line_error(run_cli("train", "--image-dir", str(two_classes), f"{flag}={value}"), 2, "finite")


def test_parity_check_refuses_nan_outputs(tmp_path):
    from exporters import ExportError
    from exporters.onnx_export import check_parity

    data = write_tiny_model(tmp_path / "m.onnx").read_bytes()
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ExportError, match="not finite"):
        check_parity(data, lambda x, training=False: np.full((2, 3), np.nan, np.float32), images)


@pytest.mark.slow
def test_a_diverging_learning_rate_keeps_the_old_model(shared, tmp_path):
    data = subset(shared, tmp_path / "data", per_class=6)
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"the good model")
    result = run_cli(
        *small_train_args(shared, data, tmp_path, graph, steps="20"),
        "--learning-rate",
        "1e300",
        "--eval-step-interval",
        "10",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "training diverged" in result.stderr and graph.read_bytes() == b"the good model"


def test_a_model_that_returns_nan_is_refused(tmp_path):
    import onnx

    path = write_tiny_model(tmp_path / "nan.onnx")
    model = onnx.load(path)
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.full((3, 3), np.nan, np.float32), "w"))
    onnx.save(model, path)
    with pytest.raises(FlowerxError, match="not finite"):
        Predictor(path)


# 3. Outputs that collide with each other or with inputs -----------------------------------------------------


def test_output_graph_and_labels_the_same_file(tmp_path, two_classes):
    graph = tmp_path / "x.onnx"
    result = run_cli(
        "train", "--image-dir", str(two_classes), "--output-graph", str(graph), "--output-labels", str(graph)
    )
    one_line_error(result, 2, "are the same file")


def test_output_that_is_a_folder_or_under_a_file(tmp_path, two_classes):
    (tmp_path / "folder.onnx").mkdir()
    (tmp_path / "file").write_text("x")
    one_line_error(
        run_cli("train", "--image-dir", str(two_classes), "--output-graph", str(tmp_path / "folder.onnx")),
        2,
        "is a folder",
    )
    one_line_error(
        run_cli("train", "--image-dir", str(two_classes), "--output-graph", str(tmp_path / "file" / "m.onnx")),
        2,
        "is a file, not a folder",
    )


def test_evaluate_output_equal_to_the_model_is_refused(tmp_path, two_classes):
    model = write_tiny_model(tmp_path / "m.onnx", labels=("a", "b", "c"))
    before = model.read_bytes()
    result = run_cli("evaluate", "--graph", str(model), "--image-dir", str(two_classes), "--output", str(model))
    one_line_error(result, 2, "it would be overwritten")
    assert model.read_bytes() == before


def test_outputs_never_overwrite_the_weights_the_int8_model_or_a_list_of_images(tmp_path, two_classes):
    models = tmp_path / "models"
    models.mkdir()
    weights = models / "mobilenet_2_5_224_tf_no_top.h5"
    weights.write_bytes(b"weights")
    train = (
        "train",
        "--image-dir",
        str(two_classes),
        "--model-dir",
        str(models),
        "--architecture",
        "mobilenet_0.25_224",
    )
    one_line_error(run_cli(*train, "--json", str(weights)), 2, "is the weights file: it would be overwritten")
    (models / "run.json").write_text("{}")  # a user's earlier result beside the weights may be replaced
    one_line_error(run_cli(*train, "--json", str(models / "run.json")), 2, "cannot load weights")  # (they are fake)
    graph = tmp_path / "q.onnx"
    int8 = ("--output-graph", str(graph), "--quantize", "int8", "--json", str(tmp_path / "q.int8.onnx"))
    one_line_error(run_cli(*train, *int8), 2, "are the same file")
    bench = ("bench", "--quick", "--runtimes", "onnxruntime", "--model-dir", str(models), "--json", str(weights))
    one_line_error(run_cli(*bench), 2, f"is the weights {weights.name} file: it would be overwritten")
    (tmp_path / "file").write_text("x")
    one_line_error(run_cli("bench", "--quick", "--work-dir", str(tmp_path / "file")), 2, "--work-dir")
    one_line_error(run_cli("bench", "--quick", "--plot", str(tmp_path / "p.foo")), 2, "--plot must end in .png")
    model = write_tiny_model(tmp_path / "m.onnx", labels=("a", "b", "c"))
    listed = tmp_path / "images.txt"
    listed.write_text(str(two_classes / "a" / "0.png") + "\n")
    one_line_error(
        run_cli("classify", "--graph", str(model), "--list", str(listed), "--output", str(listed)), 2, "--list"
    )
    assert weights.read_bytes() == b"weights" and listed.read_text().endswith("0.png\n")


def test_an_int8_model_is_not_quantized_again(tmp_path, two_classes):
    meta = {"labels": json.dumps(["a", "b", "c"]), "input_size": "8", "resize": "bilinear", "architecture": "tiny"}
    model = write_tiny_model(tmp_path / "m.onnx", metadata={**meta, "quantization": json.dumps({"scheme": "qdq"})})
    one_line_error(run_cli("export-int8", "--graph", str(model), "--image-dir", str(two_classes)), 2, "already an int8")


def test_invisible_direction_marks_are_shown_as_escapes():
    from flowerx.events import printable

    assert printable("rlm\u200fgpj.jpg \u200e\u061c\u200b\ufeff") == "rlm\\u200fgpj.jpg \\u200e\\u061c\\u200b\\ufeff"
    assert printable("क्‍ष 👩\u200d💻") == "क्‍ष 👩\u200d💻"  # joiners are part of scripts and emoji


def test_usage_errors_and_bad_ports_are_one_escaped_line():
    result = run_cli("classify", "x.jpg", f"--bogus{ESC}[31mRED\rOVER")
    assert result.returncode == 2 and ESC not in result.stderr and "\r" not in result.stderr, result.stderr
    assert "unrecognized arguments: --bogus\\x1b[31mRED\\rOVER" in result.stderr, result.stderr
    from flowerx.serve import ServeConfig

    for port in (-1, 65536):
        with pytest.raises(FlowerxError, match="--port must be 0-65535"):
            ServeConfig(graphs=("m.onnx",), port=port).check()


# 4. Labels file named after the graph -------------------------------------------------------------------------


def test_default_labels_file_is_named_after_the_graph():
    assert TrainConfig(output_graph="out/cats.onnx").labels_path == Path("out/cats.labels.txt")
    assert (
        TrainConfig(output_graph="out/dogs.onnx").labels_path != TrainConfig(output_graph="out/cats.onnx").labels_path
    )
    assert TrainConfig(output_graph="m.onnx", output_labels="l.txt").labels_path == Path("l.txt")


# 5. Only regular files, with a size limit ---------------------------------------------------------------------


def test_fifo_and_devices_are_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    model = write_tiny_model(tmp_path / "m.onnx")
    result = run_cli(
        "classify", str(tmp_path / "pipe.jpg"), str(tmp_path / "zero.jpg"), "--graph", str(model), timeout=60
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pipe.jpg: is a FIFO, not a regular file" in result.stderr
    assert "zero.jpg: is a character device, not a regular file" in result.stderr
    os.mkfifo(tmp_path / "pipe.onnx")
    one_line_error(
        run_cli("classify", str(model), "--graph", str(tmp_path / "pipe.onnx"), timeout=60),
        2,
        "is a FIFO, not a regular file",
    )


def test_training_pass_skips_a_fifo_with_its_reason(tmp_path):
    from flowerx.architectures import Architecture
    from flowerx.bottlenecks import BottleneckCache, get_bottlenecks

    for label in ("a", "b"):
        (tmp_path / "d" / label).mkdir(parents=True)
        make_image(tmp_path / "d" / label / "1.png", fmt="PNG")
    os.mkfifo(tmp_path / "d" / "a" / "pipe.jpg")
    dataset = discover(tmp_path / "d")
    arch = Architecture("fake", "mobilenet_v1", 8, 4)
    net = lambda batch: np.ones((len(batch), 4), np.float32)  # noqa: E731
    _, ok, stats = get_bottlenecks(dataset.items, BottleneckCache(tmp_path / "bn", arch), lambda: net)
    assert ok.sum() == 2 and stats.failed == [("a/pipe.jpg", "is a FIFO, not a regular file")]


def test_image_size_limit_is_configurable(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(make_image(tmp_path / "small.png").read_bytes() + b"\0" * (3 << 20))  # 3 MiB of padding
    monkeypatch.setenv("FLOWERX_MAX_IMAGE_MB", "1")
    with pytest.raises(ImageError, match="file is too large"):
        prepare_image(big, 8)
    monkeypatch.delenv("FLOWERX_MAX_IMAGE_MB")
    assert prepare_image(big, 8).shape == (8, 8, 3)
    model = write_tiny_model(tmp_path / "m.onnx")
    with pytest.raises(ImageError, match="file is too large"):
        Predictor(model, max_image_bytes=1 << 20).predict(big)


def test_a_bad_image_size_limit_is_one_error_up_front(tmp_path, monkeypatch):
    model = write_tiny_model(tmp_path / "m.onnx")
    images = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    monkeypatch.setenv("FLOWERX_MAX_IMAGE_MB", "lots")
    with pytest.raises(FlowerxError, match="FLOWERX_MAX_IMAGE_MB must be a number of MiB, not 'lots'"):
        Predictor(model)
    assert Predictor(model, max_image_bytes=1 << 20).predict(images[0])  # a limit given in code needs no variable
    with pytest.raises(FlowerxError, match="FLOWERX_MAX_IMAGE_MB") as e:  # the setting's error, not the image's
        prepare_image(images[0], 8)
    assert not isinstance(e.value, ImageError)
    result = run_cli("classify", "--graph", str(model), *map(str, images))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: FLOWERX_MAX_IMAGE_MB must be a number of MiB, not 'lots'\n"


# 6. Link loops and links out of the image dir --------------------------------------------------------------


def test_self_links_and_a_link_to_root_end_and_count_each_image_once(tmp_path):
    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(3):
            make_image(data / label / f"{i}.png", fmt="PNG", seed=i)
    os.symlink(".", data / "a" / "loop1")
    os.symlink(".", data / "a" / "loop2")
    os.symlink("/", data / "a" / "root")
    os.symlink(data / "b", data / "a" / "to-b")  # inside the image dir: followed, but b's files count once
    os.link(data / "a" / "0.png", data / "a" / "hardlink.png")
    dataset = discover(data)
    assert sorted(i.relpath for i in dataset.items) == [
        "a/0.png",
        "a/1.png",
        "a/2.png",
        "b/0.png",
        "b/1.png",
        "b/2.png",
    ]
    assert len(list_images(data / "a")) == 3  # to-b leads outside a: not followed unless asked


def test_links_outside_the_image_dir_only_when_asked(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    make_image(outside / "x.png", fmt="PNG")
    os.symlink(outside, tmp_path / "loop-back")
    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        make_image(data / label / "1.png", fmt="PNG")
    os.symlink(outside, data / "a" / "elsewhere")
    os.symlink(outside, data / "c")  # a class folder that is a link out
    plain = discover(data)
    assert plain.labels == ["a", "b"] and len(plain.items) == 2
    assert ("c", "a link outside the image dir (--follow-links follows it)") in plain.skipped_folders
    followed = discover(data, follow_links=True)
    assert followed.labels == ["a", "b", "c"] and len(followed.items) == 3  # x.png once: c's, not a's too


# 7. Archives: links out of the destination, bombs ---------------------------------------------------------------


def test_archive_whose_folder_is_a_link_to_itself_is_refused(tmp_path):
    archive = tmp_path / "evil.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("flower_photos")
        link.type, link.linkname = tarfile.SYMTYPE, "."
        tar.addfile(link)
    with pytest.raises(FlowerxError, match="has no folder|points outside"):
        fileio.extract_tar(archive, tmp_path / "dest" / "flower_photos", inner="flower_photos")
    assert not (tmp_path / "dest" / "flower_photos").exists()


def _archive_with_link(archive: Path, target: str) -> Path:
    """flower_photos/a.txt and a link flower_photos/x -> target."""
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("flower_photos/a.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"a"))
        link = tarfile.TarInfo("flower_photos/x")
        link.type, link.linkname = tarfile.SYMTYPE, target
        tar.addfile(link)
    return archive


def test_archive_link_pointing_out_of_its_folder_is_refused(tmp_path):
    with pytest.raises(FlowerxError, match="points outside"):
        fileio.extract_tar(_archive_with_link(tmp_path / "evil.tgz", ".."), tmp_path / "dest", inner="flower_photos")
    assert not (tmp_path / "dest").exists()


def test_archive_bomb_is_refused_before_it_is_written(tmp_path):
    archive = tmp_path / "bomb.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("flower_photos/zeros.jpg")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(FlowerxError, match="archive bomb"):
        fileio.extract_tar(archive, tmp_path / "dest", inner="flower_photos")
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.tgz"]  # nothing unpacked, nothing left


# 8. Names and labels print as themselves, never as markup or terminal escapes --------------------------------


def test_markup_and_escapes_in_names_and_labels_print_literally(tmp_path):
    labels = ("[red]daisy", "[link=https://example.com]roses[/]", f"{ESC}[31mblue")
    model = write_tiny_model(tmp_path / "m.onnx", labels=labels)
    folder = tmp_path / "[bold]x"  # file names cannot hold a closing tag's '/'; labels can (above)
    folder.mkdir()
    solid(folder / "[red]y.png", (250, 0, 0))
    solid(folder / f"e{ESC}[2Jz.png", (0, 0, 250))
    result = run_cli("classify", str(folder), "--graph", str(model), "--top-k", "3")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "[red]daisy 0." in result.stdout and "[link=https://example.com]roses[/] 0." in result.stdout
    assert ESC not in result.stdout and "\\x1b[31mblue" in result.stdout and "e\\x1b[2Jz.png" in result.stdout
    assert "[bold]x/[red]y.png" in result.stdout
    as_json = json.loads(run_cli("classify", str(folder), "--graph", str(model), "--json").stdout)
    assert {p["label"] for r in as_json["results"] for p in r["predictions"]} == set(labels)  # JSON unchanged
    missing = run_cli("classify", str(folder / "y[/i].png"), "--graph", str(model))
    assert "y[/i].png: no such file" in missing.stderr and "Traceback" not in missing.stderr
    one_line_error(run_cli("classify", "a.png", "--graph", str(tmp_path / "[bold]x[/i].onnx")), 2, "[bold]x[/i].onnx")


def test_evaluate_tables_print_labels_literally(tmp_path):
    labels = ("[red]a", "b[i]")
    model = write_tiny_model(tmp_path / "m.onnx", labels=labels + ("c",))
    for label, colour in zip(labels, ((250, 0, 0), (0, 250, 0))):
        (tmp_path / "d" / label).mkdir(parents=True)
        solid(tmp_path / "d" / label / "1.png", colour)
    result = run_cli("evaluate", "--graph", str(model), "--image-dir", str(tmp_path / "d"))
    assert result.returncode == 0 and "[red]a" in result.stdout and "b[i]" in result.stdout, result.stderr


# 9-10. Class names: control characters refused; names that are not UTF-8 -----------------------------------------


def test_class_folder_with_a_newline_is_refused_by_name(tmp_path):
    for label in ("good", "bad\nname"):
        (tmp_path / label).mkdir()
        solid(tmp_path / label / "1.png", (1, 2, 3))
    with pytest.raises(FlowerxError, match=r"class folder 'bad\\nname' has control characters"):
        discover(tmp_path)
    one_line_error(run_cli("train", "--image-dir", str(tmp_path)), 2, "bad\\nname")


def test_file_names_that_are_not_utf8_train_split_and_print(tmp_path):
    data = tmp_path / "d"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        solid(data / label / "1.png", (1, 2, 3))
    raw = os.path.join(os.fsencode(data / "a"), b"caf\xe9.png")
    with open(raw, "wb") as f:
        f.write((data / "a" / "1.png").read_bytes())
    dataset = discover(data)
    names = split_names(dataset.items, 10, 10)
    assert len(dataset.items) == 3 and len(names) == 3
    # A UTF-8 path hashes as before (splits of existing datasets do not move).
    import hashlib

    old = (int(hashlib.sha1(b"daisy/1.jpg").hexdigest(), 16) % 2**27) * (100.0 / (2**27 - 1))
    assert split_of("daisy/1.jpg", 10, 10) == ("validation" if old < 10 else "test" if old < 20 else "train")
    model = write_tiny_model(tmp_path / "m.onnx")
    result = run_cli("classify", str(data / "a"), "--graph", str(model), "--top-k", "1")
    assert result.returncode == 0 and "caf\\xe9.png" in result.stdout and "Traceback" not in result.stderr
    bad = tmp_path / "badclass"
    (bad / "ok").mkdir(parents=True)
    solid(bad / "ok" / "1.png", (1, 2, 3))
    os.mkdir(os.path.join(os.fsencode(bad), b"\xff"))
    solid(Path(os.fsdecode(os.path.join(os.fsencode(bad), b"\xff"))) / "1.png", (1, 2, 3))
    with pytest.raises(FlowerxError, match="not valid UTF-8"):
        discover(bad)


# 11. One clean line where there was "unexpected" --------------------------------------------------------------


def test_bad_input_sizes_and_output_ranks(tmp_path):
    for size in ("0", "-3", "x"):
        model = write_tiny_model(
            tmp_path / f"s{size}.onnx",
            input_shape=["N", "H", "W", 3],
            metadata={"labels": json.dumps(["r", "g", "b"]), "input_size": size},
        )
        with pytest.raises(FlowerxError, match="input size|input_size"):
            Predictor(model)
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(write_tiny_model(tmp_path / "rank3.onnx"))
    model.graph.node.append(helper.make_node("Unsqueeze", ["probs", "axes"], ["probs3"]))
    model.graph.initializer.append(helper.make_tensor("axes", TensorProto.INT64, [1], [2]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("probs3", TensorProto.FLOAT, ["N", 3, 1]))
    onnx.save(model, tmp_path / "rank3.onnx")
    image = solid(tmp_path / "x.png", (1, 2, 3))
    one_line_error(run_cli("classify", str(image), "--graph", str(tmp_path / "rank3.onnx")), 2, "output must be one")


@pytest.mark.parametrize(
    "training", ['"a string"', '{"testing_percentage": "ten", "validation_percentage": 10}', "{not json"]
)
def test_evaluate_split_with_malformed_training_metadata(tmp_path, two_classes, training):
    model = write_tiny_model(
        tmp_path / "m.onnx", metadata={"labels": json.dumps(["a", "x", "b"]), "input_size": "8", "training": training}
    )
    one_line_error(
        run_cli("evaluate", "--graph", str(model), "--image-dir", str(two_classes), "--split", "test"), 2, "training"
    )


def test_seed_and_summaries_dir_checked_before_work(tmp_path, two_classes):
    one_line_error(run_cli("train", "--image-dir", str(two_classes), "--seed", "-1"), 2, "--seed must be")
    (tmp_path / "afile").write_text("x")
    one_line_error(
        run_cli("train", "--image-dir", str(two_classes), "--summaries-dir", str(tmp_path / "afile")),
        2,
        "is a file, not a folder",
    )


def test_probabilities_of_no_images_is_empty(tmp_path):
    p = Predictor(write_tiny_model(tmp_path / "m.onnx"))
    assert p.probabilities([]).shape == (0, 3)
    assert p.predict_batch([]) == []


# 12. Flags that work where they are suggested; nothing after -- is rewritten ---------------------------------


def test_evaluate_takes_labels_and_input_size_for_a_bare_model(tmp_path, two_classes):
    model = write_tiny_model(tmp_path / "bare.onnx", metadata={})  # red, green, blue: a is red, b blue
    (tmp_path / "labels.txt").write_text("a\nx\nb\n")
    result = run_cli(
        "evaluate",
        "--graph",
        str(model),
        "--image-dir",
        str(two_classes),
        "--labels",
        str(tmp_path / "labels.txt"),
        "--input-size",
        "8",
        "--json",
    )
    assert result.returncode == 0 and json.loads(result.stdout)["accuracy"] == 1.0, result.stderr
    bench = run_cli("bench", "--graph", str(model), "--quick")
    one_line_error(bench, 2, "has no flowerx metadata")
    assert "--labels" not in bench.stderr


def test_flag_rewrite_stops_at_double_dash():
    from flowerx.cli import _normalize_flags

    assert _normalize_flags(["classify", "--top_k", "1", "--", "--my_photo.jpg"]) == [
        "classify",
        "--top-k",
        "1",
        "--",
        "--my_photo.jpg",
    ]


# 13. The caller's PIL image is never changed, and may be shared by threads ----------------------------------


def test_predict_leaves_the_callers_pil_image_alone(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(path)
    p = Predictor(write_tiny_model(tmp_path / "m.onnx"))
    for image in (Image.open(path), Image.open(io.BytesIO(path.read_bytes())), Image.open(path).convert("RGB")):
        p.predict(image)
        assert image.size == (800, 600) and image.mode == "RGB"
    shared_image = Image.open(io.BytesIO(path.read_bytes()))
    want = p.predict(path.read_bytes())
    results, errors = [], []

    def work():
        try:
            results.extend(p.predict(shared_image) for _ in range(20))
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 160 and all(r[0][0] == want[0][0] for r in results)


# 14. The Python API says what it accepts ---------------------------------------------------------------------


def test_api_arguments_are_checked(tmp_path, monkeypatch):
    p = Predictor(write_tiny_model(tmp_path / "m.onnx"))
    image = solid(tmp_path / "g.png", (0, 200, 0))
    with pytest.raises(FlowerxError, match="takes a list of images"):
        p.predict_batch(str(tmp_path))
    with pytest.raises(FlowerxError, match="use predict_batch"):
        p.predict([image])
    for top_k in (-1, 0, 2.5, True, "3"):
        with pytest.raises(FlowerxError, match="top_k"):
            p.predict(image, top_k=top_k)
    data = image.read_bytes()
    assert p.predict(bytearray(data)) == p.predict(memoryview(data)) == p.predict(data)
    with pytest.raises(ImageError, match="not an image source"):
        p.predict(None)
    with pytest.raises(ImageError, match="no pixels"):
        p.predict(np.zeros((0, 0, 3), np.uint8))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert p.predict("~/g.png")[0].label == "green"
    assert Predictor("~/m.onnx").labels == ["red", "green", "blue"]


@pytest.mark.parametrize(
    "labels,pattern",
    [
        ('"red"', "must be a list"),
        ('{"a": 1}', "must be a list"),
        ("[1, 2, 3]", "non-empty strings"),
        ('["a", "a", "b"]', "duplicate"),
    ],
)
def test_bad_labels_metadata_is_refused_at_load(tmp_path, labels, pattern):
    model = write_tiny_model(tmp_path / "m.onnx", metadata={"labels": labels, "input_size": "8"})
    with pytest.raises(FlowerxError, match=pattern):
        Predictor(model)


def test_outputs_that_are_not_probabilities_are_called_scores(tmp_path):
    import onnx

    path = write_tiny_model(tmp_path / "logits.onnx")
    model = onnx.load(path)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.op_type = "Identity"
    del softmax.attribute[:]
    onnx.save(model, path)
    p = Predictor(path)
    assert not p.probabilities_out and Predictor(write_tiny_model(tmp_path / "m.onnx")).probabilities_out
    result = run_cli("classify", str(solid(tmp_path / "r.png", (250, 0, 0))), "--graph", str(path))
    assert result.returncode == 0 and "scores, not probabilities" in result.stderr
    assert (
        json.loads(run_cli("classify", str(tmp_path / "r.png"), "--graph", str(path), "--json").stdout)["output"]
        == "scores"
    )


# 15. A result type, a useful repr, types for checkers ----------------------------------------------------------


def test_prediction_unpacks_like_a_tuple_and_serialises(tmp_path):
    p = Predictor(write_tiny_model(tmp_path / "m.onnx"))
    best = p.predict(solid(tmp_path / "b.png", (0, 0, 250)))[0]
    label, score = best
    assert isinstance(best, Prediction) and (label, best.label, best.index) == ("blue", "blue", 2)
    assert best == ("blue", score) and best.score == score
    assert json.loads(json.dumps(best.to_dict())) == {"label": "blue", "score": score, "index": 2}
    assert pickle.loads(pickle.dumps(best)).index == 2
    text = repr(p)
    assert "m.onnx" in text and "architecture='tiny'" in text and "'red'" in text and "CPUExecutionProvider" in text


def test_package_is_typed_and_names_its_lazy_exports():
    assert (ROOT / "flowerx" / "py.typed").is_file()
    tree = ast.parse((ROOT / "flowerx" / "__init__.py").read_text())
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    assert guarded and "Predictor" in ast.unparse(guarded[0])


# 16-17. A base install says which extra it needs; the extra installs everywhere ------------------------------


def test_train_without_the_train_extra_says_what_to_install(two_classes):
    code = (
        "import sys\nfor m in ('tensorflow', 'keras', 'tf2onnx', 'onnx'): sys.modules[m] = None\n"
        "from flowerx.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    for args in (["train", "--image-dir", str(two_classes)], ["export-int8", "--image-dir", str(two_classes)]):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        one_line_error(result, 2, 'pip install "flowerx[train]"')


def test_bench_skip_hint_keeps_its_brackets():
    from rich.console import Console

    from flowerx.bench import BenchReport, Row
    from flowerx.cli import bench_table

    row = Row(
        "mobilenet_0.25_128",
        "tensorflow",
        1,
        "random",
        status="skipped: tensorflow not installed (pip install 'flowerx[train]')",
    )
    table, notes = bench_table(BenchReport({"cpu": "cpu", "cores": 2}, [row], [], {"batch": 4}))
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(table)
    assert "skipped [1]" in console.export_text() and "pip install 'flowerx[train]'" in notes[0]


def test_train_extra_picks_the_tensorflow_package_that_exists_per_platform():
    from packaging.requirements import Requirement

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    tf = [Requirement(r) for r in extra if r.startswith("tensorflow")]
    for system, machine, want in (
        ("linux", "x86_64", "tensorflow-cpu"),
        ("win32", "AMD64", "tensorflow-cpu"),
        ("darwin", "arm64", "tensorflow"),
        ("linux", "aarch64", "tensorflow"),
    ):
        env = {"sys_platform": system, "platform_machine": machine}
        assert [r.name for r in tf if r.marker.evaluate(env)] == [want], (system, machine)


# 18. Datasets already split into train/ val/ test/ -----------------------------------------------------------


def test_a_presplit_dataset_uses_its_folders(tmp_path):
    data = tmp_path / "d"
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for label in ("cat", "dog"):
            (data / split / label).mkdir(parents=True)
            for i in range(n):
                make_image(data / split / label / f"{i}.png", fmt="PNG", seed=i)
    dataset = discover(data)
    assert dataset.presplit and dataset.labels == ["cat", "dog"]
    names = split_names(dataset.items, 10, 10)
    assert {(i.relpath.split("/")[0], n) for i, n in zip(dataset.items, names)} == {
        ("train", "train"),
        ("val", "validation"),
        ("test", "test"),
    }
    (data / "stray").mkdir()
    make_image(data / "stray" / "1.png", fmt="PNG")
    with pytest.raises(FlowerxError, match="put every class folder inside"):
        discover(data)


@pytest.mark.slow
def test_presplit_training_quiet_with_small_split_warnings(shared, tmp_path):
    flowers = subset(shared, tmp_path / "flat", per_class=12, classes=("daisy", "roses"))
    data = tmp_path / "split"
    for label in ("daisy", "roses"):
        files = sorted((flowers / label).iterdir())
        for split, chosen in (("train", files[:8]), ("val", files[8:10]), ("test", files[10:])):
            (data / split / label).mkdir(parents=True)
            for f in chosen:
                (data / split / label / f.name).write_bytes(f.read_bytes())
    graph = tmp_path / "out" / "flowers.onnx"
    args = small_train_args(shared, data, tmp_path, graph, steps="50")
    result = run_cli(*args, "-q", "--json", str(tmp_path / "result.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Step" not in result.stdout and "Bottlenecks" not in result.stdout  # -q: no step lines, no bars
    assert "warning: only 4 validation images" in result.stdout and "warning: only 4 test images" in result.stdout
    assert "Final test accuracy" in result.stdout and "(N=4)" in result.stdout
    assert (tmp_path / "out" / "flowers.labels.txt").read_text().split() == ["daisy", "roses"]
    record = json.loads((tmp_path / "result.json").read_text())  # what the benchmarks read (issue 11)
    assert record["test_count"] == 4 and record["split_counts"] == {"train": 16, "validation": 4, "test": 4}
    assert 0 <= record["test_accuracy"] <= 1 and record["timings"]["bottlenecks_s"] > 0 and record["int8"] is None
    config = json.loads(Predictor(graph).metadata["training"])["config"]
    assert config["how_many_training_steps"] == 50 and config["seed"] == 0 and "output_graph" not in config
    evaluated = run_cli("evaluate", "--graph", str(graph), "--image-dir", str(data), "--split", "test", "--json")
    assert evaluated.returncode == 0 and json.loads(evaluated.stdout)["count"] == 4, evaluated.stderr


# 19. Help text -------------------------------------------------------------------------------------------------


def test_help_describes_groups_and_shows_each_default_once():
    top = run_cli("-h").stdout
    assert "Teach an ImageNet network" in top and "download-flowers" in top
    text = run_cli("train", "-h").stdout
    for group in ("data:", "network:", "head:", "distortions:", "fine-tuning:", "int8:", "output:"):
        assert group in text
    flat = " ".join(text.split())
    assert "(default: 4000)" in flat and "{none,int8}" in flat and "-q, --quiet" in flat
    for flag in ("--image-dir", "--output-labels", "--experiment-name"):
        entry = re.search(re.escape(flag) + r" \S+ (.*?)(?= --|$)", flat).group(1)
        assert "(default: )" not in entry and entry.count("(default:") <= 1, entry
    assert flat.count("(default: 0.01)") == 1


# 20. The bench table fits 80 and 120 columns --------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 120])
def test_bench_table_fits_the_terminal(width):
    from rich.console import Console

    from flowerx.bench import BenchReport, Row
    from flowerx.cli import bench_table

    rows = [
        Row(
            name,
            runtime,
            threads,
            "imagenet",
            median_ms=12.345,
            p90_ms=13.0,
            p99_ms=14.0,
            throughput_ips=456.0,
            file_mb=16.9,
            params=3_200_000,
            macs=567_000_000,
            load_s=0.12,
            peak_mb=345.0,
            ratio=1.23,
            accuracy=0.915,
        )
        for name in ("mobilenet_1.0_224", "model.onnx (mobilenet_1.0_224, fp32)")
        for runtime in ("onnxruntime", "tensorflow", "litert")
        for threads in (1, 16)
    ]
    report = BenchReport({"cpu": "Intel(R) Xeon(R) Platinum 8488C", "cores": 16}, rows, [], {"batch": 32})
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(bench_table(report)[0])
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= width
    assert "12.35" in text and "mobilenet_1.0_224" in text and "456" in text and "91.5" in text
    assert all(k in json.loads(report.to_json())["rows"][0] for k in ("p99_ms", "peak_mb", "macs", "load_s"))


# 21. Progress where users wait -----------------------------------------------------------------------------------


def test_downloads_report_bytes_and_total(tmp_path, monkeypatch):
    payload = b"x" * (3 << 20)

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(payload))
    seen = []
    fileio.download(
        "https://example.com/w.h5", tmp_path / "w.h5", on_progress=lambda done, total: seen.append((done, total))
    )
    assert seen[-1] == (len(payload), len(payload)) and len(seen) == 3 and seen == sorted(seen)


def test_reporter_shows_preparing_then_counts_rates_from_there():
    from rich.console import Console

    from flowerx.cli import Reporter

    console = Console(width=120, record=True, file=io.StringIO(), force_terminal=False)
    reporter = Reporter(0, console)
    events = reporter.events()
    events.progress("Bottlenecks", 0, 10, "img")
    events.progress("Preparing mobilenet (one-time export to ONNX)", 0, None, "")
    events.progress("Preparing mobilenet (one-time export to ONNX)", 1, 1, "")
    events.warning("skipping a[/]b.jpg: empty file")
    events.detail("hidden at verbosity 0")
    events.progress("Bottlenecks", 10, 10, "img")
    reporter.close()
    text = console.export_text()
    assert "Preparing mobilenet" in text and "10/10" in text and "warning: skipping a[/]b.jpg" in text
    assert "hidden" not in text


# 22. Packaging ---------------------------------------------------------------------------------------------------


def test_packaging_metadata_and_a_clean_root():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()
    assert project["classifiers"] and not list(ROOT.glob("onnxruntime_profile_*.json"))
    assert "onnxruntime_profile_*.json" in (ROOT / ".gitignore").read_text()


@pytest.mark.slow
def test_the_sdist_carries_a_test_suite_that_collects(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
            str(tmp_path / "dist"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    sdist = tmp_path / "dist" / build.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    (top,) = (tmp_path / "x").iterdir()
    for name in ("tests/conftest.py", "tests/corpus.py", "tests/README.md", "LICENSE", "flowerx/py.typed"):
        assert (top / name).is_file(), name
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=top,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "FLOWERX_SHARED"},
    )
    assert collected.returncode == 0 and re.search(r"\d+ tests collected", collected.stdout), collected.stdout[-2000:]


def test_bench_outputs_that_collide_are_refused_before_timing(tmp_path):
    one_line_error(
        run_cli("bench", "--quick", "--json", str(tmp_path / "r"), "--csv", str(tmp_path / "r")), 2, "are the same file"
    )


# --- Found in review of the first pass ----------------------------------------------------------------------


def test_tilde_outputs_are_checked_and_written_at_the_same_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrainConfig(image_dir="~/data", output_graph="~/m.onnx")
    assert cfg.output_graph == str(tmp_path / "m.onnx") and cfg.labels_path == tmp_path / "m.labels.txt"
    assert cfg.image_dir == str(tmp_path / "data")


def test_outputs_never_overwrite_inputs_or_files_in_input_folders(tmp_path, two_classes):
    model = write_tiny_model(tmp_path / "m.onnx", metadata={})
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nx\nb\n")
    before = labels.read_text()
    base = ["evaluate", "--graph", str(model), "--labels", str(labels), "--input-size", "8", "--image-dir"]
    one_line_error(run_cli(*base, str(two_classes), "--output", str(labels)), 2, "is the --labels file")
    photo = two_classes / "a" / "0.png"
    one_line_error(run_cli(*base, str(two_classes), "--output", str(photo)), 2, "is a file in the image dir")
    one_line_error(
        run_cli("train", "--image-dir", str(two_classes), "--output-labels", str(photo)),
        2,
        "is a file in the image dir",
    )
    cache = tmp_path / "bn" / "mobilenet_1.0_224-x-v1"
    cache.mkdir(parents=True)
    (cache / "features.onnx").write_bytes(b"the cached network")
    one_line_error(
        run_cli(
            "train",
            "--image-dir",
            str(two_classes),
            "--bottleneck-dir",
            str(tmp_path / "bn"),
            "--output-graph",
            str(cache / "features.onnx"),
        ),
        2,
        "is a file in the bottleneck cache",
    )
    assert labels.read_text() == before and (cache / "features.onnx").read_bytes() == b"the cached network"


@pytest.mark.parametrize("dtype", ["BOOL", "UINT8", "INT64"])
def test_outputs_that_are_not_float_scores_are_refused_at_load(tmp_path, dtype):
    import onnx
    from onnx import TensorProto, helper

    path = write_tiny_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    model.graph.node.append(helper.make_node("Cast", ["probs"], ["cast"], to=getattr(TensorProto, dtype)))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("cast", getattr(TensorProto, dtype), ["N", 3]))
    onnx.save(model, path)
    with pytest.raises(FlowerxError, match="output must be float scores"):
        Predictor(path)


def test_predictor_takes_a_path_and_any_file_name(tmp_path):
    for bad in (None, 3):
        with pytest.raises(FlowerxError, match="must be a path"):
            Predictor(bad)
    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"m\xff.onnx")))
    odd.write_bytes(write_tiny_model(tmp_path / "m.onnx").read_bytes())
    assert Predictor(odd).labels == ["red", "green", "blue"]


def test_joiners_in_class_names_are_text_bidi_overrides_are_not(tmp_path):
    for label in ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\U0001f469\u200d\U0001f33e"):
        (tmp_path / "ok" / label).mkdir(parents=True)
        solid(tmp_path / "ok" / label / "1.png", (1, 2, 3))
    assert len(discover(tmp_path / "ok").labels) == 2
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "evil\u202egnp").mkdir(parents=True)
    for label in ("a", "evil\u202egnp"):
        solid(tmp_path / "bad" / label / "1.png", (1, 2, 3))
    with pytest.raises(FlowerxError, match="control characters"):
        discover(tmp_path / "bad")


def _split_layout(root: Path, splits=("train", "val", "test")) -> Path:
    for split in splits:
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            make_image(root / split / label / "1.png", fmt="PNG", seed=len(split))
    return root


def test_split_folder_names_and_odd_layouts(tmp_path):
    other = discover(_split_layout(tmp_path / "a", ("training", "valid", "testing")))
    assert other.presplit and set(split_names(other.items, 10, 10)) == {"train", "validation", "test"}
    with pytest.raises(FlowerxError, match="no train/ folder"):
        discover(_split_layout(tmp_path / "b", ("val", "test")))
    stray = _split_layout(tmp_path / "c")
    make_image(stray / "train" / "loose.png", fmt="PNG")
    assert ("train", "1 images outside any class folder, not used") in discover(stray).skipped_folders
    same = _split_layout(tmp_path / "d", ("train", "val"))
    os.symlink("train", same / "test")
    with pytest.raises(FlowerxError, match="same folder as another split folder"):
        discover(same)


def test_links_out_below_class_level_are_reported(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    make_image(outside / "x.png", fmt="PNG")
    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        make_image(data / label / "1.png", fmt="PNG")
    os.symlink(outside, data / "a" / "more")
    os.symlink(data / "a", data / "c")  # a class folder that is another class
    skipped = dict(discover(data).skipped_folders)
    assert skipped["a/more"].startswith("a link outside") and skipped["c"].startswith("the same folder")


def test_experiment_and_summary_paths_that_tensorboard_cannot_take(tmp_path, two_classes):
    one_line_error(
        run_cli("train", "--image-dir", str(two_classes), "--experiment-name", "x\udcff"), 2, "plain UTF-8 name"
    )
    (tmp_path / "sum").mkdir()
    (tmp_path / "sum" / "exp").write_text("a file where the experiment's folder goes")
    one_line_error(_train_experiment(two_classes, tmp_path / "sum", "exp"), 2, "is a file, not a folder")


def test_archive_links_that_would_leave_once_moved_and_damaged_archives(tmp_path):
    climbing = _archive_with_link(tmp_path / "climb.tgz", "../flower_photos/a.txt")  # fine until the folder moves
    with pytest.raises(FlowerxError, match="points outside"):
        fileio.extract_tar(climbing, tmp_path / "elsewhere", inner="flower_photos")
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as tar:
        for i in range(30):
            info = tarfile.TarInfo(f"flower_photos/{i:02d}.jpg")
            info.size = 2000
            tar.addfile(info, io.BytesIO(bytes([i + 1]) * 2000))
    data = bytearray(good.read_bytes())
    data[15 * 2560 : 15 * 2560 + 512] = b"\xff" * 512  # one member's header destroyed, mid-archive
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))
    with pytest.raises(FlowerxError, match="damaged|cannot unpack"):
        fileio.extract_tar(damaged, tmp_path / "dest", inner="flower_photos")
    assert not (tmp_path / "dest").exists()


def test_download_flowers_leaves_a_users_own_archive_alone(tmp_path, monkeypatch):
    from flowerx import data

    (tmp_path / "flower_photos.tgz").write_bytes(b"mine")
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not a tar"))
    with pytest.raises(FlowerxError):
        data.download_flowers(tmp_path)
    assert (tmp_path / "flower_photos.tgz").read_bytes() == b"mine"


def test_bench_seconds_must_be_finite_and_quiet_goes_before_the_command(tmp_path):
    one_line_error(run_cli("bench", "--quick", "--seconds", "inf"), 2, "--seconds")
    model = write_tiny_model(tmp_path / "m.onnx")
    result = run_cli("-q", "classify", str(solid(tmp_path / "r.png", (250, 0, 0))), "--graph", str(model))
    assert result.returncode == 0 and result.stdout.startswith("red ")


# 23. Ray cluster addresses --------------------------------------------------------------------------------------------


def test_a_ray_address_nothing_answers_at_is_one_line_at_once(tmp_path):
    """ray.init retries an unreachable cluster for minutes, logging the address raw; flowerx asks first."""
    import socket

    from flowerx.onray import check_reachable

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FlowerxError, match=f"nothing answers at 127.0.0.1:{port} \\(Connection refused\\)"):
        check_reachable(f"127.0.0.1:{port}")
    for bad in ("127.0.0.1", "host:port", ":6379", "h:70000", "h:\u00b2"):
        with pytest.raises(FlowerxError, match="a cluster address is HOST:PORT"):
            check_reachable(bad)
    for resolved_by_ray in (None, "", "auto", "local", "anyscale://cluster"):
        check_reachable(resolved_by_ray)
    with socket.create_server(("127.0.0.1", 0)) as server:  # something answers: Ray's turn
        check_reachable(f"ray://127.0.0.1:{server.getsockname()[1]}")

    pytest.importorskip("ray", reason='Ray is not installed (pip install "flowerx[ray]")')
    model = write_tiny_model(tmp_path / "m.onnx")
    image = make_image(tmp_path / "1.png")
    args = ("classify", "--graph", str(model), str(image), "--output", str(tmp_path / "out.jsonl"), "--ray")
    result = run_cli(*args, f"127.0.0.1:{port}\x1b[31m", timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "\x1b" not in result.stderr
    result = run_cli(*args, f"127.0.0.1:{port}", timeout=60)
    assert (
        result.returncode == 2
        and result.stderr
        == f"error: --ray: nothing answers at 127.0.0.1:{port} (Connection refused); is the Ray cluster up?\n"
    )
    assert not (tmp_path / "out.jsonl").exists()
