"""KVStore behaviour a user relies on, against real LMDB and zstd in temp directories."""

import os
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
import torch

from kvstore import IncompatibleFormatError, KVStore, StoreConfig, StoreOpenError
from kvstore.tiers.disk import entry_cost

from .conftest import BLOCK_TOKENS as B, SHAPE, block_nbytes, make_block


def blocks_for(n, seed=0):
    return [make_block(seed * 1000 + i) for i in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b))


def test_round_trip_and_prefix_rules(open_store):
    s = open_store()
    toks = list(range(5 * B + 3))
    blocks = blocks_for(5)
    assert s.match(toks).num_tokens == 0
    assert s.put(toks, blocks) == 5
    m = s.match(toks)
    assert (m.num_blocks, m.num_tokens, m.prompt_tokens) == (5, 5 * B, 5 * B + 3)
    assert same(s.get(m), blocks)
    assert s.match(toks[:B - 1]).num_tokens == 0  # shorter than a block never hits
    assert s.match(toks[:3 * B + 5]).num_tokens == 3 * B
    other = toks.copy()
    other[2 * B + 1] = 10**6  # diverge inside block 2
    assert s.match(other).num_tokens == 2 * B
    assert s.match(toks, namespace="other").num_tokens == 0
    assert s.put(toks, blocks) == 0  # already present: skipped


def test_put_from_start_block_extends_a_chain(open_store):
    s = open_store()
    toks = list(range(6 * B))
    blocks = blocks_for(6)
    s.put(toks[:2 * B], blocks[:2])
    m = s.match(toks)
    assert m.num_blocks == 2
    assert s.put(toks, blocks[2:], start_block=m.num_blocks) == 4
    assert same(s.get(s.match(toks)), blocks)
    # a block whose parent is not held is not stored (it could never be matched)
    fresh = list(range(100, 100 + 6 * B))
    assert s.put(fresh, blocks[3:], start_block=3) == 0


def test_get_into_preallocated_out(open_store):
    s = open_store()
    toks = list(range(3 * B))
    s.put(toks, blocks_for(3))
    out = torch.empty((4, *SHAPE), dtype=torch.bfloat16)
    got = s.get(s.match(toks), out=out)
    assert all(g.data_ptr() == out[i].data_ptr() for i, g in enumerate(got))
    assert same(got, blocks_for(3))
    with pytest.raises(ValueError, match="out: expected a tensor of shape"):
        s.get(s.match(toks), out=torch.empty((2, *SHAPE), dtype=torch.bfloat16))


def test_survives_reopen_and_promotes_disk_hits(open_store):
    toks = list(range(4 * B))
    s = open_store()
    s.put(toks, blocks_for(4))
    s.close()
    s2 = open_store()
    m = s2.match(toks)
    assert m.blocks_by_tier == {"disk": 4}
    assert same(s2.get(m), blocks_for(4))
    assert s2.match(toks).blocks_by_tier == {"host": 4}


def test_host_eviction_spills_and_disk_keeps_serving(open_store):
    s = open_store(host_bytes=3 * block_nbytes())
    prompts = [list(range(i * 1000, i * 1000 + 2 * B)) for i in range(4)]
    for i, p in enumerate(prompts):
        s.put(p, blocks_for(2, seed=i))
    s.flush()  # blocks evicted from RAM before their disk write are visible once it lands
    assert s.stats()["tiers"]["host"]["entries"] <= 3
    for i, p in enumerate(prompts):
        assert same(s.get(s.match(p)), blocks_for(2, seed=i))


def test_disk_budget_holds_and_lru_keeps_parents(open_store, clock):
    rec = entry_cost(len(open_store("probe", compression="none").tier("disk").codec.encode(make_block(0))))
    s = open_store(host_bytes=0, compression="none", disk_bytes=10 * rec)
    long = list(range(8 * B))
    s.put(long, blocks_for(8))
    s.flush()
    for i in range(5):  # 5 other prompts of one block each push the long chain out, tail first
        clock.advance(1)
        s.put(list(range(10_000 * (i + 1), 10_000 * (i + 1) + B)), [make_block(50 + i)])
        s.flush()  # disk writes are write-behind: wait for them before looking at the disk
        used = s.stats()["tiers"]["disk"]
        assert used["bytes"] <= 10 * rec
        n = s.match(long, touch=False).num_blocks
        assert s.stats()["tiers"]["disk"]["entries"] == n + i + 1
    assert s.match(long, touch=False).num_blocks == 5
    assert s.stats()["evictions"] == {"reason=capacity,tier=disk": 3}


def test_touch_on_match_protects_a_prefix(open_store, clock):
    rec = entry_cost(len(open_store("probe", compression="none").tier("disk").codec.encode(make_block(0))))
    s = open_store(host_bytes=0, compression="none", disk_bytes=4 * rec)
    a, b = list(range(2 * B)), list(range(500, 500 + 2 * B))
    s.put(a, blocks_for(2, 1))
    s.flush()
    clock.advance(1)
    s.put(b, blocks_for(2, 2))
    s.flush()
    clock.advance(1)
    assert s.match(a).num_blocks == 2  # a is now the most recent
    clock.advance(1)
    s.put(list(range(900, 900 + 2 * B)), blocks_for(2, 3))
    s.flush()
    assert s.match(a).num_blocks == 2 and s.match(b).num_blocks == 0


@pytest.mark.parametrize("tier_cfg", [{"host_bytes": 0}, {"disk_bytes": 0}], ids=["disk", "host"])
def test_idle_ttl_expiry_and_pins(open_store, clock, tier_cfg):
    s = open_store(host_ttl_s=100, disk_ttl_s=100, **tier_cfg)
    a, b = list(range(2 * B)), list(range(700, 700 + 2 * B))
    s.put(a, blocks_for(2))
    s.put(b, blocks_for(2, 1))
    s.flush()
    assert s.pin(a, ttl_s=1000) == 2
    clock.advance(60)
    assert s.match(b).num_blocks == 2  # a hit refreshes the idle clock
    clock.advance(60)
    assert s.match(b).num_blocks == 2
    clock.advance(101)
    assert s.match(b).num_blocks == 0  # idle past the TTL: never served
    assert s.match(a).num_blocks == 2  # pinned
    clock.advance(1000)
    assert s.match(a).num_blocks == 0  # the pin ran out, and it has been idle
    assert s.expire() >= 2


def test_purge_criteria(open_store, clock):
    s = open_store()
    a, b = list(range(2 * B)), list(range(700, 700 + 3 * B))
    s.put(a, blocks_for(2), namespace="tenant-a")
    clock.advance(100)
    s.put(b, blocks_for(3), namespace="tenant-b")
    with pytest.raises(ValueError, match="give all=True"):
        s.purge()
    assert s.purge(older_than_s=50) == 2
    assert s.match(a, namespace="tenant-a").num_blocks == 0
    assert s.match(b, namespace="tenant-b").num_blocks == 3
    clock.advance(10)
    assert s.purge(idle_longer_than_s=60) == 0
    assert s.purge(namespace="tenant-x") == 0
    assert s.purge(namespace="tenant-b") == 3
    s.put(a, blocks_for(2))
    assert s.purge(keys=s.match(a).keys[1:]) == 1
    assert s.purge(all=True) == 1
    assert s.stats()["tiers"]["disk"]["entries"] == 0


@pytest.mark.parametrize("blocks, fragment", [
    ([torch.zeros(3, 3)], "expected shape (2, 2, 2, 8, 4)"),
    ([make_block(0, dtype=torch.float32)], "dtype bfloat16"),
    (["nope"], "expected a torch.Tensor"),
    (blocks_for(3), "hold 2 full block(s)"),
])
def test_bad_blocks_raise_value_error(open_store, blocks, fragment):
    s = open_store()
    s.put(list(range(B)), blocks_for(1))  # fixes the layout
    with pytest.raises(ValueError) as e:
        s.put(list(range(2 * B + 1)), blocks)
    assert fragment in str(e.value)
    assert s.match(list(range(B))).num_blocks == 1  # nothing lost


def test_bad_token_ids_and_closed_store(open_store):
    s = open_store()
    with pytest.raises(ValueError, match=r"token_ids\[1\]"):
        s.match([1, -2, 3])
    with pytest.raises(ValueError, match="start_block"):
        s.put(list(range(B)), blocks_for(1), start_block=-1)
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.match([1, 2])


def test_layout_fixed_by_config_is_enforced(open_store):
    s = open_store(block_shape=SHAPE, dtype="float16")
    with pytest.raises(ValueError, match="dtype float16"):
        s.put(list(range(B)), blocks_for(1))


def test_corrupt_disk_record_is_a_counted_miss_and_removed(open_store, tmp_path):
    toks = list(range(3 * B))
    s = open_store(host_bytes=0)
    s.put(toks, blocks_for(3))
    s.flush()
    key = s.match(toks).keys[1]
    s.close()
    env = lmdb.open(str(tmp_path / "store" / "disk"), max_dbs=8)
    with env.begin(write=True) as txn:
        db = env.open_db(b"records", txn=txn)
        rec = bytearray(txn.get(key, db=db))
        rec[len(rec) // 2] ^= 0xFF
        txn.put(key, bytes(rec), db=db)
    env.close()
    s = open_store(host_bytes=0)
    m = s.match(toks)
    got = s.get(m)
    assert len(got) == 1 and same(got, blocks_for(1))  # served up to the bad block, never it
    assert s.stats()["corrupt_records"] == 1
    assert s.match(toks).num_blocks == 1  # removed: now a plain miss
    assert s.put(toks, blocks_for(3)[1:], start_block=1) == 1  # the next put heals the chain
    s.flush()
    assert same(s.get(s.match(toks)), blocks_for(3))


def test_unusable_paths_are_clear_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreOpenError, match="cannot create|not a directory"):
        KVStore.open(StoreConfig(path=f / "sub"))
    with pytest.raises(StoreOpenError, match="not a directory"):
        KVStore.open(StoreConfig(path=f))
    ww = tmp_path / "ww"
    ww.mkdir()
    os.chmod(ww, 0o777)
    with pytest.raises(StoreOpenError, match="world-writable"):
        KVStore.open(StoreConfig(path=ww))


def test_a_directory_owned_by_another_user_is_refused(tmp_path):
    """Another user could have written KV there: the store refuses it and names the owner."""
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)  # nobody
    else:
        theirs = next(p for p in (Path("/usr"), Path("/")) if p.stat().st_uid != os.geteuid())
    before = sorted(theirs.iterdir())
    with pytest.raises(StoreOpenError, match=f"owned by uid {theirs.stat().st_uid}, not by this user"):
        KVStore.open(StoreConfig(path=theirs))
    assert sorted(theirs.iterdir()) == before  # nothing created there


def test_store_directory_is_owner_only(open_store, tmp_path):
    s = open_store()
    s.put(list(range(B)), blocks_for(1))
    assert (tmp_path / "store").stat().st_mode & 0o777 == 0o700
    for f in (tmp_path / "store" / "disk").iterdir():
        assert f.stat().st_mode & 0o077 == 0, f


def test_newer_disk_format_is_refused(open_store, tmp_path):
    open_store().close()
    env = lmdb.open(str(tmp_path / "store" / "disk"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"format", (99).to_bytes(8, "little"), db=env.open_db(b"info", txn=txn))
    env.close()
    with pytest.raises(IncompatibleFormatError, match="version 99"):
        open_store()


def test_disk_map_grows_past_its_initial_size(open_store):
    big = (64, 64, 64, 8)  # 4 MiB of float16: 40 blocks outgrow the 64 MiB initial map
    s = open_store(host_bytes=0, compression="none", disk_bytes="400MiB", block_tokens=4)
    toks = list(range(40 * 4))
    blocks = [torch.full(big, float(i), dtype=torch.float16) for i in range(40)]
    assert s.put(toks, blocks) == 40
    s.flush()
    got = s.get(s.match(toks))
    assert len(got) == 40 and all(torch.equal(g, b) for g, b in zip(got, blocks))


_OTHER = """
import sys
from kvstore import KVStore, StoreConfig
cfg = StoreConfig(path=sys.argv[1], block_tokens=8, host_bytes=0)
toks = list(range(3 * 8))
with KVStore.open(cfg) as s:
    m = s.match(toks)
    print(m.num_blocks, len(s.get(m)), s.purge(all=True))
"""


def test_another_process_reads_and_purges_while_open(open_store, tmp_path, clock):
    clock.now = time.time()  # the other process runs on the real clock
    s = open_store(host_bytes=0)
    toks = list(range(3 * B))
    s.put(toks, blocks_for(3))
    s.flush()
    out = subprocess.run([sys.executable, "-c", _OTHER, str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "3", "3"]
    assert s.match(toks).num_blocks == 0  # the purge is visible to the open store
    assert s.put(toks, blocks_for(3)) == 3  # and it keeps working


def test_purge_dry_run_removes_nothing(open_store):
    s = open_store()
    s.put(list(range(2 * B)), blocks_for(2))
    assert s.purge(all=True, dry_run=True) == 2
    assert s.match(list(range(2 * B))).num_blocks == 2


BIG = (2, 2, 2, B, 1024)  # 128 KiB of float16 a block: 16 of them outgrow a new store's 1 MiB map
_GROWER = """
import sys, torch
from kvstore import KVStore, StoreConfig
from tests.conftest import make_block
with KVStore.open(StoreConfig(path=sys.argv[1], block_tokens=8, host_bytes=0)) as s:
    s.put(list(range(10_000, 10_000 + 16 * 8)),
          [make_block(100 + i, shape=(2, 2, 2, 8, 1024), dtype=torch.float16) for i in range(16)])
    s.flush()
    print(s.tier("disk").env.info()["map_size"])
"""


def grow_map_in_another_process(path) -> int:
    """Another process grows the store's map (so this one's next read must adopt it); returns
    the map size it grew to."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _GROWER, str(path)], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_a_read_io_error_is_a_counted_miss_never_an_exception(open_store, tmp_path, clock):
    # A real OSError on the read path: another process grew the map, so this one's next read
    # transaction must adopt the new size, which takes resize.lock, and the store directory has
    # been moved away meanwhile. match, get and prefetch go on as misses (counted), serve
    # nothing, and work again once the directory is back.
    clock.now = time.time()  # the other process runs on the real clock
    big = [make_block(i, shape=BIG, dtype=torch.float16) for i in range(2)]
    toks = list(range(2 * B))
    s = open_store(compression="none", disk_bytes="16MiB")
    s.put(toks, big)
    s.close()
    s = open_store(compression="none", disk_bytes="16MiB")
    m = s.match(toks)
    assert m.blocks_by_tier == {"disk": 2}  # RAM is empty: every read goes to the disk tier
    assert grow_map_in_another_process(tmp_path / "store") > s.tier("disk").env.info()["map_size"]
    os.rename(tmp_path / "store", tmp_path / "moved")
    try:
        assert s.get(m) == []  # never raises, serves nothing
        errors = s.metrics.value("io_errors", tier="disk")
        assert errors >= 1 and s.metrics.value("load_failed_blocks") == 2
        h = s.prefetch(m)  # the background load fails the same way: done, nothing moved
        assert h.wait(60) and h.blocks == 0
        assert s.metrics.value("io_errors", tier="disk") > errors
        assert s.metrics.total("prefetch_errors") == 0  # the tier turned the fault into misses
        assert s.tier("host").usage().entries == 0  # nothing promoted
        assert s.match(list(range(10_000, 10_000 + 16 * B))).num_blocks == 0
    finally:
        os.rename(tmp_path / "moved", tmp_path / "store")
    got = s.get(s.match(toks))  # the fault is gone: the same store serves again
    assert len(got) == 2 and all(torch.equal(g, b) for g, b in zip(got, big))
    assert s.match(list(range(10_000, 10_000 + 16 * B))).num_blocks == 16


def test_a_closed_store_gives_its_write_queue_memory_back_without_waiting_for_the_gc(tmp_path):
    # A store's objects hold reference cycles, so a closed store waits for a collection; its
    # write-behind staging (256 MiB by default, zeroed at open) must not wait with it.
    import gc

    def anon_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024
    cfg = StoreConfig(path=tmp_path / "s", block_tokens=B, host_bytes=0, write_queue_bytes=128 << 20)
    with KVStore.open(cfg) as store:  # the first put fixes the layout: a reopen stages at open
        store.put(list(range(B)), [make_block(0)])
    gc.disable()
    try:
        store = KVStore.open(cfg)
        before = anon_mib()
        store.close()
        assert anon_mib() < before - 96, (before, anon_mib())
    finally:
        gc.enable()
