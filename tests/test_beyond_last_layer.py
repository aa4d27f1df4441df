"""Distortions with cached views, and fine-tuning, on a small real subset (needs $FLOWERX_SHARED)."""

import json
import re

import pytest

from conftest import DAISY, run_cli, subset
from flowerx import Predictor


def train(shared, data, work, *extra):
    return run_cli("train", "--image-dir", str(data), "--architecture", "mobilenet_0.25_224",
                   "--model-dir", str(shared / "models"), "--bottleneck-dir", str(work / "bn"),
                   "--summaries-dir", "", "--output-graph", str(work / "model.onnx"),
                   "--how-many-training-steps", "200", "--testing-percentage", "20",
                   "--validation-percentage", "20", *extra)


@pytest.mark.slow
def test_distorted_views_are_computed_once_and_reused(shared, tmp_path):
    data = subset(shared, tmp_path / "data", per_class=15)
    options = ("--flip_left_right", "--random_crop", "10", "--random_scale", "10", "--random_brightness", "10",
               "--distorted_views", "2")
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
    result = train(shared, data, tmp_path, "--fine-tune-blocks", "1", "--fine-tune-epochs", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    epochs = int(re.search(r"Fine-tuned the top 1 block\(s\) for (\d+) epoch", result.stdout).group(1))
    assert re.search(r"ONNX matches Keras to [\d.e-]+", result.stdout)  # the export's parity check passed
    tuned = Predictor(tmp_path / "model.onnx")
    assert tuned.labels == ["daisy", "roses", "tulips"] and json.loads(tuned.metadata["training"])["fine_tune_blocks"] == 1
    assert tuned.predict(shared / DAISY)[0][0] == "daisy"
    # Tuned for some epochs: the exported network differs from the frozen one. Zero epochs (fine-tuning never
    # beat the head on validation): the head-only model is kept, identical.
    head_only = train(shared, data, tmp_path / "plain")
    assert head_only.returncode == 0
    same = Predictor(tmp_path / "plain" / "model.onnx").predict(shared / DAISY) == tuned.predict(shared / DAISY)
    assert same == (epochs == 0), (epochs, result.stdout)
    with_views = train(shared, data, tmp_path, "--fine-tune-blocks", "1", "--fine-tune-epochs", "2",
                       "--flip_left_right", "--distorted_views", "1")
    assert with_views.returncode == 0, with_views.stdout + with_views.stderr
    assert re.search(r"Distorted conv_pw_12_relu views \(flip=1.*\): 1 per training image, \d+ computed", with_views.stdout)
    bad = train(shared, data, tmp_path, "--fine-tune-blocks", "20")
    assert bad.returncode == 2 and "must be 1-12" in bad.stderr and "Traceback" not in bad.stderr
