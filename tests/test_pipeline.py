"""Device tier, write-behind, prefetch, threads and processes."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from kvstore import KVStore, StoreConfig

from .conftest import BLOCK_TOKENS as B, block_nbytes, make_block


def blocks_for(n, seed=0):
    return [make_block(seed * 1000 + i) for i in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b))


def test_device_tier_is_looked_up_first_and_spills_down(open_store):
    s = open_store(device="cpu", device_bytes=2 * block_nbytes(), host_bytes=4 * block_nbytes())
    toks = list(range(3 * B))
    s.put(toks, blocks_for(3))
    s.flush()
    m = s.match(toks)
    assert m.blocks_by_tier == {"device": 2, "host": 1}  # the device tier holds 2 blocks
    assert same(s.get(m), blocks_for(3))
    st = s.stats()["tiers"]
    assert st["device"]["entries"] == 2 and st["host"]["entries"] == 3 and st["disk"]["entries"] == 3


def test_put_does_not_wait_for_disk_and_flush_makes_it_visible(open_store, tmp_path, clock):
    clock.now = time.time()
    s = open_store(host_bytes=0)
    toks = list(range(4 * B))
    assert s.put(toks, blocks_for(4)) == 4
    s.flush()
    out = subprocess.run([sys.executable, "-c", _READER, str(tmp_path / "store"), str(4 * B)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4"]


def test_full_write_queue_drops_and_counts(open_store):
    s = open_store(host_bytes=0, write_queue_bytes=2 * block_nbytes(), io_threads=1)
    # Hold the disk lock so the writer cannot drain the queue while we put.
    with s.tier("disk")._lock:
        stored = s.put(list(range(6 * B)), blocks_for(6))
        assert stored == 2
    s.flush()
    assert s.stats()["dropped_writes"] == {"reason=queue_full,tier=disk": 4}
    assert s.match(list(range(6 * B))).num_blocks == 2


def test_put_copies_the_blocks_unless_handed_over_with_copy_false(open_store):
    s = open_store(host_bytes=0, write_queue_bytes=8 * block_nbytes(), io_threads=1)
    toks = list(range(3 * B))
    given, want = blocks_for(3), blocks_for(3)
    # The same values in non-contiguous memory: staged as a copy even with copy=False.
    strided = torch.empty(tuple(reversed(given[2].shape)), dtype=given[2].dtype)
    strided = strided.permute(*reversed(range(given[2].dim())))
    strided.copy_(given[2])
    with s.tier("disk")._lock:  # the writer cannot store anything yet
        assert s.put(toks[:B], given[:1]) == 1
        given[0].zero_()  # the caller reuses its buffer at once: the staged copy is unharmed
        assert s.put(toks, [given[1], strided], start_block=1, copy=False) == 2
    assert s.flush()
    assert same(s.get(s.match(toks)), want)
    # What went through the staging slots: the copied blocks, never the one handed over.
    staging = s._writers[s.tiers.index(s.tier("disk"))]._staging
    staged = [sum(torch.equal(slot.view(torch.int16), w.view(torch.int16)) for slot in staging)
              for w in want]
    assert staged == [1, 0, 1]


def test_the_disk_is_written_from_the_host_tiers_slots_without_a_second_copy(open_store, clock):
    # put copies a block into the host tier; the write queue writes it from that slot (leased
    # until written) instead of copying it again into its staging. A block the host tier has
    # no room for (its two slots are leased) is staged as before.
    s = open_store(host_bytes=2 * block_nbytes(), write_queue_bytes=8 * block_nbytes(), io_threads=1)
    a, b = blocks_for(2), [make_block(100 + i) for i in range(2)]
    ta, tb = list(range(2 * B)), list(range(10_000, 10_000 + 2 * B))
    with s.tier("disk")._lock:  # the writer cannot store anything yet
        assert s.put(ta, a) == 2
        assert s.put(tb, b) == 2
        assert s.tier("host").usage().entries == 2  # a's blocks: b's found no slot
    assert s.flush()
    staging = s._writers[s.tiers.index(s.tier("disk"))]._staging
    staged = [sum(torch.equal(slot.view(torch.int16), w.view(torch.int16)) for slot in staging)
              for w in a + b]
    assert staged == [0, 0, 1, 1], "the host tier's blocks were copied into the staging too"
    keys = s.match(ta).keys + s.match(tb).keys
    outs = [torch.empty_like(x) for x in a + b]
    assert s.tier("disk").get_many(keys, outs, clock()) == [True] * 4
    assert same(outs, a + b)
    assert s.put(tb, b) == 2 and s.tier("host").usage().entries == 2  # the leases were released


def test_blocks_handed_over_still_count_against_the_write_queue(open_store):
    s = open_store(host_bytes=0, write_queue_bytes=2 * block_nbytes(), io_threads=1)
    with s.tier("disk")._lock:
        assert s.put(list(range(5 * B)), blocks_for(5), copy=False) == 2
    s.flush()
    assert s.stats()["dropped_writes"] == {"reason=queue_full,tier=disk": 3}


def test_prefetch_moves_disk_blocks_to_ram_and_get_then_reads_ram(open_store):
    s = open_store()
    toks = list(range(6 * B))
    s.put(toks, blocks_for(6))
    s.close()
    s = open_store()
    m = s.match(toks)
    assert m.blocks_by_tier == {"disk": 6}
    h = s.prefetch(m)
    assert h.wait(timeout=60) and h.blocks == 6
    assert s.match(toks).blocks_by_tier == {"host": 6}
    promoted = s.metrics.value("promoted_blocks", tier="host")
    assert promoted == 6  # by the prefetch
    assert same(s.get(m), blocks_for(6))  # the stale match still loads, now from RAM
    assert s.metrics.value("promoted_blocks", tier="host") == promoted  # nothing came from disk


def test_get_loads_many_disk_blocks_in_parallel_bit_exact(open_store):
    s = open_store(host_bytes=0, io_threads=2)
    toks = list(range(40 * B))
    s.put(toks, blocks_for(40))
    s.flush()
    assert same(s.get(s.match(toks)), blocks_for(40))


def test_eight_threads_against_the_reference(open_store):
    """Every thread puts, matches and gets its own and shared prompts; whatever is served is
    exactly what was put for that prefix, and with budgets that hold everything, every block
    put is found at the end."""
    s = open_store(host_bytes=40 * block_nbytes(), disk_bytes=1 << 22)
    shared = list(range(4 * B))
    errors = []

    def prompt(t, i):
        return shared[:2 * B] + [10_000 * (t + 1) + 100 * i + j for j in range(2 * B)]

    def data(t, i, b):
        return make_block(7 if b < 2 else 100_000 + 100 * t + 10 * i + b)

    def worker(t):
        try:
            for i in range(6):
                p = prompt(t, i)
                s.put(p, [data(t, i, b) for b in range(4)])
                got = s.get(s.match(p))
                for b, blk in enumerate(got):
                    assert torch.equal(blk.view(torch.int16), data(t, i, b).view(torch.int16))
                if i % 2:
                    s.prefetch(s.match(prompt(t, i - 1))).wait(30)
                if i == 3 and t % 4 == 0:
                    s.flush()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    s.flush()
    for t in range(8):
        for i in range(6):
            assert s.match(prompt(t, i)).num_blocks == 4
    st = s.stats()["tiers"]
    assert st["disk"]["entries"] == 2 + 8 * 6 * 2 and st["disk"]["bytes"] <= st["disk"]["budget"]


_READER = """
import sys
from kvstore import KVStore, StoreConfig
with KVStore.open(StoreConfig(path=sys.argv[1], block_tokens=8, host_bytes=0)) as s:
    print(s.match(list(range(int(sys.argv[2])))).num_blocks)
"""

_WORKER = """
import sys, torch
from kvstore import KVStore, StoreConfig
from tests.conftest import make_block
me, other, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
mine = [me * 1000 + j for j in range(3 * 8)]
theirs = [other * 1000 + j for j in range(3 * 8)]
with KVStore.open(StoreConfig(path=path, block_tokens=8, host_bytes="1MiB")) as s:
    s.put(mine, [make_block(me * 10 + b) for b in range(3)])
    s.flush()
    print("ready", flush=True)
    sys.stdin.readline()  # wait until both have flushed
    got = s.get(s.match(theirs))
    ok = len(got) == 3 and all(torch.equal(g, make_block(other * 10 + b)) for b, g in enumerate(got))
    print("saw" if ok else f"missed {len(got)}", flush=True)
"""


def test_two_worker_processes_share_one_disk_tier(tmp_path):
    path = str(tmp_path / "shared")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(a), str(b), path], cwd=root,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for a, b in ((1, 2), (2, 1))]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    outs = [p.communicate("go\n", timeout=120)[0].strip() for p in procs]
    assert outs == ["saw", "saw"]


def _child_uses_inherited_store(store, toks, q):
    try:
        m = store.match(toks)
        got = store.get(m)
        with store.tier("disk").env.reading():  # a read transaction of the child's own environment
            readers = store.tier("disk").env.readers()
        q.put(("read", m.num_blocks, same(got, blocks_for(3)), f" {os.getpid()} " in readers))
        store.put(toks + list(range(900, 900 + B)), [make_block(77)], start_block=3)
        assert store.flush(60)
        m = store.match(toks + list(range(900, 900 + B)))
        q.put(("wrote", m.num_blocks, same(store.get(m)[3:], [make_block(77)])))
    except BaseException as e:  # reported to the parent
        q.put(("error", repr(e)))


def test_a_forked_child_reopens_lmdb_and_restarts_threads(open_store):
    # Fork while the parent's write-behind thread is inside an LMDB write transaction: the fork
    # waits for that transaction (none may come along: the child could not close it), then the
    # child reads and writes through its own environment (its reader slots carry its pid, not
    # the parent's) and its own threads.
    s = open_store(host_bytes=0)
    toks = list(range(3 * B))
    s.put(toks, blocks_for(3))
    s.flush()
    inside, release = threading.Event(), threading.Event()
    put_txn = s.tier("disk")._put_txn

    def slow_put_txn(*a, **kw):
        out = put_txn(*a, **kw)
        inside.set()
        assert release.wait(120)
        return out
    s.tier("disk")._put_txn = slow_put_txn
    s.put(list(range(500, 500 + B)), [make_block(50)])
    assert inside.wait(60)  # the writer is mid-transaction, holding the tier's lock
    threading.Timer(0.5, release.set).start()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_uses_inherited_store, args=(s, toks, q))
    p.start()
    assert release.is_set()  # the fork waited for the transaction
    assert q.get(timeout=60) == ("read", 3, True, True)
    assert q.get(timeout=60) == ("wrote", 4, True)
    p.join(60)
    assert p.exitcode == 0
    s.tier("disk")._put_txn = put_txn
    assert s.flush(60)
    assert s.match(toks + list(range(900, 900 + B))).num_blocks == 4  # the child's write
    assert same(s.get(s.match(toks)), blocks_for(3))  # and the parent still works
    assert s.match(list(range(500, 500 + B))).num_blocks == 1


_HOLDER = """
import sys, time
from kvstore import KVStore, StoreConfig
s = KVStore.open(StoreConfig(path=sys.argv[1], block_tokens=8, host_bytes=0))
txn = s.tier("disk").env._env.begin()  # a reader slot, held until the process is killed
print("holding", flush=True)
time.sleep(600)
"""


_KEEPER = """
import sys
from kvstore import KVStore, StoreConfig
s = KVStore.open(StoreConfig(path=sys.argv[1], block_tokens=8, host_bytes=0))
print("open", flush=True)
for line in sys.stdin:  # each line: print the reader table's pids
    print(" ".join(l.split()[0] for l in s.tier("disk").env.readers().splitlines()[1:]), flush=True)
"""


def reader_pids(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines()[1:]]


def test_stale_reader_slots_of_a_killed_process_are_cleared(open_store, tmp_path):
    # LMDB resets its reader table by itself when no process has the environment open, so a
    # keeper process holds it open throughout: only reader_check() can clear the dead slot.
    open_store().close()
    path = str(tmp_path / "store")
    keeper = subprocess.Popen([sys.executable, "-c", _KEEPER, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert keeper.stdout.readline().strip() == "open"
        p = subprocess.Popen([sys.executable, "-c", _HOLDER, path], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "holding"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        keeper.stdin.write("readers\n")
        keeper.stdin.flush()
        assert str(p.pid) in keeper.stdout.readline().split()  # the dead process's slot is there
        s = open_store()
        assert str(p.pid) not in reader_pids(s.tier("disk").env.readers())
        keeper.stdin.write("readers\n")
        keeper.stdin.flush()
        assert str(p.pid) not in keeper.stdout.readline().split()
    finally:
        keeper.kill()
        keeper.wait(30)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_tier_pinned_host_and_async_copies(tmp_path):
    cfg = StoreConfig(path=tmp_path / "s", block_tokens=B, device="cuda", device_bytes=4 * block_nbytes(),
                      host_bytes=8 * block_nbytes(), disk_bytes=1 << 22)
    with KVStore.open(cfg) as s:
        assert s.tier("host")._slab.is_pinned() and s.tier("device")._slab.is_cuda
        toks = list(range(6 * B))
        blocks = [b.cuda() for b in blocks_for(6)]
        s.put(toks, blocks)
        s.flush()
        got = s.get(s.match(toks))
        assert all(g.is_cuda for g in got) and same([g.cpu() for g in got], blocks_for(6))
        s.close()
    with KVStore.open(cfg) as s:
        m = s.match(toks)
        assert s.prefetch(m).wait(60)
        torch.cuda.synchronize()
        got = s.get(m)
        assert same([g.cpu() for g in got], blocks_for(6))


_PURGER = """
import sys
from kvstore import KVStore, StoreConfig
with KVStore.open(StoreConfig(path=sys.argv[1], block_tokens=8, host_bytes=0)) as s:
    print(s.purge(namespace="tenant-b"))
"""


def test_a_purge_from_another_process_reaches_this_process_ram(open_store, tmp_path, clock):
    clock.now = time.time()
    s = open_store()
    a, b = list(range(2 * B)), list(range(500, 500 + 2 * B))
    s.put(a, blocks_for(2), namespace="tenant-a")
    s.put(b, blocks_for(2, 1), namespace="tenant-b")
    s.flush()
    assert s.match(b, namespace="tenant-b").blocks_by_tier == {"host": 2}
    out = subprocess.run([sys.executable, "-c", _PURGER, str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr
    time.sleep(1.1)  # RAM tiers poll the disk tier's removal log once a second
    assert s.match(b, namespace="tenant-b").num_blocks == 0
    assert s.match(a, namespace="tenant-a").blocks_by_tier == {"host": 2}


def test_a_chain_can_be_extended_while_its_parent_is_still_queued(open_store):
    s = open_store(host_bytes=0, io_threads=1)
    toks = list(range(4 * B))
    with s.tier("disk")._lock:  # the writer cannot drain while we extend the chain
        s.put(toks[:2 * B], blocks_for(4)[:2])
        assert s.put(toks, blocks_for(4)[2:], start_block=2) == 2
    s.flush()
    assert same(s.get(s.match(toks)), blocks_for(4))


def test_counters_outlive_the_process_and_add_up_across_processes(open_store):
    s = open_store()
    toks = list(range(2 * B))
    s.match(toks)
    s.put(toks, blocks_for(2))
    s.match(toks)
    s.close()
    s2 = open_store()
    s2.match(toks + [1])
    s2.flush()
    c = s2.lifetime_counters()
    assert c["requests|"] == 3
    assert c["miss_tokens|"] == 2 * B + 1 and c["hit_tokens|tier=host"] == 2 * B
    assert c["hit_tokens|tier=disk"] == 2 * B  # the second process's hit came from disk
