"""Distortions with cached views, and fine-tuning, on a small real subset (needs $FLOWERX_SHARED)."""

import json
import re

import pytest
from conftest import DAISY, run_cli, small_train_args, subset

from flowerx import Predictor


def train(shared, data, work, *extra):
    return run_cli(
        *small_train_args(shared, data, work, steps="200"),
        "--testing-percentage",
        "20",
        "--validation-percentage",
        "20",
        *extra,
    )


@pytest.mark.slow
def test_distorted_views_are_computed_once_and_reused(shared, tmp_path):
    data = subset(shared, tmp_path / "data", per_class=15)
    options = (
        "--flip_left_right",
        "--random_crop",
        "10",
        "--random_scale",
        "10",
        "--random_brightness",
        "10",
        "--distorted_views",
        "2",
    )
    first = train(shared, data, tmp_path, *options)
    assert first.returncode == 0, first.stdout + first.stderr
    computed = int(re.search(r"Distorted views \(.*\): 2 per training image, (\d+) computed", first.stdout).group(1))
    assert computed > 0
    again = train(shared, data, tmp_path, *options)
    assert "2 per training image, 0 computed" in again.stdout  # everything cached, keyed by the settings
    other = train(shared, data, tmp_path, *options[:-1], "3")
    assert re.search(r"3 per training image, (\d+) computed", other.stdout).group(1) == str(computed // 2)
    meta = json.loads(Predictor(tmp_path / "model.onnx").metadata["training"])
    assert meta["distortion"] == "flip=1,crop=10,scale=10,brightness=10"


@pytest.mark.slow
def test_fine_tuning_exports_the_tuned_network_with_the_same_contract(shared, tmp_path):
    data = subset(shared, tmp_path / "data", per_class=15)
    options = ("--fine-tune-blocks", "13", "--fine-tune-epochs", "3", "--fine-tune-learning-rate", "0.001")
    result = train(shared, data, tmp_path, *options)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on fresh views (flip=1,crop=0,scale=15,brightness=10)" in result.stdout  # the default distortion
    assert len(re.findall(r"Fine-tune epoch +\d/3: train accuracy", result.stdout)) >= 1
    kept = re.search(r"kept epoch (\d)", result.stdout)
    epochs = int(kept.group(1)) if kept else 0
    assert kept or "kept the head alone" in result.stdout
    assert re.search(r"ONNX matches Keras to [\d.e-]+", result.stdout)  # the export's parity check passed
    tuned = Predictor(tmp_path / "model.onnx")
    assert (
        tuned.labels == ["daisy", "roses", "tulips"]
        and json.loads(tuned.metadata["training"])["fine_tune_blocks"] == 13
    )
    assert tuned.predict(shared / DAISY)[0][0] == "daisy"
    # Tuned for some epochs: the exported network differs from the frozen one. Zero epochs (fine-tuning never
    # beat the head on validation): the head-only model is kept, identical.
    head_only = train(shared, data, tmp_path / "plain")
    assert head_only.returncode == 0
    same = Predictor(tmp_path / "plain" / "model.onnx").predict(shared / DAISY) == tuned.predict(shared / DAISY)
    assert same == (epochs == 0), (epochs, result.stdout)
    # A rerun with the same data and settings finds the finished checkpoint: no epoch runs again, same model.
    again = train(shared, data, tmp_path, *options)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Fine-tune: finished after epoch" in again.stdout and "Fine-tune epoch" not in again.stdout
    assert (
        Predictor(tmp_path / "model.onnx").probabilities([shared / DAISY]).tolist()
        == tuned.probabilities([shared / DAISY]).tolist()
    )
    bad = train(shared, data, tmp_path, "--fine-tune-blocks", "20")
    assert bad.returncode == 2 and "must be 1-13" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_interrupted_fine_tuning_resumes_at_its_next_epoch(shared, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    data = subset(shared, tmp_path / "data", per_class=15)
    args = [
        *small_train_args(shared, data, tmp_path, steps="200"),
        "--testing-percentage",
        "20",
        "--validation-percentage",
        "20",
        "--fine-tune-blocks",
        "2",
        "--fine-tune-epochs",
        "6",
        "--fine-tune-learning-rate",
        "0.01",
    ]
    log = (tmp_path / "first-run.log").open("w")  # a file, not a pipe nobody reads while it runs
    proc = subprocess.Popen([sys.executable, "-m", "flowerx", *args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "bn").rglob("fine-tune-model.npz")):  # written after each epoch
        assert proc.poll() is None, (tmp_path / "first-run.log").read_text()
        assert time.monotonic() < deadline, "fine-tuning never finished an epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert not (tmp_path / "model.onnx").exists()
    rerun = train(shared, data, tmp_path, *args[args.index("--fine-tune-blocks") :])
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    done = int(re.search(r"resuming after epoch (\d+)", rerun.stdout).group(1))
    first = re.search(r"Fine-tune epoch +(\d+)/6", rerun.stdout)
    assert done >= 1 and (first is None or int(first.group(1)) == done + 1), rerun.stdout
    assert Predictor(tmp_path / "model.onnx").predict(shared / DAISY)[0][0] == "daisy"
