"""`vllm serve` with KVStoreConnector, asked by the real `openai` client: after a restart of the
server, `cached_tokens` is the 64-aligned prefix the prompt shares with what the first server
stored, and the output is what the first server gave (greedy); one scrape of vllm serve's own
/metrics shows the connector's counters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tools.ports import free_port

pytestmark = pytest.mark.engine

BT = 64
START_TIMEOUT_S = 420  # model load and the engine's warm-up on a loaded 2-core machine
DOC = " ".join(f"Entry {i}: the lighthouse keeper logged {i * 7 % 13} ships and {i % 5} storms."
               for i in range(80))


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain checkpoint (converted from the packaged GGUF once)."""
    import torch

    from engine_adapter import model_files
    path = model_files.default_convert_dir(torch.float32)
    if not (path / "config.json").is_file():
        model_files.load_default_model(torch.float32)
    return path


def prom(text: str, name: str) -> float:
    """The sum of a metric's samples over its labels in a Prometheus text scrape."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


class VllmServe:
    """``vllm serve`` (its OpenAI server module) on a free loopback port, in its own session so
    stopping it stops its engine process too."""

    def __init__(self, model: Path, store: Path, log: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        config = {"kv_connector": "KVStoreConnector", "kv_connector_module_path": "engine_adapter.vllm_connector",
                  "kv_role": "kv_both",
                  "kv_connector_extra_config": {"path": str(store), "host_bytes": 0, "disk_bytes": "1GiB"}}
        self.argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                     "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(self.port),
                     "--block-size", str(BT), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
                     "--no-enable-prefix-caching", "--enable-prompt-tokens-details", "--seed", "0",
                     "--kv-transfer-config", json.dumps(config)]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> VllmServe:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(self.argv, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited {self.proc.returncode}:\n{self.log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.__exit__(None, None, None)
        raise AssertionError(f"vllm serve not up in {START_TIMEOUT_S} s:\n{self.log.read_text()[-6000:]}")

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGINT)  # as Ctrl-C would: the engine shuts down
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_vllm_serve_cached_tokens_after_a_restart(tmp_path, smollm2_dir):
    from openai import OpenAI
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    first = [{"role": "system", "content": DOC}, {"role": "user", "content": "How many storms in entry 12?"}]
    second = [first[0], {"role": "user", "content": "Which entry logged the most ships?"}]
    ids = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"])
           for m in (first, second)]
    common = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert common >= 4 * BT  # the document is several blocks long

    def ask(s: VllmServe, messages):
        c = OpenAI(base_url=s.base_url, api_key="x", max_retries=0, timeout=600)
        return c.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)

    log = tmp_path / "vllm-serve.log"
    with VllmServe(smollm2_dir, tmp_path / "kv", log) as s:
        cold = ask(s, first)
    with VllmServe(smollm2_dir, tmp_path / "kv", log) as s:
        again, other = ask(s, first), ask(s, second)
        # One scrape of vllm serve's own endpoint shows the connector's counters.
        loaded = again.usage.prompt_tokens_details.cached_tokens + other.usage.prompt_tokens_details.cached_tokens
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics", timeout=10) as r:
                text = r.read().decode()
            if prom(text, "vllm:kvstore_loaded_tokens_total") >= loaded or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert cold.usage.prompt_tokens == len(ids[0]) and cold.usage.prompt_tokens_details.cached_tokens == 0
    # The same prompt: every full block but the one holding its last token (vLLM computes that).
    assert again.usage.prompt_tokens_details.cached_tokens == (len(ids[0]) - 1) // BT * BT
    assert again.choices[0].message.content == cold.choices[0].message.content
    # Another question on the same document: the aligned common prefix.
    assert other.usage.prompt_tokens_details.cached_tokens == common // BT * BT
    assert prom(text, "vllm:kvstore_loaded_tokens_total") == loaded
    assert prom(text, "vllm:kvstore_loads_total") == 2 and prom(text, "vllm:kvstore_load_failed_blocks_total") == 0
