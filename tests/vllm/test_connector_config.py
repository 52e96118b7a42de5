"""KVStoreConnector built from real vLLM configs, no engine: block sizes, kv_connector_extra_config
errors, tenant and model separation, and the requests it must bypass (LoRA, multimodal, prompt
embeddings). The engine runs in test_connector.py check the same behaviour end to end where an
engine can show it."""

import pytest
import torch

# Only `make test-vllm` collects tests/vllm: vLLM failing to import is a failure, never a skip.
import vllm  # noqa: F401
from vllm import SamplingParams
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, ParallelConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from engine_adapter.vllm_connector import KVStoreConnector
from kvstore import ConfigError

from .conftest import build_tiny_llama

pytestmark = pytest.mark.engine

BT = 64
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two model directories (the same tiny Llama saved twice: a path is part of its identity)."""
    base = tmp_path_factory.mktemp("models")
    return [str(build_tiny_llama(base / name)) for name in ("a", "b")]


@pytest.fixture
def connect(models):
    """``connect(extra, model=0, block_size=64)``: a scheduler-side connector; shut down after."""
    made = []

    def make(extra, model=0, block_size=BT, tp=1):
        mc = ModelConfig(model=models[model], skip_tokenizer_init=True, dtype="float32",
                         max_model_len=2048)
        vc = VllmConfig(model_config=mc, cache_config=CacheConfig(block_size=block_size),
                        parallel_config=ParallelConfig(tensor_parallel_size=tp),
                        kv_transfer_config=KVTransferConfig(
                            kv_connector="KVStoreConnector",
                            kv_connector_module_path="engine_adapter.vllm_connector",
                            kv_role="kv_both", kv_connector_extra_config=extra))
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=64,
                                 dtype=torch.float32)
        kc = KVCacheConfig(num_blocks=64, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])
        c = KVStoreConnector(vc, KVConnectorRole.SCHEDULER, kc)
        made.append(c)
        return c

    yield make
    for c in made:
        c.shutdown()


def request(rid, tokens=None, **kw):
    return Request(rid, tokens, SamplingParams(max_tokens=4), None, **kw)


TOKENS = list(range(100, 100 + 3 * BT))  # 3 full blocks: 2 usable (one token left to compute)


def store_blocks(c, tokens=TOKENS, n=2, rank=0):
    """Puts ``n`` store blocks of ``tokens`` under ``c``'s namespace of TP ``rank`` (a lookup
    reads only keys)."""
    c.store.put(tokens[:n * BT], [torch.zeros(2, 2, 4)] * n, namespace=c.namespaces[rank])


def test_each_tensor_parallel_rank_has_its_namespace_and_a_hit_needs_all(connect, tmp_path):
    # vLLM's CPU backend can run TP=2, but two worker processes start too slowly on these
    # machines for the test run: the ranks' namespaces are checked here, the loads in the
    # engine tests (TP=1).
    one = connect({"path": str(tmp_path / "kv")})
    two = connect({"path": str(tmp_path / "kv")}, tp=2)
    assert len(set(two.namespaces)) == 2 and not set(two.namespaces) & set(one.namespaces)
    store_blocks(two, rank=0)  # rank 0's shard alone: rank 1 would have to recompute
    assert two.get_num_new_matched_tokens(request("r0", TOKENS), 0) == (0, False)
    store_blocks(two, rank=1)
    assert two.get_num_new_matched_tokens(request("r01", TOKENS), 0) == (2 * BT, True)
    assert one.get_num_new_matched_tokens(request("tp1", TOKENS), 0) == (0, False)


def test_a_hit_is_offered_up_to_the_staging_buffer(connect, tmp_path):
    c = connect({"path": str(tmp_path / "kv"), "staging_blocks": 1})
    store_blocks(c)
    assert c.get_num_new_matched_tokens(request("a", TOKENS), 0) == (BT, True)


def test_block_size_32_is_accepted_and_128_refused_with_the_fix(connect, tmp_path):
    c = connect({"path": str(tmp_path / "kv")}, block_size=32)
    assert c.per_block == 2  # a store block is two vLLM blocks
    with pytest.raises(ConfigError, match=r"vLLM block_size 128 does not divide the store's "
                                          r"block_tokens 64: start vLLM with block_size=64"):
        connect({"path": str(tmp_path / "kv")}, block_size=128)


@pytest.mark.parametrize("extra, message", [
    ({"hostbytes": "1GiB"}, r"kv_connector_extra_config: unknown key\(s\) hostbytes; allowed: .*host_bytes"),
    ({"host_bytes": "lots"}, r"kv_connector_extra_config\.host_bytes: expected a size such as .*got 'lots'"),
    ({"block_tokens": 0}, r"kv_connector_extra_config\.block_tokens: expected an integer in \[1, .*got 0"),
    ({"tenant": 7}, r"kv_connector_extra_config\.tenant: expected a string, got 7"),
    ({"path": None}, r"kv_connector_extra_config: missing required key 'path'"),
    ({"staging_blocks": 0}, r"kv_connector_extra_config\.staging_blocks: expected an integer >= 1 .*got 0"),
])
def test_bad_extra_config_is_an_error_naming_the_key(connect, tmp_path, extra, message):
    extra = {"path": str(tmp_path / "kv"), **extra}
    if extra["path"] is None:
        del extra["path"]
    with pytest.raises(ConfigError, match=message):
        connect(extra)
    assert not (tmp_path / "kv").exists()  # refused before anything was created


def test_tenants_and_models_never_share_blocks(connect, tmp_path):
    path = str(tmp_path / "kv")
    a = connect({"path": path})
    others = [connect({"path": path, "tenant": "b"}), connect({"path": path}, model=1),
              connect({"path": path, "model_id": "another-model"})]
    store_blocks(a)
    assert a.get_num_new_matched_tokens(request("a", TOKENS), 0) == (2 * BT, True)
    for i, c in enumerate(others):
        assert c.store is a.store  # one store, one LMDB environment: only the namespace differs
        assert c.get_num_new_matched_tokens(request(f"o{i}", TOKENS), 0) == (0, False), i
    store_blocks(others[0])  # tenant b's own blocks are its own hit
    assert others[0].get_num_new_matched_tokens(request("b", TOKENS), 0) == (2 * BT, True)


def test_lora_multimodal_and_prompt_embeds_requests_are_bypassed_and_counted(connect, tmp_path):
    c = connect({"path": str(tmp_path / "kv")})
    store_blocks(c)
    image = MultiModalFeatureSpec(data=None, modality="image", identifier="img-0",
                                  mm_position=PlaceholderRange(offset=0, length=BT))
    bypassed = {
        "lora": request("lora", TOKENS, lora_request=LoRARequest("adapter", 1, str(tmp_path))),
        "multimodal": request("mm", TOKENS, mm_features=[image]),
        "prompt_embeds": request("emb", TOKENS, prompt_embeds=torch.zeros(len(TOKENS), 128)),
    }
    for reason, req in bypassed.items():
        for _ in range(2):  # the scheduler asks again while a request waits: counted once
            assert c.get_num_new_matched_tokens(req, 0) == (0, False), reason
        assert c.metrics.value("vllm_bypassed_requests", reason=reason) == 1
    # The same tokens in a plain request hit: the bypass, not a miss, kept the others out.
    assert c.get_num_new_matched_tokens(request("plain", TOKENS), 0) == (2 * BT, True)
    assert c.metrics.total("vllm_bypassed_requests") == 3
