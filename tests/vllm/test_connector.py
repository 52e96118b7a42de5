"""KVStoreConnector against a real vLLM engine (CPU): reuse across engine restarts, partial
prefixes, interplay with vLLM's own prefix cache, a damaged store, both process modes, vLLM
block_size 32, another tenant, and prompt embeddings (bypassed).

Every engine runs in a fresh process. Expected hits are the 64-aligned common prefix, capped so
that at least one prompt token is computed; outputs must equal an engine without the connector.
"""

import os
import shutil

import pytest

# Only `make test-vllm` collects this file (the default run ignores tests/vllm, see
# tests/conftest.py), so vLLM failing to import is a failure, never a skip.
import vllm  # noqa: E402,F401

from .conftest import HIT, P1, P2, P3, PROMPTS, Q  # noqa: E402

pytestmark = pytest.mark.engine

BT = 64


def test_restarted_engine_loads_prefixes_and_matches_reference(run_engine, tiny_model, warm_store,
                                                               reference):
    # vLLM's own prefix cache off: every cached token must come from the store.
    names = ["P1", "P2", "P3", "P4", "P5"]
    res = run_engine(model=tiny_model, store=warm_store, prefix_caching=False,
                     phases=[[PROMPTS[n] for n in names]])
    got = res["phases"][0]
    assert [r["cached"] for r in got] == [HIT[n] for n in names]
    assert [r["output"] for r in got] == [reference[n] for n in names]
    c = res["counters"]
    assert c["vllm_loaded_tokens"] == sum(HIT[n] for n in names)
    assert c.get("vllm_load_failed_blocks", 0) == 0 and c.get("vllm_faults", 0) == 0
    # New full blocks: P2's 4th (260 tokens, 3 hit) and all 4 of P5 (a different first block).
    assert c["vllm_stored_blocks"] == 1 + 4
    assert c["vllm_load_seconds_count"] >= 1 and c["vllm_store_seconds_count"] >= 1


def test_store_hit_beyond_vllm_prefix_cache(run_engine, tiny_model, warm_store, reference):
    # With vLLM's prefix cache on, Q leaves P1's first block in vLLM's cache; P1 then takes that
    # block locally and only the next three from the store (a load that starts mid-prompt).
    res = run_engine(model=tiny_model, store=warm_store, phases=[[Q], [P1]])
    (q,), (p1,) = res["phases"]
    assert (q["cached"], p1["cached"]) == (HIT["Q"], HIT["P1"])
    assert (q["output"], p1["output"]) == (reference["Q"], reference["P1"])
    assert res["counters"]["vllm_loaded_tokens"] == 64 + (256 - 64)


def _damage(store_dir: str) -> int:
    """Flips bytes inside every stored record's payload; returns how many records were hit."""
    data = os.path.join(store_dir, "disk", "data.mdb")
    with open(data, "r+b") as f:
        buf = bytearray(f.read())
        n, pos = 0, buf.find(b"KVSR")
        while pos >= 0:
            for off in range(300, 340):  # past the header, inside the compressed payload
                buf[pos + off] ^= 0x5A
            n += 1
            pos = buf.find(b"KVSR", pos + 4)
        f.seek(0)
        f.write(buf)
    return n


def test_damaged_store_gives_misses_and_correct_output(run_engine, tiny_model, warm_store,
                                                      reference, tmp_path):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(warm_store, damaged)
    assert _damage(damaged) >= 6
    res = run_engine(model=tiny_model, store=damaged, prefix_caching=False,
                     phases=[[P1, P3], [P1, P3]])
    first, second = res["phases"]
    assert [r["output"] for r in first + second] == [reference[n] for n in ("P1", "P3") * 2]
    c = res["counters"]
    # The scheduler's lookup saw the records; the worker's load failed their checksums and
    # removed them, so vLLM recomputed the requests, looking them up again (now a miss), and
    # the connector saved the recomputed blocks anew: the second phase hits them.
    assert c["vllm_load_failed_blocks"] == 4 + 2
    assert c["corrupt_records"] >= 2  # the first record of each chain fails its checksum
    assert [r["cached"] for r in second] == [HIT["P1"], HIT["P3"]]
    assert c["vllm_loaded_tokens"] == HIT["P1"] + HIT["P3"]


def test_separate_scheduler_process_sees_worker_stores(run_engine, tiny_model, reference, tmp_path):
    # Default vLLM process mode: the scheduler and the worker are different processes, so the
    # second phase can only hit through what the worker flushed to LMDB.
    res = run_engine(model=tiny_model, store=str(tmp_path / "kv"), multiprocessing=True,
                     prefix_caching=False, phases=[[P1, P3], [P1, P2, P3]])
    first, second = res["phases"]
    assert [r["cached"] for r in first] == [0, 0]
    assert [r["cached"] for r in second] == [HIT["P1"], HIT["P2"], HIT["P3"]]
    assert [r["output"] for r in first + second] == [reference[n] for n in ("P1", "P3", "P1", "P2", "P3")]


def test_block_size_32_stores_loads_and_matches_reference(run_engine, tiny_model, reference,
                                                         tmp_path):
    # A store block is two vLLM blocks of 32 tokens: saved together, loaded into two vLLM blocks.
    res = run_engine(model=tiny_model, store=str(tmp_path / "kv"), block_size=32,
                     prefix_caching=False, phases=[[P1, P3], [P1, P2, P3]])
    first, second = res["phases"]
    assert [r["cached"] for r in first] == [0, 0]
    assert [r["cached"] for r in second] == [HIT["P1"], HIT["P2"], HIT["P3"]]
    assert [r["output"] for r in first + second] == [reference[n] for n in ("P1", "P3", "P1", "P2", "P3")]
    c = res["counters"]
    assert c["vllm_loaded_tokens"] == HIT["P1"] + HIT["P2"] + HIT["P3"]
    assert c["vllm_stored_blocks"] == 4 + 2 + 1  # P2's 4th block is new
    assert c.get("vllm_load_failed_blocks", 0) == 0 and c.get("vllm_faults", 0) == 0


E1, E2 = {"embeds_seed": 1, "len": 200}, {"embeds_seed": 2, "len": 200}


def test_another_tenant_shares_nothing_and_prompt_embeds_are_bypassed(run_engine, tiny_model,
                                                                     warm_store, reference):
    # warm_store holds P1 and P3 for the default tenant. Tenant b finds none of it, stores its
    # own copy and hits that next time. Prompt embeddings stand behind placeholder ids that two
    # different embeddings share: they are never looked up nor stored, only counted.
    res = run_engine(model=tiny_model, store=warm_store, tenant="b", prompt_embeds=True,
                     prefix_caching=False, phases=[[P1, P3, E1, E2], [P1, P3, E2]])
    first, second = res["phases"]
    assert [r["cached"] for r in first] == [0, 0, 0, 0]
    assert [r["cached"] for r in second] == [HIT["P1"], HIT["P3"], 0]
    assert [r["output"] for r in first[:2] + second[:2]] == [reference[n] for n in ("P1", "P3") * 2]
    assert first[2]["output"] != first[3]["output"]  # two embeddings, two answers
    assert second[2]["output"] == first[3]["output"]
    c = res["counters"]
    assert c["vllm_stored_blocks"] == 4 + 2  # tenant b's P1 and P3; nothing for the embeddings
    assert c["vllm_loaded_tokens"] == HIT["P1"] + HIT["P3"]
    assert c["vllm_bypassed_requests"] == 3
