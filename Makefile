# Two commands do everything on a fresh machine (see README):
#   make demo   create .venv, install flowerx with its extras, train on the flower photos, classify a daisy
#   make test   create .venv, install flowerx with its extras and the conformance suite's Node clients (where
#               npm is), lint (ruff), run the test suite; then the OpenVINO provider's tests in .venv-openvino
# make bench regenerates benchmarks/results/ and benchmarks/README.md (several minutes; keep the machine quiet).
# make accuracy regenerates benchmarks/results/accuracy.json, the README's accuracy table, int8_accuracy.json
#               (flowerx's int8 against LiteRT's) and frozen_features.json (benchmarks/README.md; about 1h40).
PYTHON ?= python3
VENV ?= .venv
SHARED ?= ../shared
ARCH ?= mobilenet_1.0_224
BIN = $(VENV)/bin
MODEL = runs/$(ARCH)/model.onnx
RESULTS = benchmarks/results

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# The conformance suite's Node clients (onnxruntime-node, sharp, onnxruntime-web), pinned by the lock file.
# npm runs no install scripts here (onnxruntime-node's would fetch CUDA files). Without npm the suite skips them.
CLIENTS = benchmarks/clients
$(CLIENTS)/node_modules/.installed: $(CLIENTS)/package.json $(CLIENTS)/package-lock.json
	@if command -v npm >/dev/null; then \
		cd $(CLIENTS) && ONNXRUNTIME_NODE_INSTALL=skip npm ci --ignore-scripts --no-audit --no-fund --loglevel=error \
		&& touch node_modules/.installed; \
	else echo "npm not found: the conformance suite will skip its Node and browser clients"; fi

clients: $(CLIENTS)/node_modules/.installed

demo: $(BIN)/.installed
	$(BIN)/flowerx train --image-dir $(SHARED)/flower_photos --model-dir $(SHARED)/models \
		--architecture $(ARCH) --output-graph $(MODEL) \
		--bottleneck-dir .flowerx/bottlenecks --summaries-dir .flowerx/summaries
	$(BIN)/flowerx classify $(SHARED)/flower_photos/daisy/21652746_cc379e0eea_m.jpg --graph $(MODEL)

test: $(BIN)/.installed clients
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	FLOWERX_SHARED=$${FLOWERX_SHARED:-$(abspath $(SHARED))} $(BIN)/python -m pytest -q
	@if [ "$$(uname -sm)" = "Linux x86_64" ]; then $(MAKE) test-openvino; \
	else echo "onnxruntime-openvino has no wheel for $$(uname -sm): its tests are skipped (tests/test_openvino.py)"; fi

# onnxruntime-openvino replaces onnxruntime, so its provider is tested in a venv of its own: a serving install
# (no TensorFlow) with onnxruntime-openvino in place of onnxruntime, flowerx editable (this checkout's code).
# Built from scratch each time pyproject.toml changes: the two packages share files, and reinstalling flowerx's
# onnxruntime over onnxruntime-openvino (then removing it) would leave neither.
OV_VENV = .venv-openvino
$(OV_VENV)/.installed: pyproject.toml
	rm -rf $(OV_VENV)
	$(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install --quiet onnxruntime-openvino numpy pillow rich onnx pytest
	$(OV_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

test-openvino: $(OV_VENV)/.installed
	FLOWERX_EXPECT_OPENVINO=1 $(OV_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_openvino.py

bench: $(BIN)/.installed
	test -f runs/mobilenet_1.0_224/model.onnx || $(MAKE) demo ARCH=mobilenet_1.0_224
	test -f runs/mobilenet_1.0_224/model.int8.onnx || $(BIN)/flowerx export-int8 \
		--graph runs/mobilenet_1.0_224/model.onnx --image-dir $(SHARED)/flower_photos
	$(BIN)/flowerx bench --model-dir $(SHARED)/models \
		--graph runs/mobilenet_1.0_224/model.onnx runs/mobilenet_1.0_224/model.int8.onnx \
		--architectures mobilenet_1.0_224 mobilenet_0.75_224 mobilenet_0.50_224 mobilenet_0.25_224 \
		--image-dir $(SHARED)/flower_photos --rounds 3 --json $(RESULTS)/inference_default.json \
		--csv $(RESULTS)/inference_default.csv --plot $(RESULTS)/inference_default.png
	$(BIN)/flowerx bench --full --model-dir $(SHARED)/models --json $(RESULTS)/inference_full.json \
		--csv $(RESULTS)/inference_full.csv --plot $(RESULTS)/inference_full.png
	$(BIN)/python -m benchmarks.train_speed --shared $(SHARED) --json $(RESULTS)/train_speed.json
	$(BIN)/python -m benchmarks.report

accuracy: $(BIN)/.installed
	$(BIN)/python -m benchmarks.accuracy --shared $(SHARED) --json $(RESULTS)/accuracy.json
	$(BIN)/python -m benchmarks.int8_accuracy --shared $(SHARED) --json $(RESULTS)/int8_accuracy.json
	$(BIN)/python -m benchmarks.frozen_features --shared $(SHARED) --json $(RESULTS)/frozen_features.json
	$(BIN)/python -m benchmarks.report

conformance: $(BIN)/.installed clients
	test -f runs/mobilenet_1.0_224/model.onnx || $(MAKE) demo ARCH=mobilenet_1.0_224
	$(BIN)/python -m benchmarks.conformance --graph runs/mobilenet_1.0_224/model.onnx \
		--image-dir $(SHARED)/flower_photos --json $(RESULTS)/conformance.json --screenshot $(RESULTS)/web_export.png

# flowerx serve against the in-process Predictor: throughput, latency, soak (about 10 minutes; keep the machine quiet).
serve-bench: $(BIN)/.installed
	test -f runs/mobilenet_1.0_224/model.onnx || $(MAKE) demo ARCH=mobilenet_1.0_224
	test -f runs/mobilenet_0.25_224/model.onnx || $(MAKE) demo ARCH=mobilenet_0.25_224
	$(BIN)/python -m benchmarks.serve --graph runs/mobilenet_1.0_224/model.onnx --image-dir $(SHARED)/flower_photos \
		--soak-graph runs/mobilenet_0.25_224/model.onnx --json $(RESULTS)/serve.json

# Ray against the same work without it: the bottleneck pass, batch classification, a two-node cluster with a
# node killed (about 10 minutes; keep the machine quiet).
scale-bench: $(BIN)/.installed
	test -f runs/mobilenet_0.25_224/model.onnx || $(MAKE) demo ARCH=mobilenet_0.25_224
	$(BIN)/python -m benchmarks.scale --shared $(SHARED) --classify-graph runs/mobilenet_0.25_224/model.onnx \
		--json $(RESULTS)/scale.json

.PHONY: install clients demo test test-openvino bench accuracy conformance serve-bench scale-bench
