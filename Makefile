# Two commands do everything on a fresh machine (see README):
#   make demo   create .venv, install flowerx with its training extras, train on the flower photos, classify a daisy
#   make test   create .venv, install flowerx with its dev extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
SHARED ?= ../shared
ARCH ?= mobilenet_1.0_224
BIN = $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/flowerx train --image-dir $(SHARED)/flower_photos --model-dir $(SHARED)/models \
		--architecture $(ARCH) --output-graph runs/$(ARCH)/model.onnx \
		--bottleneck-dir .flowerx/bottlenecks --summaries-dir .flowerx/summaries
	$(BIN)/flowerx classify $(SHARED)/flower_photos/daisy/21652746_cc379e0eea_m.jpg --graph runs/$(ARCH)/model.onnx

test: $(BIN)/.installed
	FLOWERX_SHARED=$${FLOWERX_SHARED:-$(abspath $(SHARED))} $(BIN)/python -m pytest -q

.PHONY: install demo test
