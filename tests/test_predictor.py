import os
import threading
import time

import numpy as np
import pytest
from conftest import solid, write_tiny_model, write_tiny_v2_model
from PIL import Image

from flowerx import FlowerxError, ImageError, Predictor


@pytest.fixture
def model(tmp_path):
    return write_tiny_model(tmp_path / "tiny.onnx")


def test_reads_contract_from_metadata(model):
    p = Predictor(model, providers="cpu")
    assert p.labels == ["red", "green", "blue"] and p.input_size == 8
    assert p.provider == "CPUExecutionProvider"


def test_given_labels_rename_but_a_given_size_must_match_the_metadata(model, tmp_path):
    """Labels may be renamed (same count); a size other than the one the model was trained at would run and
    answer wrongly (a contract-2 model takes any size), so it is refused, not silently used."""
    assert (
        Predictor(model, labels=["rouge", "vert", "bleu"]).predict(solid(tmp_path / "r.png", (250, 0, 0)))[0][0]
        == "rouge"
    )
    assert Predictor(model, input_size=8).input_size == 8
    with pytest.raises(FlowerxError, match=r"tiny.onnx was trained at 8 x 8 pixels \(its metadata\), not 16"):
        Predictor(model, input_size=16)
    with pytest.raises(FlowerxError, match="trained at 8 x 8 pixels"):  # any size in: it would have run
        Predictor(write_tiny_v2_model(tmp_path / "v2.onnx"), input_size=16)
    with pytest.raises(FlowerxError, match="3 outputs but 2 labels"):
        Predictor(model, labels=["a", "b"])


def test_predict_every_source_kind(model, tmp_path):
    p = Predictor(model)
    path = solid(tmp_path / "g.png", (10, 200, 10))
    for source in (path, str(path), path.read_bytes(), Image.open(path), np.asarray(Image.open(path))):
        ranked = p.predict(source)
        assert [label for label, _ in ranked][0] == "green" and len(ranked) == 3
        assert abs(sum(score for _, score in ranked) - 1) < 1e-5
    assert len(p.predict(path, top_k=1)) == 1


def test_batch_equals_single(model, tmp_path):
    p = Predictor(model)
    images = [solid(tmp_path / f"{i}.png", c) for i, c in enumerate([(200, 0, 0), (0, 0, 200), (0, 200, 0)])]
    assert p.predict_batch(images) == [p.predict(i) for i in images]
    assert [r[0][0] for r in p.predict_batch(images, top_k=1)] == ["red", "blue", "green"]


def test_shared_by_threads(model, tmp_path):
    p = Predictor(model)
    colours = [(200, 0, 0), (0, 0, 200), (0, 200, 0), (90, 80, 10)]
    images = [solid(tmp_path / f"{i}.png", c) for i, c in enumerate(colours)]
    serial = [p.predict(i) for i in images]
    results, errors = {}, []

    def work(t):
        try:
            for n in range(50):
                results[(t, n)] = p.predict(images[(t + n) % 4]) == serial[(t + n) % 4]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 400 and all(results.values())


def test_bad_models(tmp_path):
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(FlowerxError, match="not a valid ONNX model"):
        Predictor(tmp_path / "text.onnx")
    with pytest.raises(FlowerxError, match="no such model file"):
        Predictor(tmp_path / "missing.onnx")
    bare = write_tiny_model(tmp_path / "bare.onnx", metadata={})
    with pytest.raises(FlowerxError, match="no flowerx metadata"):
        Predictor(bare)
    assert (
        Predictor(bare, labels=["r", "g", "b"], input_size=8).predict(solid(tmp_path / "r.png", (255, 0, 0)))[0][0]
        == "r"
    )
    wrong = write_tiny_model(tmp_path / "wrong.onnx", metadata={"labels": '["a", "b"]', "input_size": "8"})
    with pytest.raises(FlowerxError, match="3 outputs but 2 labels"):
        Predictor(wrong)
    nchw = write_tiny_model(tmp_path / "nchw.onnx", input_shape=["N", 8, 16, 3])
    with pytest.raises(FlowerxError, match=r"input must be one \[N, 8, 8, 3\]"):
        Predictor(nchw)
    with pytest.raises(FlowerxError, match="providers"):
        Predictor(write_tiny_model(tmp_path / "ok.onnx"), providers="tpu")


def test_ready_batches_are_checked_and_single_arrays_are_one_image(model, tmp_path):
    p = Predictor(model)
    image = np.zeros((20, 30, 3), np.uint8)
    image[..., 2] = 250
    assert p.probabilities(image).shape == (1, 3) and p.predict(image)[0][0] == "blue"
    with pytest.raises(FlowerxError, match=r"uint8 \[N, 8, 8, 3\]"):
        p.probabilities(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(FlowerxError, match=r"uint8 \[N, 8, 8, 3\]"):
        p.probabilities(np.zeros((2, 9, 9, 3), np.uint8))
    nearest = write_tiny_model(
        tmp_path / "nearest.onnx", metadata={"labels": '["r", "g", "b"]', "input_size": "8", "resize": "nearest"}
    )
    with pytest.raises(FlowerxError, match="resize rule 'nearest'"):
        Predictor(nearest)


def test_bad_image_raises_documented_type(model, tmp_path):
    (tmp_path / "x.jpg").write_text("text")
    with pytest.raises(ImageError) as info:
        Predictor(model).predict(tmp_path / "x.jpg")
    assert isinstance(info.value, ValueError)


def test_cuda_without_a_gpu_is_a_clear_error_and_auto_falls_back(model, monkeypatch):
    """CI has no GPU: "cuda" must say what is missing, "auto" must run on the CPU. (On a GPU machine,
    benchmarks/cuda_check.py is the check; results in benchmarks/results/cuda.json.)"""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(FlowerxError, match="onnxruntime-gpu in place of onnxruntime, and a GPU"):
        Predictor(model, providers="cuda")
    assert Predictor(model, providers="auto").provider == "CPUExecutionProvider"


def _contract_2(tmp_path, meta_labels=None, version="2"):
    """A contract-2 model, its metadata edited (labels, contract version)."""
    import json

    onnx = pytest.importorskip("onnx")
    model = onnx.load(write_tiny_v2_model(tmp_path / "v2.onnx"))
    for entry in model.metadata_props:
        if entry.key == "labels" and meta_labels is not None:
            entry.value = json.dumps(meta_labels)
        if entry.key == "flowerx_contract":
            entry.value = version
    onnx.save(model, tmp_path / "v2.onnx")
    return tmp_path / "v2.onnx"


def test_contract_2_takes_any_size_and_version_1_still_loads(model, tmp_path):
    v2 = Predictor(_contract_2(tmp_path))
    assert v2.contract.version == 2 and v2.any_size and v2.labels == ["red", "green", "blue"]
    photo = solid(tmp_path / "g.png", (10, 200, 10), size=(300, 120))
    assert v2.predict(photo)[0].label == "green"
    big = np.full((2, 120, 300, 3), (200, 10, 10), np.uint8)  # a ready batch at its own size: resized inside
    assert v2.probabilities(big).argmax(1).tolist() == [0, 0]
    assert np.allclose(v2.probabilities(big), v2.probabilities(big[:, :8, :8]), atol=1e-6)
    v1 = Predictor(model)  # a model written before contract 2: fixed S x S, no labels output
    assert v1.contract.version == 1 and not v1.any_size
    assert np.allclose(v1.probabilities([photo]), v2.probabilities([photo]), atol=1e-6)
    with pytest.raises(FlowerxError, match=r"uint8 \[N, 8, 8, 3\]"):
        v1.probabilities(big)


def test_contract_2_labels_output_must_match_metadata_and_newer_contracts_are_refused(tmp_path):
    with pytest.raises(FlowerxError, match="`labels` output and its labels metadata differ"):
        Predictor(_contract_2(tmp_path, meta_labels=["green", "red", "blue"]))
    renamed = Predictor(_contract_2(tmp_path), labels=["rot", "grün", "blau"])  # labels given by the caller win
    assert renamed.labels == ["rot", "grün", "blau"]
    with pytest.raises(FlowerxError, match="follows flowerx model contract '3'"):
        Predictor(_contract_2(tmp_path, version="3"))


def test_the_optimised_session_is_cached_once_and_follows_the_model(tmp_path, monkeypatch):
    """Issue 14: the first load keeps onnxruntime's optimised graph in the user cache; later loads read it
    (no optimisation redone); a rewritten model gets its own entry; a damaged entry or an unwritable cache
    only costs the optimisation."""
    from flowerx import predictor as predictor_module

    monkeypatch.setenv("FLOWERX_CACHE_DIR", str(tmp_path / "cache"))
    model = write_tiny_model(tmp_path / "tiny.onnx")
    image = solid(tmp_path / "red.png", (200, 10, 10))
    first = Predictor(model, providers="cpu").probabilities([image])
    entry = predictor_module.session_cache_path(model)
    assert [p.name for p in (tmp_path / "cache" / "sessions").iterdir()] == [entry.name]  # no temp file left
    loads = []
    real = predictor_module.ort.InferenceSession
    monkeypatch.setattr(
        predictor_module.ort, "InferenceSession", lambda src, *a, **k: loads.append(src) or real(src, *a, **k)
    )
    assert np.array_equal(Predictor(model, providers="cpu").probabilities([image]), first) and loads == [str(entry)]
    write_tiny_model(tmp_path / "new.onnx", labels=("a", "b", "c")).replace(model)  # rewritten, as flowerx writes
    assert (
        Predictor(model, providers="cpu").labels == ["a", "b", "c"]
        and predictor_module.session_cache_path(model) != entry
    )
    assert len(list((tmp_path / "cache" / "sessions").iterdir())) == 2
    entry = predictor_module.session_cache_path(model)
    entry.write_bytes(b"damaged")
    loads.clear()
    assert Predictor(model, providers="cpu").labels == ["a", "b", "c"] and loads == [
        str(entry),
        str(model),
    ]  # tried, then rebuilt
    assert entry.read_bytes() != b"damaged"
    monkeypatch.setenv("FLOWERX_CACHE_DIR", str(image))  # a file: nothing can be made under it
    assert Predictor(model, providers="cpu").labels == ["a", "b", "c"]


def test_pruning_old_sessions_removes_only_flowerx_entries(tmp_path, monkeypatch):
    """The user cache keeps SESSIONS_KEPT optimised sessions and drops old temps of killed processes; files it did
    not name itself are never touched."""
    from flowerx import predictor as predictor_module

    monkeypatch.setenv("FLOWERX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(predictor_module, "SESSIONS_KEPT", 1)
    sessions = tmp_path / "cache" / "sessions"
    sessions.mkdir(parents=True)
    foreign = {"notes.ort": b"mine", "ABCDEF0123456789ABCDEF0123456789.ort": b"upper case", "x" * 32 + ".ort": b"x"}
    foreign[".notes.1.2.tmp.ort"] = b"not our temp name"
    hour_ago = time.time() - predictor_module.STALE_TEMP_S - 60
    stale, fresh = sessions / f".{'a' * 32}.123.456.tmp.ort", sessions / f".{'b' * 32}.123.456.tmp.ort"
    for path, data in [*((sessions / name, data) for name, data in foreign.items()), (stale, b"t"), (fresh, b"t")]:
        path.write_bytes(data)
        if path != fresh:
            os.utime(path, (hour_ago, hour_ago))
    for name in ("one", "two"):
        Predictor(write_tiny_model(tmp_path / f"{name}.onnx"), providers="cpu")
    ours = [p for p in sessions.iterdir() if p.name not in foreign and p != fresh]
    assert ours == [predictor_module.session_cache_path(tmp_path / "two.onnx")]  # the newest of ours kept
    assert all((sessions / name).read_bytes() == data for name, data in foreign.items())
    assert fresh.exists() and not stale.exists()  # a killed process's old temp goes; one being written stays


def test_pruning_never_follows_links_or_enters_folders_named_like_its_files(tmp_path, monkeypatch):
    """A link or a folder that carries a session's or a temp file's name is not flowerx's: the prune leaves it,
    and what a link points to, alone (FLOWERX_CACHE_DIR may be any folder the user names)."""
    from flowerx import predictor as predictor_module

    monkeypatch.setenv("FLOWERX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(predictor_module, "SESSIONS_KEPT", 1)
    sessions = tmp_path / "cache" / "sessions"
    sessions.mkdir(parents=True)
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's")
    hour_ago = time.time() - predictor_module.STALE_TEMP_S - 60
    os.utime(precious, (hour_ago, hour_ago))
    old_temp_link = sessions / f".{'c' * 32}.1.2.tmp.ort"
    old_temp_link.symlink_to(precious)
    session_link = sessions / f"{'d' * 32}.ort"  # oldest of the sessions: pruned first were it ours
    session_link.symlink_to(precious)
    os.utime(session_link, (0, 0), follow_symlinks=False)
    folder = sessions / f".{'e' * 32}.1.2.tmp.ort"
    folder.mkdir()
    os.utime(folder, (hour_ago, hour_ago))
    for name in ("one", "two"):
        Predictor(write_tiny_model(tmp_path / f"{name}.onnx"), providers="cpu")
    assert old_temp_link.is_symlink() and session_link.is_symlink() and folder.is_dir()
    assert precious.read_text() == "the user's"
    assert not predictor_module.session_cache_path(tmp_path / "one.onnx").exists()  # its own entries still pruned


def test_a_big_batch_runs_a_few_images_at_a_time_on_the_cpu(model):
    from flowerx import predictor

    p = Predictor(model, providers="cpu")
    sizes, session = [], p.session

    class Counting:  # records the batch each onnxruntime run gets
        def run(self, names, feeds):
            sizes.append(len(next(iter(feeds.values()))))
            return session.run(names, feeds)

    batch = np.random.default_rng(0).integers(0, 255, (predictor.CPU_RUN_BATCH * 2 + 3, 8, 8, 3), dtype=np.uint8)
    p.session = Counting()
    together = p.probabilities(batch)
    assert sizes == [predictor.CPU_RUN_BATCH] * 2 + [3]  # memory bounded by 8 images, whatever the batch
    alone = np.concatenate([p.probabilities(batch[i : i + 1]) for i in range(len(batch))])
    assert together.shape == (len(batch), 3) and np.array_equal(together, alone)
