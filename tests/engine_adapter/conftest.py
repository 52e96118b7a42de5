"""Models for adapter tests: the real SmolLM2-135M (converted once into the user's model cache)
and a tiny random Llama sharing its tokenizer, built locally for fast checks."""

import pytest

from engine_adapter import hf_model


@pytest.fixture(scope="session")
def smollm2():
    return hf_model.load_default_model()


@pytest.fixture(scope="session")
def tiny(smollm2, tmp_path_factory):
    path = hf_model.build_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer=smollm2[1])
    return hf_model.load_model(path)
