"""`flowerx serve` (issue 13): a real server process on a free localhost port, real HTTP clients, no mocks.

The models are tiny contract-2 models built here (the label is the dominant colour), so each server starts in
about a second; throughput and latency targets live in benchmarks/serve.py."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import solid, write_tiny_v2_model
from corpus import _png_header_only, _truncated
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
ARTIFACTS = Path(os.environ.get("FLOWERX_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m flowerx serve ...` in its own process, ready when /readyz says so."""

    def __init__(self, tmp: Path, *graphs: str, args: tuple[str, ...] = ()):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        command = [sys.executable, "-m", "flowerx", "serve", "--graph", *graphs, "--port", str(self.port), *args]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited {self.process.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server never became ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def _png(colour, size=(30, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


GREEN, RED = _png((10, 200, 10)), _png((200, 10, 10), (64, 48))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve-models")
    return {
        "tiny": write_tiny_v2_model(tmp / "tiny.onnx"),
        "other": write_tiny_v2_model(tmp / "other.onnx", ("rouge", "vert", "bleu")),
    }


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("serve"), str(models["tiny"]), f"other={models['other']}",
                     args=("--max-wait-ms", "50", "--request-timeout", "1"))  # fmt: skip
    yield running
    assert running.stop() == 0


def test_classify_a_raw_body_and_multipart_files(server):
    answer = httpx.post(server.url + "/v1/models/tiny:classify?top_k=2", content=GREEN,
                        headers={"Content-Type": "image/png"}).json()  # fmt: skip
    assert answer["model"] == "tiny" and answer["time_ms"] > 0
    (ranked,) = answer["predictions"]
    assert [p["label"] for p in ranked][:1] == ["green"] and len(ranked) == 2
    files = [("a", ("green.png", GREEN, "image/png")), ("b", ("red.png", RED, "image/png"))]
    answer = httpx.post(server.url + "/v1/models/other:classify", files=files).json()
    assert [r[0]["label"] for r in answer["predictions"]] == ["vert", "rouge"] and len(answer["predictions"][0]) == 3
    # /classify is for a server of one model; this one has two
    assert httpx.post(server.url + "/classify", content=GREEN, headers={"Content-Type": "image/png"}).status_code == 404


def test_concurrent_requests_are_batched(server):
    def one(_):
        return httpx.post(server.url + "/v1/models/tiny:classify", content=RED, headers={"Content-Type": "image/png"})

    before = _metric(server, 'flowerx_batch_size_count{model="tiny"}')
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(64)))
    assert all(a.status_code == 200 and a.json()["predictions"][0][0]["label"] == "red" for a in answers)
    batches = _metric(server, 'flowerx_batch_size_count{model="tiny"}') - before
    assert batches < 64, "no request shared a batch"  # 64 images in fewer onnxruntime calls


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_open_inference_protocol_with_a_real_client(server):
    http = pytest.importorskip("tritonclient.http")
    client = http.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}
    assert meta["outputs"][0]["shape"] == [-1, 3]
    images = np.stack([np.full((20, 30, 3), c, np.uint8) for c in ((200, 0, 0), (0, 0, 200))])
    for binary in (True, False):  # the binary tensor extension, and plain JSON data
        tensor = http.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=binary)
        probs = client.infer("tiny", [tensor]).as_numpy("probs")
        assert probs.shape == (2, 3) and probs.argmax(1).tolist() == [0, 2]
    bad = httpx.post(server.url + "/v2/models/tiny/infer", json={"inputs": [{"name": "image", "shape": [1, 2, 2, 3],
                     "datatype": "UINT8", "data": [1, 2]}]})  # fmt: skip
    assert bad.status_code == 400 and "12 values" in bad.json()["error"]


def test_health_readiness_metrics_and_contracts(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server.url + "/readyz").json() == {"ready": True, "models": {"tiny": "ready", "other": "ready"}}
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert models["other"]["labels"] == ["rouge", "vert", "bleu"] and models["tiny"]["contract"] == 2
    text = httpx.get(server.url + "/metrics").text
    for name in ("flowerx_requests_total", "flowerx_request_seconds_bucket", "flowerx_batch_size_bucket",
                 "flowerx_queue_depth", "flowerx_images_total", "flowerx_model_load_seconds"):  # fmt: skip
        assert name in text, name
    assert 'route="/v1/models/{name}:classify"' in text  # routes, not raw paths, as labels
    assert httpx.get(server.url + "/").text.count("<script>") == 1  # the page: no external assets


def _raw(server, data: bytes, then: bytes = b"", pause: float = 0.0) -> str:
    """Send bytes over a plain socket (what no HTTP library would send); the status line of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(data)
        if pause:
            time.sleep(pause)
        try:
            s.sendall(then)
        except OSError:
            pass
        return s.recv(4096).decode("latin-1").split("\r\n")[0]


def test_every_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, tmp_path):
    bomb, truncated = tmp_path / "bomb.png", tmp_path / "truncated.jpg"
    _png_header_only(bomb, 20000, 20000)
    solid(truncated, (1, 2, 3), (300, 200))
    _truncated(truncated)
    url = server.url + "/v1/models/tiny:classify"
    png = {"Content-Type": "image/png"}
    cases = [
        (httpx.post(url, content=b"x" * (21 << 20), headers=png), 413, "over the limit"),
        (httpx.post(url, content=b"hello", headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
        (httpx.post(url, content=b"hello", headers=png), 415, "unsupported image format"),
        (httpx.post(url, content=truncated.read_bytes(), headers={"Content-Type": "image/jpeg"}), 422, "decode"),
        (httpx.post(url, content=bomb.read_bytes(), headers=png), 422, "too large"),
        (httpx.post(url, content=b"", headers=png), 400, "empty body"),
        (httpx.post(server.url + "/v1/models/nope:classify", content=GREEN, headers=png), 404, "no model named"),
        (httpx.post(url + "?top_k=0", content=GREEN, headers=png), 400, "top_k"),
        (httpx.post(url, content=b"--xyz\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a.png\"\r\n\r\n"
                    + GREEN[:50], headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 400, "multipart"),
        (httpx.get(server.url + "/nowhere"), 404, "not found"),
    ]  # fmt: skip
    for response, status, reason in cases:
        assert response.status_code == status, (status, response.text)
        assert reason.lower() in response.json()["error"].lower() and "Traceback" not in response.text
    head = b"POST /v1/models/tiny:classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    # a slow client (1 s --request-timeout here), and a 1 GB body that is cut off
    assert " 408 " in _raw(server, head + b"Content-Length: 1000\r\n\r\n" + GREEN[:10], pause=0.1) + " "
    assert " 413 " in _raw(server, head + b"Content-Length: 1073741824\r\n\r\n", b"\0" * 65536) + " "
    good = httpx.post(url, content=GREEN, headers=png)
    assert good.status_code == 200 and good.json()["predictions"][0][0]["label"] == "green"
    assert "Traceback" not in server.log() and "\\x89PNG" not in server.log()  # no image data in the logs


def test_a_full_queue_answers_503_with_retry_after(models, tmp_path):
    running = Server(tmp_path, str(models["tiny"]), args=("--max-queue", "2", "--max-requests", "1"))
    try:
        files = [(f"f{i}", (f"{i}.png", GREEN, "image/png")) for i in range(3)]
        full = httpx.post(running.url + "/classify", files=files)
        assert full.status_code == 503 and full.headers["Retry-After"] == "1" and "queued" in full.json()["error"]
        assert httpx.post(running.url + "/classify", files=files[:2]).status_code == 200
        # and past --max-requests (here 1) at once, before a body is read: a stalled upload holds the one place
        with socket.create_connection(("127.0.0.1", running.port)) as stalled:
            stalled.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 99\r\n\r\n"
            )
            time.sleep(0.3)
            busy = httpx.post(running.url + "/classify", content=GREEN, headers={"Content-Type": "image/png"})
            assert busy.status_code == 503 and "requests in progress" in busy.json()["error"]
    finally:
        assert running.stop() == 0


def test_sigterm_finishes_the_request_in_flight_and_exits_0(models, tmp_path):
    running = Server(tmp_path, str(models["tiny"]))
    answer = {}

    head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(GREEN)}\r\n\r\n"

    def slow_upload():  # its body arrives in two parts, SIGTERM in between
        answer["status"] = _raw(running, head.encode() + GREEN[:40], GREEN[40:], 1.0)

    thread = threading.Thread(target=slow_upload)
    thread.start()
    time.sleep(0.4)
    running.process.send_signal(signal.SIGTERM)
    thread.join(10)
    assert answer["status"].startswith("HTTP/1.1 200"), (answer, running.log())
    assert running.process.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):  # and it no longer accepts
        httpx.get(running.url + "/healthz", timeout=2)


def _replace(path: Path, data: bytes) -> None:
    """Write over path atomically, as flowerx writes models."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_hot_reload_swaps_a_good_file_and_keeps_serving_through_a_broken_one(models, tmp_path):
    served = tmp_path / "live.onnx"
    served.write_bytes(models["tiny"].read_bytes())
    running = Server(tmp_path, f"live={served}", args=("--watch",))
    try:
        labels = lambda: httpx.get(running.url + "/v1/models").json()["models"][0]["labels"]  # noqa: E731
        assert labels() == ["red", "green", "blue"]
        _replace(served, models["other"].read_bytes())
        _wait(lambda: labels() == ["rouge", "vert", "bleu"], running)
        _replace(served, b"not a model at all")
        _wait(lambda: "reload of live failed" in running.log(), running)
        answer = httpx.post(running.url + "/classify", content=GREEN, headers={"Content-Type": "image/png"})
        assert answer.json()["predictions"][0][0]["label"] == "vert"  # the last good model still serves
        _replace(served, models["tiny"].read_bytes())  # SIGHUP reloads too (here --watch may beat it to it)
        running.process.send_signal(signal.SIGHUP)
        _wait(lambda: labels() == ["red", "green", "blue"], running)
        assert (
            'flowerx_model_reloads_total{model="live",result="failed"} 1.0' in httpx.get(running.url + "/metrics").text
        )
    finally:
        assert running.stop() == 0


def _wait(condition, running, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.2)


def test_log_lines_are_json_with_log_format_json(models, tmp_path):
    running = Server(tmp_path, str(models["tiny"]), args=("--log-format", "json"))
    try:
        httpx.post(running.url + "/classify", content=GREEN, headers={"Content-Type": "image/png"})
    finally:
        running.stop()
    lines = [json.loads(line) for line in running.log().splitlines() if line.startswith("{")]
    request = [line for line in lines if line.get("route") == "/classify"]
    assert request and request[0]["status"] == 200 and request[0]["images"] == 1 and request[0]["model"] == "tiny"


def test_the_page_classifies_an_uploaded_photo_in_a_browser(server, tmp_path):
    from benchmarks.conformance import CHROMIUM

    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("FLOWERX_CONFORMANCE_REQUIRED"):
            pytest.fail(f"no Chromium at {CHROMIUM}")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium chromium-driver)")
    photo = tmp_path / "green.png"
    photo.write_bytes(_png((10, 200, 10), (300, 200)))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 760, "height": 760})
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length == 2")
            page.select_option("#model", "tiny")
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.querySelectorAll('#results li').length > 0")
            assert page.inner_text("#results li .label") == "green"
            assert "ms on the server" in page.inner_text("#status")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)
        finally:
            browser.close()
