"""DiskTier opened read-only, as a tool looking at a store an engine writes; processes sharing
one disk tier's map."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore.codec import Codec
from kvstore.errors import StoreOpenError
from kvstore.eviction import EntryMeta
from kvstore.tiers.base import BlockEntry
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.disk.arena import RecordArena

from ..conftest import BLOCK_TOKENS as B, make_block


def test_a_read_only_tier_reads_what_a_store_wrote_and_writes_nothing(open_store, tmp_path):
    s = open_store(host_bytes=0)
    s.put(list(range(2 * B)), [make_block(1), make_block(2)])
    s.flush()
    s.close()
    files = {f.name: f.stat().st_size for f in (tmp_path / "store" / "disk").iterdir()}
    t = DiskTier(tmp_path / "store" / "disk", 1 << 30, 3600.0, Codec(), readonly=True)
    try:
        assert t.usage().entries == 2
        assert sorted(m.depth for _, m in t.entries()) == [0, 1]
        with pytest.raises(PermissionError, match="read-only"):
            t.put_many([], 0.0)
    finally:
        t.close()
    assert {f.name: f.stat().st_size for f in (tmp_path / "store" / "disk").iterdir()} == files


def test_a_read_only_tier_refuses_a_directory_without_a_store(tmp_path):
    with pytest.raises(StoreOpenError, match="cannot open the disk tier"):
        DiskTier(tmp_path, 1 << 30, 3600.0, Codec(), readonly=True)


BIG = (2, 2, 2, B, 1024)  # 128 KiB of float16 a block: 16 of them outgrow a new store's 1 MiB map
_PEER = """
import sys, torch
from kvstore import KVStore, StoreConfig
from tests.conftest import make_block
s = KVStore.open(StoreConfig(path=sys.argv[1], block_tokens=8, host_bytes=0))
env = s.tier("disk").env
for line in sys.stdin:  # "put|get FIRST_TOKEN BLOCKS SEED": answers "ok MAP_SIZE" or what failed
    op, first, n, seed = line.split()
    first, n, seed = int(first), int(n), int(seed)
    toks = list(range(first, first + 8 * n))
    blocks = [make_block(seed + i, shape=(2, 2, 2, 8, 1024), dtype=torch.float16) for i in range(n)]
    if op == "put":
        ok = s.put(toks, blocks) == n and s.flush(60)
    else:
        got = s.get(s.match(toks))
        ok = len(got) == n and all(torch.equal(g, b) for g, b in zip(got, blocks))
    print(f"ok {env.info()['map_size']}" if ok else f"{op} failed", flush=True)
s.close()
"""


class Peer:
    """Another process using the same store, one command at a time."""

    def __init__(self, path):
        root = Path(__file__).resolve().parents[2]
        self.p = subprocess.Popen([sys.executable, "-c", _PEER, str(path)], cwd=root,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, op: str, first: int, n: int, seed: int) -> int:
        """Runs the command; returns the peer's map size after it."""
        self.p.stdin.write(f"{op} {first} {n} {seed}\n")
        self.p.stdin.flush()
        answer = self.p.stdout.readline().split()
        # A peer killed by SIGBUS (a write into its map past the end of a cut file) answers nothing.
        assert answer[:1] == ["ok"], f"{op}: {answer or f'peer died, exit {self.p.wait(60)}'}"
        return int(answer[1])

    def close(self) -> None:
        self.p.stdin.close()
        assert self.p.wait(60) == 0


def big_blocks(n: int, seed: int) -> list[torch.Tensor]:
    return [make_block(seed + i, shape=BIG, dtype=torch.float16) for i in range(n)]


def chain(blocks: list[torch.Tensor], base: int = 0) -> list[BlockEntry]:
    """``blocks`` as one chain of entries, keys ``bytes([base + i]) * 16``, last used at 1.0."""
    return [BlockEntry(bytes([base + i]) * 16, b, EntryMeta(1, i, bytes([base + i - 1]) * 16 if i else b"",
                                                             0.0, 1.0, b.nbytes))
            for i, b in enumerate(blocks)]


def test_no_process_shrinks_the_data_file_under_another_processs_map(open_store, tmp_path, clock):
    # With writemap LMDB truncates the data file to the map size a process opens or remaps with.
    # This process keeps a map older (smaller) than the file another process grew: when it
    # reads and writes (adopting the growth) and when a third process opens the store, the file
    # must stay at least as large as the grower's map, which then writes on into its upper part
    # (into a cut file that would be SIGBUS) and everyone reads every block back.
    clock.now = time.time()  # the other processes run on the real clock
    s = open_store(host_bytes=0, compression="none", disk_bytes="16MiB")
    data = tmp_path / "store" / "disk" / "data.mdb"
    env = s.tier("disk").env
    s.put(list(range(2 * B)), big_blocks(2, 0))
    assert s.flush(60)
    older = env.info()["map_size"]
    peer = Peer(tmp_path / "store")
    try:
        grown = peer("put", 10_000, 16, 100)
        assert grown > older and data.stat().st_size >= grown
        toks = list(range(10_000, 10_000 + 16 * B))
        got = s.get(s.match(toks))  # a read with the older map: it adopts the growth
        assert len(got) == 16 and all(torch.equal(g, b) for g, b in zip(got, big_blocks(16, 100)))
        assert data.stat().st_size >= grown
        assert s.put(list(range(20_000, 20_000 + 2 * B)), big_blocks(2, 200)) == 2
        assert s.flush(60) and data.stat().st_size >= grown
        out = subprocess.run([sys.executable, "-c", _PEER, str(tmp_path / "store")],
                             input="get 0 2 0\nget 10000 16 100\n", capture_output=True,
                             text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
        assert out.stdout.split()[::2] == ["ok", "ok"], out.stderr  # a new process opened it
        assert data.stat().st_size >= grown
        assert peer("put", 30_000, 16, 300) >= grown  # pages past what the others had used
        assert peer("get", 20_000, 2, 200) and peer("get", 0, 2, 0)
        peer.close()
    finally:
        peer.p.kill()
    got = s.get(s.match(list(range(30_000, 30_000 + 16 * B))))
    assert len(got) == 16 and all(torch.equal(g, b) for g, b in zip(got, big_blocks(16, 300)))


def test_a_batch_that_overflows_the_map_grows_it_first_and_is_written_once(tmp_path):
    # A fresh environment maps 1 MiB. A batch of several MiB used to fill the map, abort, grow
    # it and run its whole transaction again (every doubling of a growing store paid one
    # thrown-away transaction of up to 64 blocks); put_many asks for the room up front.
    tier = DiskTier(tmp_path, 256 << 20, 3600.0, Codec("none"))
    runs = []
    write = tier.env.write
    tier.env.write = lambda fn, **kw: write(lambda txn: (runs.append(1), fn(txn))[1], **kw)
    blocks = big_blocks(24, 7)  # 3 MiB of records, none compressed
    size = tier.env.info()["map_size"]
    assert sum(b.nbytes for b in blocks) > size
    entries = chain(blocks)
    assert tier.put_many(entries, 1.0) == [True] * 24
    assert tier.env.info()["map_size"] > size
    assert len(runs) == 1, f"the batch's transaction ran {len(runs)} times"
    outs = [torch.empty_like(b) for b in blocks]
    assert tier.get_many([e.key for e in entries], outs) == [True] * 24
    assert all(torch.equal(o, b) for o, b in zip(outs, blocks))
    tier.close()


def test_a_writers_batches_are_encoded_into_one_reused_buffer(tmp_path):
    # Fresh memory for every record cost the kernel a zeroed page each 4 KiB (on these VMs also
    # a host fault): a thread's batches reuse one buffer, so its second batch's records sit
    # where its first batch's did, and what was stored is what was encoded.
    tier = DiskTier(tmp_path, 256 << 20, 3600.0, Codec())
    first, second = big_blocks(4, 20), big_blocks(4, 40)
    assert tier.put_many(chain(first), 1.0) == [True] * 4
    arena = tier._arena._local.buf
    assert tier.put_many(chain(second, 100), 1.0) == [True] * 4
    assert tier._arena._local.buf is arena, "the second batch got a new buffer"
    with tier.env.reading() as txn:
        stored = bytes(txn.get(bytes([100]) * 16, db=tier._schema.records))
    assert bytes(arena[:len(stored)]) == stored, "the second batch's first record is not in the buffer"
    outs = [torch.empty_like(b) for b in second]
    assert tier.get_many([e.key for e in chain(second, 100)], outs) == [True] * 4
    assert all(torch.equal(o, b) for o, b in zip(outs, second))
    tier.close()


def test_a_record_larger_than_the_arena_is_stored_from_its_own_memory(tmp_path):
    tier = DiskTier(tmp_path, 256 << 20, 3600.0, Codec("none"))
    tier._arena = RecordArena(nbytes=big_blocks(1, 0)[0].nbytes + 1000)  # room for one record
    blocks = big_blocks(3, 60)
    es = chain(blocks)
    assert tier.put_many(es, 1.0) == [True] * 3
    outs = [torch.empty_like(b) for b in blocks]
    assert tier.get_many([e.key for e in es], outs) == [True] * 3
    assert all(torch.equal(o, b) for o, b in zip(outs, blocks))
    tier.close()


def test_the_record_arena_is_per_thread_aligned_and_reused_after_each_batch():
    addr = lambda view: np.frombuffer(view, dtype=np.uint8).ctypes.data  # noqa: E731
    arena = RecordArena(nbytes=1 << 16)
    arena.batch()
    a, b = arena.take(100), arena.take(10)
    assert len(a) == 100 and len(b) == 10
    assert addr(b) - addr(a) == 128, "the second record does not start at the next 64-byte line"
    other = []
    t = threading.Thread(target=lambda: (arena.batch(), other.append(addr(arena.take(100)))))
    t.start()
    t.join()
    assert abs(other[0] - addr(a)) >= 1 << 16, "two threads share one buffer"
    assert isinstance(arena.take(1 << 16), bytearray)  # no room left: fresh memory
    arena.batch()
    assert addr(arena.take(100)) == addr(a)  # the next batch starts over


class SyncCount:
    """Forwards to the real LMDB environment, counting the syncs asked of it (a commit's own
    sync happens inside LMDB and is not counted)."""

    def __init__(self, env):
        self.env, self.n = env, 0

    def sync(self, force: bool = False):
        self.n += 1
        return self.env.sync(force)

    def __getattr__(self, name):
        return getattr(self.env, name)


def test_a_sync_goes_to_the_disk_only_for_commits_no_later_commit_carried(tmp_path):
    # With writemap and metasync off, a commit's msync covers the whole map: it carries every
    # earlier commit's meta page to the disk. flush's sync after such a commit was a second
    # whole-file flush for nothing (a third of a small request's write cost on a full store).
    tier = DiskTier(tmp_path, 256 << 20, 3600.0, Codec("none"))
    spy = tier.env._env = SyncCount(tier.env._env)
    counters = tier.env.dbs[b"counters"]
    assert tier.put_many(chain(big_blocks(2, 0)), 1.0) == [True] * 2
    tier.env.write(lambda txn: None)  # writes nothing: LMDB commits it without a sync
    tier.env.sync()
    assert spy.n == 1, "the blocks' commit was never synced"
    tier.env.sync()
    assert spy.n == 1, "a second sync with no commit between went to the disk"
    assert tier.put_many(chain(big_blocks(2, 10), 10), 1.0) == [True] * 2
    tier.env.write(lambda txn: txn.put(b"n", b"1", db=counters), durable=False)
    tier.env.sync()
    assert spy.n == 1, "the blocks' commit was synced again after a later commit carried it"
    tier.env.write(lambda txn: txn.put(b"n", b"2", db=counters), durable=False)
    tier.close()  # close leaves nothing of this process's off the disk
    assert spy.n == 2, "close did not sync the newest commit"


def test_a_stores_flush_lands_its_blocks_with_the_counters_commit_and_no_sync_of_its_own(open_store):
    s = open_store(host_bytes=0)
    env = s.tier("disk").env
    spy = env._env = SyncCount(env._env)
    blocks = [make_block(i) for i in range(4)]
    assert s.put(np.arange(4 * B), torch.stack(blocks)) == 4
    assert s.flush(60)
    assert spy.n == 0, "flush synced after the counters' commit had carried the blocks"
    assert s.ledger.counters()["stored_blocks|tier=disk"] == 4.0
    got = s.get(s.match(np.arange(4 * B)))
    assert len(got) == 4 and all(torch.equal(g, b) for g, b in zip(got, blocks))


def random_access_maps(path: Path) -> list[bool]:
    """For each of this process's mappings of ``path``: whether it is advised MADV_RANDOM
    (``rr`` among its ``VmFlags`` in /proc/self/smaps)."""
    out, name = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if head and "-" in head[0] and ":" not in head[0]:
                name = head[5].strip() if len(head) == 6 else None
            elif head and head[0] == "VmFlags:" and name == str(path.resolve()):
                out.append("rr" in line.split())
    return out


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps (Linux)")
def test_small_blocks_map_the_file_for_random_access_through_growth_and_large_blocks_do_not(open_store, tmp_path):
    # A fault read around into large folios (on kernels with large folios for ext4 and xfs),
    # and a commit's sync wrote each dirtied folio back whole: 28 pages a 64-byte block stored
    # on a full store. Small blocks' records live inside LMDB's leaf pages: random pages.
    store = open_store("small", block_shape=(32,), dtype="bfloat16", host_bytes=0)
    data = store.tier("disk").path / "data.mdb"
    assert random_access_maps(data) == [True], "a store of 64-byte blocks maps its file with readahead"
    (tmp_path / "tier").mkdir()
    tier = DiskTier(tmp_path / "tier", 256 << 20, 3600.0, Codec())
    tier.configure((32,), torch.bfloat16)
    size = tier.env.info()["map_size"]
    entries = [BlockEntry(i.to_bytes(16, "big"), make_block(i, shape=(32,)), EntryMeta(1, 0, b"", 0.0, 1.0, 64))
               for i in range(20_000)]
    assert all(tier.put_many(entries, 1.0))
    assert tier.env.info()["map_size"] > size
    assert random_access_maps(tier.path / "data.mdb") == [True], "the grown map lost its advice"
    tier.close()
    large = open_store("large", host_bytes=0, disk_bytes=64 << 20)
    large.put(np.arange(B), big_blocks(1, 0)[0][None])
    assert random_access_maps(large.tier("disk").path / "data.mdb") == [False], \
        "a store of large blocks gave up its readahead"
