"""`flowerx classify DIR --output FILE [--ray]` (issue 15): one row per image, the same rows in every format and
with or without Ray (a real local Ray instance, no mocks)."""

import pytest
from conftest import run_cli, solid, write_tiny_v2_model

from flowerx import FlowerxError
from flowerx.batch import classify_to_file, read_rows

COLOURS = {"red": (200, 10, 10), "green": (10, 200, 10), "blue": (10, 10, 200)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    model = write_tiny_v2_model(root / "model.onnx")
    images = root / "images"
    images.mkdir()
    paths = []
    for i in range(40):  # more than one batch
        name = list(COLOURS)[i % 3]
        paths.append(solid(images / f"{i:02d}-{name}.png", COLOURS[name], (20 + i, 30)))
    (images / "20-broken.jpg").write_bytes(b"not an image")
    return {"model": model, "images": images, "paths": sorted(images.iterdir())}


def test_rows_in_every_format_are_the_same_and_name_the_bad_file(folder, tmp_path):
    outputs = {kind: tmp_path / f"out{kind}" for kind in (".jsonl", ".csv", ".parquet")}
    for output in outputs.values():
        result = classify_to_file(folder["model"], folder["paths"], output, top_k=2)
        assert (result.images, result.failed) == (41, 1)
    rows = read_rows(outputs[".jsonl"])
    assert [r["path"] for r in rows] == [str(p) for p in folder["paths"]]  # the listed order
    for row in rows:
        if row["path"].endswith("broken.jpg"):
            assert row["error"] == "not an image (unrecognised format)" and row["labels"] == []
        else:
            assert row["labels"][0] == row["path"].rsplit("-", 1)[1][:-4] and len(row["scores"]) == 2
    assert read_rows(outputs[".csv"]) == rows and read_rows(outputs[".parquet"]) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "out.jsonl", "out.parquet"]  # no temp files
    nested = tmp_path / "new" / "folder" / "rows.jsonl"  # an output folder that does not exist yet
    assert classify_to_file(folder["model"], folder["paths"][:3], nested).images == 3 and nested.is_file()


def test_files_beside_the_output_are_never_overwritten_or_removed(folder, tmp_path):
    import os

    mine = {f".rows.jsonl.{os.getpid()}.tmp": "keep me", ".rows.jsonl.tmp": "and me"}  # names a temp file might take
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    classify_to_file(folder["model"], folder["paths"][:3], tmp_path / "rows.jsonl")
    with pytest.raises(FlowerxError):  # a run that fails midway (an unknown model) removes only its own temp file
        classify_to_file(tmp_path / "rows.jsonl", folder["paths"][:3], tmp_path / "rows.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*mine, "rows.jsonl"])
    assert all((tmp_path / name).read_text() == text for name, text in mine.items())
    assert oct((tmp_path / "rows.jsonl").stat().st_mode & 0o777) == "0o644"
    previous = os.umask(0o077)  # the user's umask holds, as for every file flowerx writes
    try:
        classify_to_file(folder["model"], folder["paths"][:3], tmp_path / "private.jsonl")
    finally:
        os.umask(previous)
    assert oct((tmp_path / "private.jsonl").stat().st_mode & 0o777) == "0o600"
    import threading

    ours = tmp_path / f".late.jsonl.{os.getpid()}.{threading.get_ident()}.tmp"  # the very name this run takes
    ours.write_text("someone's")
    with pytest.raises(FlowerxError, match="is in the way"):
        classify_to_file(folder["model"], folder["paths"][:3], tmp_path / "late.jsonl")
    assert ours.read_text() == "someone's" and not (tmp_path / "late.jsonl").exists()


def test_bad_outputs_are_refused_before_any_work(folder, tmp_path):
    with pytest.raises(FlowerxError, match="must end in .jsonl, .csv, .parquet"):
        classify_to_file(folder["model"], folder["paths"], tmp_path / "out.txt")
    victim = tmp_path / "mine.jsonl"
    victim.write_text("keep me")
    with pytest.raises(FlowerxError, match="it would be overwritten"):  # an output that is one of the inputs
        classify_to_file(folder["model"], [*folder["paths"], victim], victim)
    assert victim.read_text() == "keep me"
    done = run_cli("classify", str(folder["images"]), "--graph", str(folder["model"]), "--ray")
    assert done.returncode == 2 and "give --output" in done.stderr


def test_cli_writes_rows_from_a_folder_and_a_list_file(folder, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(str(p) for p in folder["paths"][:5]) + "\n\n")
    out = tmp_path / "rows.jsonl"
    done = run_cli("classify", "--list", str(listed), "--graph", str(folder["model"]), "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "5 images, 0 could not be classified" in done.stdout and len(read_rows(out)) == 5
    done = run_cli("classify", str(folder["images"]), "--graph", str(folder["model"]), "--output", str(out))
    assert done.returncode == 1 and "41 images, 1 could not be classified" in done.stdout  # 1: a file failed


def test_storage_uris_give_the_rows_their_files_give(folder, tmp_path):
    """Issue 15: URIs that pyarrow reads (file:// here; s3:// and gs:// take the same path, with credentials)."""
    pytest.importorskip("pyarrow")
    uri = folder["images"].as_uri()
    out, local = tmp_path / "uri.jsonl", tmp_path / "local.jsonl"
    done = run_cli("classify", uri, "--graph", str(folder["model"]), "--output", str(out))
    assert done.returncode == 1 and "41 images, 1 could not be classified" in done.stdout, done.stderr
    classify_to_file(folder["model"], folder["paths"], local)
    rows, expected = read_rows(out), read_rows(local)
    assert [r["path"] for r in rows] == [p.as_uri() for p in folder["paths"]]
    assert [{**r, "path": ""} for r in rows] == [{**r, "path": ""} for r in expected]
    missing = folder["images"].as_uri() + "/gone.png"
    listed = tmp_path / "list.txt"
    listed.write_text(f"{folder['paths'][0].as_uri()}\n{missing}\n")
    done = run_cli("classify", "--list", str(listed), "--graph", str(folder["model"]), "--output", str(out))
    assert done.returncode == 1 and read_rows(out)[1]["error"].startswith("cannot read file")  # an error row
    for bad, message in (("nosuch://bucket/x", "cannot open nosuch://bucket/x"), (uri + "/nothere", "does not exist")):
        done = run_cli("classify", bad, "--graph", str(folder["model"]), "--output", str(out))
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    done = run_cli("classify", uri, "--graph", str(folder["model"]))
    assert done.returncode == 2 and "give --output" in done.stderr


@pytest.mark.slow
def test_ray_gives_the_same_rows(folder, tmp_path):
    pytest.importorskip("ray")
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    import ray

    classify_to_file(folder["model"], folder["paths"], local, top_k=3)
    ray.init(logging_level="ERROR", include_dashboard=False)  # one instance for every run below
    try:
        for kind in (".parquet", ".jsonl", ".csv"):  # each format, its error row included
            on_ray = tmp_path / f"ray{kind}"
            result = classify_to_file(folder["model"], folder["paths"], on_ray, top_k=3, ray=True, actors=2)
            assert (result.images, result.failed) == (41, 1)
            assert read_rows(on_ray) == read_rows(local)
        uris = [p.as_uri() for p in folder["paths"]]  # the workers read the URIs themselves
        classify_to_file(folder["model"], uris, on_ray, top_k=3, ray=True, actors=2)
        assert [{**r, "path": ""} for r in read_rows(on_ray)] == [{**r, "path": ""} for r in read_rows(local)]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_train_with_ray_fills_the_same_cache_and_gives_the_same_model(shared, tmp_path):
    """Issue 15: the bottleneck pass on a real local Ray instance writes the entries the local pass writes (in
    the sharded form here, the local run's in files: the same features either way)."""
    pytest.importorskip("ray")
    import numpy as np
    from conftest import small_train_args, subset

    from flowerx.predictor import Predictor

    data = subset(shared, tmp_path / "data", 8)
    (data / "daisy" / "broken.jpg").write_bytes(b"not a photo")  # skipped with the same warning either way
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    views = ("--flip-left-right", "--distorted-views", "1")  # the views' pass runs on Ray too
    first = run_cli(*small_train_args(shared, data, local, steps="50"), *views, timeout=300)
    ray_args = ("--ray", "--cache-format", "shards")
    second = run_cli(*small_train_args(shared, data, on_ray, steps="50"), *views, *ray_args, timeout=300)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert "Bottlenecks: 0 cached, 24 computed, 1 images skipped" in first.stdout
    assert "Bottlenecks: 24 cached, 0 computed, 1 images skipped" in second.stdout  # Ray computed, the driver read
    warning = "skipping daisy/broken.jpg: not an image (unrecognised format)"
    assert warning in first.stdout and warning in second.stdout
    entries = {p.stem: np.load(p) for p in (local / "bn").rglob("*.npy")}
    ray_entries = {}
    for shard in (on_ray / "bn").rglob("shard-*.npz"):  # one for the images, one for their views
        with np.load(shard) as rows:
            ray_entries.update((key.tobytes().hex(), vector) for key, vector in zip(rows["keys"], rows["features"]))
    assert entries.keys() == ray_entries.keys() and len(entries) > 24  # the 24 photos and the training views
    assert max(float(np.abs(entries[k] - ray_entries[k]).max()) for k in entries) < 1e-6
    photos = [p for p in sorted(data.rglob("*.jpg")) if p.name != "broken.jpg"][:6]
    a, b = Predictor(local / "model.onnx"), Predictor(on_ray / "model.onnx")
    assert np.abs(a.probabilities(photos) - b.probabilities(photos)).max() < 1e-6
