"""KVStoreConnector off the engine step, against a real vLLM engine (CPU): a request decoding
while another's long prefix loads keeps producing tokens; while every request waits for a load,
vLLM's loop waits with it instead of spinning; a load that fails midway is recomputed
with the same output; no flush anywhere in the engine's path; the connector's counters on vLLM's
own Prometheus registry. Every engine runs in a fresh process (engine_run.py)."""

import os
import random
import shutil

import pytest

# Only `make test-vllm` collects this file: vLLM failing to import is a failure, never a skip.
import vllm  # noqa: F401

from .conftest import HIT, P1, P3, VOCAB

pytestmark = pytest.mark.engine

BT = 64
_r = random.Random(15)


def _ids(n: int) -> list[int]:
    return [_r.randrange(3, VOCAB) for _ in range(n)]


def _drop_page_cache(store_dir: str) -> None:
    """Makes the next read of the store's LMDB file come from the disk (a cold store)."""
    path = os.path.join(store_dir, "disk", "data.mdb")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_decoding_request_keeps_producing_tokens_while_a_long_prefix_loads(
        run_engine, wide_kv_model, tmp_path):
    a, b = _ids(1900), _ids(80)  # A: 29 full blocks of 4 MiB KV each (116 MiB to load)
    store = str(tmp_path / "kv")
    warm = run_engine(model=wide_kv_model, store=store, prefix_caching=False, phases=[[a]],
                      max_tokens=2)
    assert warm["counters"]["vllm_stored_blocks"] == 29
    # B decodes from step 0; A arrives at step 3, its prefix on disk (no RAM tier, page cache
    # dropped) as after a restart.
    schedule = [[0, b, 400], [3, a, 4]]
    ref = run_engine(model=wide_kv_model, store=None, prefix_caching=False,
                     phases=[{"stream": schedule}])
    _drop_page_cache(store)
    res = run_engine(model=wide_kv_model, store=store, host_bytes=0, prefix_caching=False,
                     phases=[{"stream": schedule}])
    (rb, ra), (gb, ga) = ref["phases"][0], res["phases"][0]
    assert ga["cached"] == 29 * BT
    assert (gb["output"], ga["output"]) == (rb["output"], ra["output"])
    load_s = res["counters"]["vllm_load_seconds_sum"]
    # While A waited for its KV (from its arrival to its first token), B kept decoding.
    start, end = ga["added"], ga["times"][0]
    during = [t for t in gb["times"] if start < t < end]
    gaps = [y - x for x, y in zip([start, *during], [*during, end])]
    alone = sorted(y - x for x, y in zip(gb["times"], gb["times"][1:]) if x > end)
    print(f"\nA's load {load_s:.3f} s (connector); A waited {end - start:.3f} s for its first token;"
          f" B produced {len(during)} tokens meanwhile, largest gap {max(gaps):.3f} s (B's median"
          f" gap after A's first token {alone[len(alone) // 2]:.3f} s)")
    # A load inside the step would hold the whole batch: B would get only the one token of the
    # step that loaded A before A's own first token (which comes with B's next).
    assert len(during) >= 2
    assert res["counters"].get("vllm_load_failed_blocks", 0) == 0


def test_while_every_request_waits_for_a_load_the_engine_waits_instead_of_spinning(
        run_engine, tiny_model, warm_store, reference, tmp_path):
    from engine_adapter.vllm_connector import IDLE_WAIT_S

    store = str(tmp_path / "kv")
    shutil.copytree(warm_store, store)
    _drop_page_cache(store)
    res = run_engine(model=tiny_model, store=store, prefix_caching=False, host_bytes=0,
                     phases=[[P1]])
    ((got,),) = res["phases"]
    assert got["output"] == reference["P1"] and got["cached"] == HIT["P1"]
    c = res["counters"]
    # vLLM calls the connector in a loop with no forward while P1 waits for its KV; each call
    # waits until a transfer ends or IDLE_WAIT_S passes. Returning at once makes that loop
    # spin (and hold the GIL the loader threads need): thousands of calls, not a handful.
    spins = c.get("vllm_idle_waits", 0)
    transfers = c["vllm_load_seconds_count"] + c.get("vllm_store_seconds_count", 0)
    assert 1 <= spins <= c["vllm_load_seconds_sum"] / IDLE_WAIT_S + transfers + 2


def _damage_blocks(store_dir: str, tokens: list[int], which: tuple[int, ...]) -> int:
    """Flips payload bytes of the stored records of blocks ``which`` of ``tokens``' chain;
    returns how many it damaged."""
    from kvstore import KVStore, StoreConfig
    from kvstore.keys import block_keys

    with KVStore.open(StoreConfig(path=store_dir), readonly=True) as s:
        (ns,) = [n for n in s.namespaces().values() if "tenant=" not in n]  # the default tenant
        disk = s.tier("disk")
        keys = block_keys(ns, tokens, BT)
        records = [disk.read_record(keys[i]) for i in which]
    data = os.path.join(store_dir, "disk", "data.mdb")
    with open(data, "r+b") as f:
        buf = bytearray(f.read())
        n = 0
        for rec in records:
            if rec is None:
                continue
            pos = buf.find(rec[0])
            assert pos >= 0
            for off in range(300, 340):  # past the header, inside the compressed payload
                buf[pos + off] ^= 0x5A
            n += 1
        f.seek(0)
        f.write(buf)
    return n


def test_load_failing_midway_is_recomputed_with_the_same_output(run_engine, tiny_model, warm_store,
                                                               reference, tmp_path):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(warm_store, damaged)
    assert _damage_blocks(damaged, P1, which=(2,)) == 1  # the third of P1's four blocks
    res = run_engine(model=tiny_model, store=damaged, prefix_caching=False, host_bytes=0,
                     phases=[[P1, P3], [P1]])
    first, (again,) = res["phases"]
    assert [r["output"] for r in first] == [reference["P1"], reference["P3"]]
    assert again["output"] == reference["P1"] and again["cached"] == HIT["P1"]
    c = res["counters"]
    # P1's first two blocks and all of P3 loaded; vLLM recomputed P1's last two (the load
    # stops at the corrupt block), the connector saved the recomputed third block anew, so
    # P1 then loads whole.
    assert c["vllm_load_failed_blocks"] == 2
    assert c["corrupt_records"] == 1
    assert c["vllm_loaded_tokens"] == 2 * BT + HIT["P3"] + HIT["P1"]


def _prom(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a Prometheus text scrape with ``labels`` among theirs."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


def test_counters_reach_vllms_prometheus_and_nothing_flushes(run_engine, tiny_model, reference,
                                                            tmp_path):
    res = run_engine(model=tiny_model, store=str(tmp_path / "kv"), prefix_caching=False,
                     metrics=True, phases=[[P1, P3], [P1, P3]])
    first, second = res["phases"]
    assert [r["output"] for r in first + second] == [reference[n] for n in ("P1", "P3") * 2]
    assert [r["cached"] for r in second] == [HIT["P1"], HIT["P3"]]
    c, text = res["counters"], res["prometheus"]
    # The step handed saves to the connector's thread and the store's write-behind: nobody
    # waited for a commit (the scheduler shares this process's store and its RAM tier).
    assert c.get("flushes", 0) == 0
    assert c["stored_blocks"] >= 6
    loaded = HIT["P1"] + HIT["P3"]
    assert _prom(text, "vllm:kvstore_loaded_tokens_total") == loaded == c["vllm_loaded_tokens"]
    assert _prom(text, "vllm:kvstore_stored_tokens_total") == 6 * BT
    assert _prom(text, "vllm:kvstore_hit_tokens_total", tier="host") == loaded
    assert _prom(text, "vllm:kvstore_loads_total") == 2
    assert _prom(text, "vllm:kvstore_load_seconds_total") > 0
    assert _prom(text, "vllm:kvstore_load_failed_blocks_total") == 0
    print("\n" + "\n".join(line for line in text.splitlines() if line.startswith("vllm:kvstore")))


def test_preempted_requests_load_their_prefix_again_when_readmitted(run_engine, tiny_model,
                                                                   warm_store, tmp_path):
    # 16 vLLM blocks for three requests that each grow to 5 + 4 blocks: vLLM preempts, frees
    # the victims' blocks and re-admits them later, when the connector loads their prefix again.
    prompts, n = [P1, P1[:192] + P3[:100], P3 + P1[:100]], 220
    ref = run_engine(model=tiny_model, store=None, prefix_caching=False, phases=[prompts],
                     max_tokens=n)
    store = str(tmp_path / "kv")
    shutil.copytree(warm_store, store)
    res = run_engine(model=tiny_model, store=store, prefix_caching=False, num_gpu_blocks=16,
                     max_model_len=896, phases=[prompts], max_tokens=n)
    assert [r["output"] for r in res["phases"][0]] == [r["output"] for r in ref["phases"][0]]
    c = res["counters"]
    # Admission: three loads (4, 3 and 2 blocks); every re-admission loads again.
    assert c["vllm_load_seconds_count"] > 3
    assert c.get("vllm_load_failed_blocks", 0) == 0
