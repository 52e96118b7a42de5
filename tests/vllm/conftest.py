"""Fixtures for tests against a real vLLM engine (only in .venv-vllm: `make test-vllm`).

Each engine runs in a fresh subprocess (engine_run.py), as a restarted server would. The model is
a tiny random Llama built here, with weights large enough that its greedy output depends on the
whole context (a default-initialised tiny model just repeats the last token, which would let
wrong KV pass unnoticed). Prompts are token ids, so no tokenizer is needed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
VOCAB = 2048


def build_tiny_llama(path: Path) -> Path:
    """2 layers, 4 query heads over 2 KV heads of 64 dims, vocab 2048, seeded weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
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
