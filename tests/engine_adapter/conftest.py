"""Models for adapter tests: the real SmolLM2-135M (converted once into the user's model cache)
and a tiny random Llama sharing its tokenizer, built here for fast checks."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine_adapter import model_files


def build_tiny_llama(dirpath: Path, tokenizer, seed: int = 0) -> Path:
    """Saves a tiny randomly initialised Llama plus ``tokenizer`` (the SmolLM2 one) to ``dirpath``.

    The model has 2 layers, hidden size 64, 4 query heads sharing 2 KV heads (grouped-query
    attention) and an explicit ``head_dim`` of 32 (so ``hidden_size // num_attention_heads``
    would be wrong), with the SmolLM2 vocabulary so it shares that tokenizer and chat template.
    Weights depend only on ``seed``; the global torch RNG state is left untouched. The result
    loads with ``model_files.load_model(dirpath)``.
    """
    out = Path(dirpath)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        initializer_range=0.15,  # large enough that the output depends on the whole context
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2():
    return model_files.load_default_model()


@pytest.fixture(scope="session")
def tiny(smollm2, tmp_path_factory):
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer=smollm2[1])
    return model_files.load_model(path)
