"""The connector's worker-side transfers (vllm_transfer.py) with a real store and paged caches
laid out like vLLM's (dim 0 indexes vLLM blocks): saves and loads round trip bit-exact through
the staging buffers, on the CPU and, where a GPU is present, on CUDA (dedicated stream, pinned
staging); a finished request is released only after its saves; a load of blocks the store lacks
reports them failed; an idle step's wait ends when a transfer finishes."""

import threading
import time

import pytest
import torch

# Only `make test-vllm` collects tests/vllm: vLLM failing to import is a failure, never a skip.
import vllm  # noqa: F401

from engine_adapter.vllm_stats import ConnectorCounters
from engine_adapter.vllm_transfer import BlockCopier, LoadJob, SaveJob, Transfers
from kvstore import KVStore, StoreConfig

pytestmark = pytest.mark.engine

BT, VBS = 64, 32  # a store block is two vLLM blocks
LAYERS, VLLM_BLOCKS = 3, 24
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


def caches(device: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(VLLM_BLOCKS, 2, 2, VBS, 16, generator=g).to(device) for _ in range(LAYERS)]


@pytest.fixture
def transfers_for(tmp_path):
    made = []

    def make(kv: list[torch.Tensor], staging_blocks: int = 8, visible=None) -> Transfers:
        store = KVStore.open(StoreConfig(path=tmp_path / "kv", block_tokens=BT, host_bytes=0))
        faults = []
        t = Transfers(store, BlockCopier(kv, BT // VBS), BT, staging_blocks, visible or store.flush,
                      ConnectorCounters(store.metrics, BT), lambda stage, e: faults.append((stage, e)))
        t.faults = faults
        made.append((t, store))
        return t

    yield make
    for t, store in made:
        t.close()
        store.close()


@pytest.mark.parametrize("device", DEVICES)
def test_saved_blocks_load_back_bit_exact_into_other_vllm_blocks(transfers_for, device):
    src = caches(device, 1)
    t = transfers_for(src, staging_blocks=2)  # a 3-block save goes through in two parts
    tokens = list(range(1000, 1000 + 3 * BT + 5))
    if device == "cuda":
        assert t._save_buffer.is_pinned() and all(b.is_pinned() for b in t._buffers)
    t.save([SaveJob("r", tokens[:3 * BT], [5, 9, 2, 7, 11, 4], 0, "ns")])
    assert t.take_finished(set()) == (set(), set())  # nobody finished yet
    assert t.wait_idle(60)
    assert t.take_finished({"r", "other"}) == ({"r"}, set())  # "other" never saved: not held
    assert t.store.metrics.total("vllm_stored_blocks") == 3

    dst = [torch.zeros_like(x) for x in src]
    t.copier = BlockCopier(dst, BT // VBS)  # another engine's cache, the same layout
    # vLLM block 0 is the destination's own hit (first=1): it must stay untouched.
    t.load(LoadJob("q", tokens[:3 * BT], [0, 3, 8, 13, 14, 20], 1, "ns"))
    assert t.wait_idle(60)
    assert t.take_finished(set()) == (set(), {"q"})
    # A load fills at most one staging buffer (2 store blocks here; the scheduler never offers
    # more): the third store block is reported failed, for vLLM to compute.
    assert t.take_errors() == {14, 20}
    for s, d in zip(src, dst):
        assert torch.equal(d[0], torch.zeros_like(d[0]))
        for a, b in zip([9, 2, 7], [3, 8, 13]):
            assert torch.equal(d[b].cpu(), s[a].cpu())
    assert not t.faults


@pytest.mark.parametrize("device", DEVICES)
def test_a_load_of_blocks_the_store_lacks_reports_them_failed(transfers_for, device):
    t = transfers_for(caches(device, 2))
    tokens = list(range(2 * BT))
    t.save([SaveJob("r", tokens[:BT], [1, 2], 0, "ns")])  # only the first block is stored
    assert t.wait_idle(60)
    t.load(LoadJob("q", tokens, [6, 7, 8, 9], 0, "ns"))
    assert t.wait_idle(60)
    assert t.take_finished(set())[1] == {"q"}
    assert t.take_errors() == {8, 9}  # the second store block: vLLM recomputes it
    assert t.store.metrics.total("vllm_load_failed_blocks") == 1


def test_a_finished_request_is_released_only_after_its_saves(transfers_for):
    gate = threading.Event()  # holds the saver thread at the end of its save
    t = transfers_for(caches("cpu", 3), visible=lambda: gate.wait(60))
    t.save([SaveJob("r", list(range(BT)), [1, 2], 0, "ns")])
    # vLLM finished "r" while its blocks are still being copied out: not released yet.
    assert t.take_finished({"r"}) == (set(), set())
    waiter = threading.Thread(target=t.wait_for_requests, args=({"r"},))
    waiter.start()  # what handle_preemptions does before vLLM reuses the blocks
    waiter.join(0.2)
    assert waiter.is_alive()
    gate.set()
    waiter.join(60)
    assert not waiter.is_alive()
    assert t.wait_idle(60)
    assert t.take_finished(set()) == ({"r"}, set())  # released once, in a later step
    assert t.take_finished(set()) == (set(), set())


def test_an_idle_steps_wait_ends_when_a_transfer_finishes(transfers_for):
    gate = threading.Event()  # holds the saver thread at the end of its save
    t = transfers_for(caches("cpu", 4), visible=lambda: gate.wait(60))
    assert t.wait_for_progress(30) is False  # nothing in flight: vLLM's loop goes on at once
    t.save([SaveJob("r", list(range(BT)), [1, 2], 0, "ns")])
    threading.Timer(0.2, gate.set).start()
    t0 = time.monotonic()
    assert t.wait_for_progress(30) is True
    assert time.monotonic() - t0 < 20  # woken by the save's end, not by the timeout
    assert t.wait_idle(0)  # it returned because the save had finished
    # A finished load not reported yet: no wait, the step reports it now.
    t.load(LoadJob("q", list(range(BT)), [6, 7], 0, "ns"))
    assert t.wait_idle(60)
    assert t.wait_for_progress(30) is False
    assert t.take_finished(set())[1] == {"q"}
