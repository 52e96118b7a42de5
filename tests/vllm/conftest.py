"""Fixtures for tests against a real vLLM engine (only in .venv-vllm: `make test-vllm`).

Each engine runs in a fresh subprocess (engine_run.py), as a restarted server would. The model is
a tiny random Llama built here, with weights large enough that its greedy output depends on the
whole context (a default-initialised tiny model just repeats the last token, which would let
wrong KV pass unnoticed). Prompts are token ids, so no tokenizer is needed.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
VOCAB = 2048


def build_tiny_llama(path: Path, layers: int = 2, kv_heads: int = 2) -> Path:
    """``layers`` layers, 2 query heads per KV head (``kv_heads`` of 64 dims), vocab 2048,
    seeded weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2 * kv_heads, num_key_value_heads=kv_heads, head_dim=64,
        max_position_embeddings=4096,
        initializer_range=0.15, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        dtype=torch.float32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def wide_kv_model(tmp_path_factory) -> str:
    """The tiny Llama with 16 layers of 8 KV heads: 4 MiB of float32 KV per 64-token block, so a
    long prefix takes a while to load while its compute per token stays small."""
    return str(build_tiny_llama(tmp_path_factory.mktemp("wide-kv-llama"), layers=16, kv_heads=8))


@pytest.fixture(scope="session")
def run_engine(tmp_path_factory):
    """``run_engine(model=..., store=..., phases=[[ids, ...], ...], **spec) -> dict`` in a new
    process; see engine_run.py for the spec and the result."""
    work = tmp_path_factory.mktemp("engine-runs")
    count = [0]

    def run(**spec) -> dict:
        count[0] += 1
        spec_file, out_file = work / f"spec{count[0]}.json", work / f"out{count[0]}.json"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(spec_file),
                               str(out_file)], env=env, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"engine run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-6000:]}")
        result = json.loads(out_file.read_text())
        result["log"] = proc.stdout + proc.stderr
        return result

    return run


# -- prompts shared by the engine tests, and what an engine without the connector answers --
_r = random.Random(7)


def _ids(n: int) -> list[int]:
    return [_r.randrange(3, VOCAB) for _ in range(n)]


DOC = _ids(300)
P1 = DOC                                   # stored by engine A: 4 full blocks usable
P2 = DOC[:200] + _ids(60)                  # partial prefix: 200 common tokens -> 3 blocks
P3 = _ids(130)                             # stored by engine A: 2 blocks usable (129 // 64)
P4 = _ids(40)                              # shorter than one block: never hits
P5 = [9] * 50 + DOC[50:]                   # same tail as P1, different head: a miss
Q = DOC[:100] + _ids(30)                   # shares P1's first block only
PROMPTS = {"P1": P1, "P2": P2, "P3": P3, "P4": P4, "P5": P5, "Q": Q}
HIT = {"P1": 256, "P2": 192, "P3": 128, "P4": 0, "P5": 0, "Q": 64}


@pytest.fixture(scope="session")
def reference(run_engine, tiny_model) -> dict[str, list[int]]:
    """Greedy outputs of an engine without the connector."""
    names = list(PROMPTS)
    res = run_engine(model=tiny_model, store=None, prefix_caching=False,
                     phases=[[PROMPTS[n] for n in names]])
    outs = {n: r["output"] for n, r in zip(names, res["phases"][0])}
    # The model's output must depend on more than the last tokens, or equal outputs prove
    # nothing about the loaded KV: P5 differs from P1 only in its first 50 tokens.
    assert outs["P5"] != outs["P1"]
    return outs


@pytest.fixture(scope="session")
def warm_store(run_engine, tiny_model, tmp_path_factory, reference):
    """Engine A fills a fresh store with P1 and P3."""
    store = str(tmp_path_factory.mktemp("store") / "kv")
    res = run_engine(model=tiny_model, store=store, phases=[[P1, P3]])
    assert [r["output"] for r in res["phases"][0]] == [reference["P1"], reference["P3"]]
    assert [r["cached"] for r in res["phases"][0]] == [0, 0]
    # Every full prompt block, each stored once: P1 has 4, P3 has 2.
    assert res["counters"]["vllm_stored_blocks"] == 6
    assert res["counters"].get("vllm_loaded_tokens", 0) == 0
    return store
