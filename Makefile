# `make test` sets up a fresh machine and runs the tests; `make demo` runs the main job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install test test-fast

# CPU torch first: a bare `torch` requirement with no torch installed pulls several GB of CUDA packages.
# DeepSpeed is built against that torch (no isolated build env, no CUDA ops).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation "deepspeed>=0.17"
	$(BIN)/python -m pip install --quiet -e ".[dev,deepspeed]"
	touch $@

install: $(VENV)/.installed

# Every test but the full demo, multi-process ones included
test: install
	$(BIN)/python -m pytest -m "not demo"

# The default pytest selection: single-process tests only
test-fast: install
	$(BIN)/python -m pytest
