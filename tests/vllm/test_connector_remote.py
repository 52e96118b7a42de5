"""KVStoreConnector with the remote tier: engine B, on a store directory of its own (empty disk
and RAM), loads the prefixes engine A stored, from a real Valkey, with the same outputs."""

import pytest

import vllm  # noqa: F401  (only make test-vllm collects this file)
from tools.valkey_server import ValkeyServer

from .conftest import HIT, P1, P2, P3

pytestmark = pytest.mark.engine


def test_a_second_engine_loads_from_valkey_with_the_same_output(run_engine, tiny_model, reference, tmp_path):
    with ValkeyServer() as server:
        a = run_engine(model=tiny_model, store=str(tmp_path / "a"), remote_url=server.url,
                       prefix_caching=False, phases=[[P1, P3]])
        assert [r["cached"] for r in a["phases"][0]] == [0, 0]
        b = run_engine(model=tiny_model, store=str(tmp_path / "b"), remote_url=server.url,
                       prefix_caching=False, phases=[[P1, P2]])
    got = b["phases"][0]
    assert [r["cached"] for r in got] == [HIT["P1"], HIT["P2"]]
    assert [r["output"] for r in got] == [reference["P1"], reference["P2"]]
    c = b["counters"]
    assert c["remote_hits"] >= HIT["P1"] // 64 and c["vllm_loaded_tokens"] == HIT["P1"] + HIT["P2"]
