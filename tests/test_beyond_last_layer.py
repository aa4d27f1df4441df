"""Distortions with cached views, and fine-tuning, on a small real subset (needs $FLOWERX_SHARED)."""

import json
import os
import re
from dataclasses import replace

import numpy as np
import pytest
from conftest import DAISY, make_image, run_cli, small_train_args, subset

from flowerx import Predictor
from flowerx.architectures import get_architecture
from flowerx.data import ImageItem
from flowerx.finetune import (
    CHECKPOINT_VERSION,
    MIN_EPOCHS,
    FineTuneConfig,
    Probe,
    _run_key,
    decode_time,
    epochs_that_fit,
    estimate_s,
    recipe,
    shortened_epochs,
)
from flowerx.train import TrainConfig


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
    head_only = train(shared, data, tmp_path / "plain", "--head-only")
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


@pytest.mark.slow
def test_a_resumed_default_run_over_its_budget_keeps_the_head_and_the_checkpoint(shared, tmp_path):
    """The default run resumes its checkpoint; when the epochs left do not fit this run's --time-budget it keeps
    the head alone and leaves the checkpoint as it was, rather than start a shorter run over it."""
    import signal
    import subprocess
    import sys
    import time

    data = subset(shared, tmp_path / "data", per_class=50)  # 3 training steps an epoch: enough to estimate
    args = [*small_train_args(shared, data, tmp_path), "--validation-percentage", "20", "--fine-tune-epochs", "1000"]
    log = (tmp_path / "first-run.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowerx", *args, "--time-budget", "100000"], stdout=log, stderr=subprocess.STDOUT
    )
    deadline, checkpoint = time.monotonic() + 300, tmp_path / "bn"
    while not list(checkpoint.rglob("fine-tune-model.npz")):  # written after each epoch
        assert proc.poll() is None, (tmp_path / "first-run.log").read_text()
        assert time.monotonic() < deadline, "fine-tuning never finished an epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    checkpoint = next(checkpoint.rglob("fine-tune-model.npz"))
    before = checkpoint.read_bytes()
    rerun = run_cli(*args, "--time-budget", "60")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming after epoch" in rerun.stdout and "its checkpoint stays for a later run" in rerun.stdout
    assert "Fine-tuning " not in rerun.stdout.split("resuming after epoch")[1]  # no shorter run started over it
    assert checkpoint.read_bytes() == before
    assert Predictor(tmp_path / "model.onnx").predict(shared / DAISY)[0][0] == "daisy"


def test_the_estimate_scales_steps_by_pixels_and_adds_validation():
    cfg = FineTuneConfig(13, max_epochs=3, low_res=160, full_res_epochs=1)
    assert [cfg.size(e, 224) for e in (1, 2, 3)] == [160, 160, 224]
    # 5 steps left of epoch 1, epoch 2 at 160 (10 steps), epoch 3 at 224 (10 steps, 1.96x the pixels)
    assert estimate_s(cfg, 1.0, 160, 224, 5, 10, 0, 1) == pytest.approx(5 + 10 + 10 * 1.96)
    # 96 validation images a full-size epoch: a third of 3 full-size steps' cost, after each of the 3 epochs
    assert estimate_s(cfg, 1.0, 160, 224, 0, 0, 96, 1) == pytest.approx(3 * 1.96 * 96 / 32 / 3)
    assert cfg.first_kept_epoch(224) == 3  # a network trained on smaller views is not kept
    # Decoding at 0.1 s an image (all threads together) is slower than any step: 3.2 s a 32-image step at
    # either size, and 0.1 s a validated image
    assert estimate_s(cfg, 1.0, 160, 224, 5, 10, 0, 1, 0.1) == pytest.approx((5 + 10 + 10) * 3.2)
    assert estimate_s(cfg, 1.0, 160, 224, 0, 0, 96, 1, 0.1) == pytest.approx(3 * 96 * 0.1)
    assert estimate_s(cfg, 1.0, 160, 224, 5, 10, 0, 1, 0.001) == pytest.approx(5 + 10 + 10 * 1.96)  # keeps up
    workers = min(os.cpu_count() or 1, 3 * 32)
    assert decode_time([0.2, 0.1, 0.3], 32) == pytest.approx(0.2 / workers) and decode_time([], 32) == 0
    assert FineTuneConfig(13, max_epochs=3).size(1, 224) == 224  # no low_res: every epoch full size
    assert cfg.size(1, 128) == 128 and cfg.first_kept_epoch(128) == 1  # low_res not below the network's
    # in words, as a run (and a budget-shortened one: the full-size epochs stay, the low-res ones go) says it
    assert cfg.schedule(224) == "3 epochs (2 at 160 px, then 1 at 224 px)" and cfg.schedule(128) == "3 epochs at 128 px"
    assert replace(cfg, max_epochs=1).schedule(224) == "1 epoch at 224 px"
    # The default recipe (blocks, epochs, low_res): where a full-size epoch is costly, the top 9 blocks at full
    # size (Inception V3: all, with progressive resizing); elsewhere all 13 blocks, 12 full-size epochs
    assert recipe(get_architecture("mobilenet_1.0_224")) == (9, 6, 0) == recipe(get_architecture("mobilenet_0.75_192"))
    assert recipe(get_architecture("inception_v3")) == (10, 6, 160)
    assert (
        recipe(get_architecture("mobilenet_0.25_224")) == (13, 12, 0) == recipe(get_architecture("mobilenet_1.0_128"))
    )
    small = TrainConfig(image_dir="x").fine_tune(get_architecture("mobilenet_0.25_224"))
    assert (small.max_epochs, small.low_res) == (12, 0)
    big = TrainConfig(image_dir="x", fine_tune_epochs=3, fine_tune_low_res=160).fine_tune(
        get_architecture("mobilenet_1.0_224")
    )
    assert (big.max_epochs, big.low_res) == (3, 160)  # a flag given wins over the recipe


def test_fewer_epochs_where_the_recipe_does_not_fit():
    """The epochs that fit what is left of --time-budget, estimated from the first steps of the full run:
    the most that fit, never fewer than MIN_EPOCHS (0: the head alone)."""
    probe = Probe(step_s=1.0, size=224, full=224, steps=10, validation=96, decode_s=0.0)
    cfg = FineTuneConfig(9, max_epochs=6)
    epoch_s = probe.run_s(replace(cfg, max_epochs=2)) - probe.run_s(replace(cfg, max_epochs=1))
    assert epoch_s == pytest.approx(10 + 96 / 32 / 3)  # its steps and its validation (forward only)
    assert probe.run_s(cfg) == pytest.approx(6 * epoch_s + 1)  # and the validation before the first epoch
    assert epochs_that_fit(cfg, probe, probe.run_s(cfg)) == 5  # fewer than the recipe, or why shorten
    assert epochs_that_fit(cfg, probe, 4.5 * epoch_s + 1) == 4
    assert epochs_that_fit(cfg, probe, MIN_EPOCHS * epoch_s) == 0  # not even MIN_EPOCHS: the head alone
    assert epochs_that_fit(FineTuneConfig(9, max_epochs=MIN_EPOCHS), probe, 1e9) == 0
    resized = FineTuneConfig(10, max_epochs=6, low_res=112, full_res_epochs=2)  # low-res epochs cost a quarter
    assert epochs_that_fit(resized, probe, probe.run_s(replace(resized, max_epochs=4)) + 0.1) == 4
    assert probe.run_s(resized) == pytest.approx(4 * (10 / 4 + 1) + 2 * epoch_s + 1)
    huge = FineTuneConfig(9, max_epochs=10**9)  # `--fine-tune-epochs 1000000000`: answered at once, not epoch by epoch
    assert epochs_that_fit(huge, probe, 1000.5 * epoch_s + 1) == 1000


def test_a_run_shortened_to_fit_is_found_again_by_its_rerun(tmp_path):
    """A checkpoint of the same settings with fewer epochs, shortened from the epochs asked for to fit
    --time-budget, is resumed by a rerun, not trained anew; one of other settings, of as many epochs, or asked
    for with fewer epochs (not shortened), is not."""
    items = [ImageItem(make_image(tmp_path / f"{i}.png", seed=i), f"{i}.png", i % 2) for i in range(6)]
    splits = {"train": np.arange(4), "validation": np.arange(4, 6), "test": np.arange(0)}
    arch, checkpoint, head = get_architecture("mobilenet_0.25_224"), tmp_path / "fine-tune-model.npz", {"head": [1]}
    cfg = FineTuneConfig(13, max_epochs=12)

    def save(epochs: int, seed: int = 0, version: int = CHECKPOINT_VERSION, shortened_from: int = 12) -> None:
        key = _run_key(arch, replace(cfg, max_epochs=epochs, seed=seed), items, splits, head)
        state = {"version": version, "key": key, "max_epochs": epochs, "shortened_from": shortened_from}
        np.savez(checkpoint, state=np.array(json.dumps(state)))

    assert shortened_epochs(checkpoint, arch, cfg, items, splits, head) is None  # no checkpoint
    save(4)
    assert shortened_epochs(checkpoint, arch, cfg, items, splits, head) == 4
    assert shortened_epochs(checkpoint, arch, replace(cfg, seed=1), items, splits, head) is None
    assert shortened_epochs(checkpoint, arch, cfg, items, splits, {"head": [2]}) is None  # another head
    assert shortened_epochs(checkpoint, arch, replace(cfg, max_epochs=4), items, splits, head) is None  # not fewer
    save(4, shortened_from=0)  # `--fine-tune-epochs 4` asked for: another run than the recipe's 12 epochs
    assert shortened_epochs(checkpoint, arch, cfg, items, splits, head) is None
    save(4, shortened_from=1000)  # shortened from another count
    assert shortened_epochs(checkpoint, arch, cfg, items, splits, head) is None
    save(4, seed=1)
    assert shortened_epochs(checkpoint, arch, cfg, items, splits, head) is None
    save(4, version=CHECKPOINT_VERSION - 1)
    assert shortened_epochs(checkpoint, arch, cfg, items, splits, head) is None
    checkpoint.write_bytes(b"not a checkpoint")
    assert shortened_epochs(checkpoint, arch, cfg, items, splits, head) is None


@pytest.mark.slow
def test_the_default_fine_tunes_when_the_estimate_fits_the_time_budget(shared, tmp_path):
    data = subset(shared, tmp_path / "data", per_class=110)  # 7 training steps an epoch: enough to estimate

    def default(*extra: str, run: int | None = None) -> dict:
        out = tmp_path / f"run{len(list(tmp_path.glob('run*'))) if run is None else run}"
        args = [*small_train_args(shared, data, tmp_path, out / "model.onnx"), "--json", str(out / "r.json")]
        done = run_cli(*args, "--validation-percentage", "20", *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        return {"stdout": done.stdout, **json.loads((out / "r.json").read_text())}

    quick = ("--fine-tune-epochs", "2", "--fine-tune-low-res", "128", "--fine-tune-full-res-epochs", "1")
    fits = default(*quick)
    assert fits["fine_tune"]["blocks"] == 13 and fits["head_only_why"] == ""
    assert fits["fine_tune"]["epoch_sizes"] == [128, 224]  # progressive resizing: the last epoch full size
    assert fits["fine_tune"]["estimated_from_epoch"] == 1 and fits["fine_tune"]["estimated_s"] > 0
    long = default("--fine-tune-epochs", "1000", "--time-budget", "60")  # after 6 steps: far over the budget
    epochs = long["fine_tune"]["max_epochs"]  # so it fine-tuned as many epochs as fit instead
    assert MIN_EPOCHS <= epochs < 1000 and long["head_only_why"] == "" and long["fine_tune"]["epochs_run"] <= epochs
    # the shortened run checks its own first steps too, and may shorten again where the host slowed meanwhile
    first = re.search(r"Fine-tuning (\d+) epochs at 224 px instead: fine-tuning 1000 epochs would", long["stdout"])
    assert first and epochs <= int(first[1]), long["stdout"]
    again = default("--fine-tune-epochs", "1000", "--time-budget", "60", run=1)  # the same command: its checkpoint
    assert f"Fine-tuning {epochs} epochs, as an earlier run of these settings chose" in again["stdout"]
    assert again["fine_tune"]["max_epochs"] == epochs and again["fine_tune"]["resumed"]
    assert again["fine_tune"]["epochs_trained"] == 0 < long["fine_tune"]["epochs_trained"]
    assert "Fine-tune: finished after epoch" in again["stdout"] and "Fine-tune epoch" not in again["stdout"]
    assert again["test_accuracy"] == long["test_accuracy"]
    few = default(*quick, "--validation-percentage", "3")  # the last --validation-percentage wins
    assert few["fine_tune"] is None and "validation images, too few" in few["head_only_why"]
    plain = default("--head-only")
    assert plain["fine_tune"] is None and plain["head_only_why"] == "" and "Fine-tune" not in plain["stdout"]
    assert json.loads(Predictor(tmp_path / "run3" / "model.onnx").metadata["training"])["fine_tune_blocks"] == 0
    both = run_cli(*small_train_args(shared, data, tmp_path), "--head-only", "--fine-tune-blocks", "3")
    assert both.returncode == 2 and "contradict" in both.stderr and "Traceback" not in both.stderr


@pytest.mark.slow
def test_the_same_seed_and_data_give_the_same_fine_tuned_model(shared, tmp_path):
    data = subset(shared, tmp_path / "data", per_class=15)
    options = ("--fine-tune-blocks", "13", "--fine-tune-epochs", "2", "--fine-tune-full-res-epochs", "1")
    for name in ("a", "b"):  # two graph names: two checkpoints, so the second run trains again
        done = train(shared, data, tmp_path, *options, "--output-graph", str(tmp_path / f"{name}.onnx"))
        assert done.returncode == 0 and "Fine-tune epoch  2/2" in done.stdout, done.stdout + done.stderr
    a, b = (Predictor(tmp_path / f"{name}.onnx") for name in ("a", "b"))
    images = sorted(data.rglob("*.jpg"))[::4]
    assert a.probabilities(images).tolist() == b.probabilities(images).tolist()


def test_fine_tuning_n_blocks_trains_those_blocks_and_the_head_only(shared):
    """The recipe's default for the wide MobileNets is the top 9 blocks: one step changes them and the head,
    and leaves the layers below them and every BatchNorm layer at their ImageNet values."""
    from flowerx.backbone import build_base, keras
    from flowerx.finetune import _Tuner, cut_layer

    arch = get_architecture("mobilenet_0.25_224")
    base = build_base(arch, shared / "models" / arch.weights_file)
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 0.01, (base.output_shape[-1], 3)).astype(np.float32)
    tuner = _Tuner(base, arch, FineTuneConfig(9, learning_rate=1e-2), kernel, np.zeros(3, np.float32), steps=1)
    images = rng.integers(0, 255, (4, 128, 128, 3), dtype=np.uint8)
    tuner.step(tuner.tf.constant(images), tuner.tf.constant([0, 1, 2, 0], tuner.tf.int64))
    cut = [layer.name for layer in base.layers].index(cut_layer(arch, 9))
    for i, (before, after) in enumerate(zip(base.layers, tuner.net.layers)):
        if not before.get_weights():
            continue
        changed = any(not np.array_equal(a, b) for a, b in zip(before.get_weights(), after.get_weights()))
        frozen = i <= cut or isinstance(before, keras.layers.BatchNormalization)
        assert changed != frozen, (before.name, changed)
    assert cut_layer(arch, 9) == "conv_pw_4_relu"  # blocks 5-13 train
    assert not np.array_equal(tuner.w.numpy(), kernel)
