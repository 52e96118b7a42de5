"""The contract every tier meets (``Tier`` in kvstore/tiers/base.py), run against every tier.

A new tier plugs in by adding a ``TierFactory`` to ``FACTORIES``: a function that returns the
tier ``configure``d for ``SHAPE`` and the given dtype, with a budget of exactly ``n`` blocks,
plus what the tier can do (``holds_tensors``: ``Evicted.block`` is readable during
``on_evict``; ``damage``: how to damage a stored record, for tiers that store encoded records).
The dict-backed ``ReferenceTier`` (reference.py) runs the same suite: it shows the contract can
be met, and that each test holds only what the contract promises.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvstore.codec import Codec
from kvstore.eviction import EntryMeta
from kvstore.metrics import Metrics
from kvstore.tiers.base import BlockEntry, Evicted, Tier
from kvstore.tiers.disk import DiskTier, entry_cost
from kvstore.tiers import remote
from kvstore.tiers.remote import RemoteTier
from kvstore.tiers.slab import SlabTier

from ..conftest import SHAPE, FakeClock, block_nbytes, make_block
from .reference import ReferenceTier

N = 8  # blocks every factory's budget holds
TTL = 100.0
T0 = FakeClock().now
BF16 = torch.bfloat16


# -- factories ------------------------------------------------------------------------------------
def _slab(path: Path, n: int, ttl_s: float, dtype: torch.dtype) -> SlabTier:
    tier = SlabTier("host", n * block_nbytes(SHAPE, dtype), ttl_s, device="cpu", pin_memory=False,
                    metrics=Metrics())
    tier.configure(SHAPE, dtype)
    return tier


def _disk(path: Path, n: int, ttl_s: float, dtype: torch.dtype) -> DiskTier:
    codec = Codec("none")  # every record of a layout has the same size: a budget of exactly n
    path.mkdir(parents=True, exist_ok=True)
    tier = DiskTier(path, n * entry_cost(len(codec.encode(make_block(0, dtype=dtype)))), ttl_s,
                    codec, Metrics())
    tier.configure(SHAPE, dtype)
    return tier


def _damage_disk_record(tier: DiskTier, key: bytes, kind: str) -> None:
    """Rewrites ``key``'s record in the records database behind the tier's back."""
    db = tier.env.dbs[b"records"]

    def txn_fn(txn):
        rec = bytearray(txn.get(key, db=db))
        if kind == "garbage":
            rec = bytearray(b"not a record at all")
        elif kind == "flipped_bit":
            rec[-1] ^= 0x01  # inside the payload
        elif kind == "truncated":
            rec = rec[:len(rec) // 2]
        else:
            raise AssertionError(kind)
        txn.put(key, bytes(rec), db=db)
    with tier.env.lock:
        tier.env.write(txn_fn)


def _remote(path: Path, n: int, ttl_s: float, dtype: torch.dtype, server=None,
            codec: Codec | None = None) -> RemoteTier:
    # A key prefix of its own: every tier sees an empty server. The default codec is the one a
    # store gives its remote tier (remote_compression="none": the block verbatim).
    codec = codec or Codec("none", byte_split=False)
    tier = RemoteTier(server.url, ttl_s, 1.0, codec, Metrics(), prefix=f"test:{path.parent.name}:{path.name}:")
    tier.configure(SHAPE, dtype)
    return tier


def _damage_remote_record(tier: RemoteTier, key: bytes, kind: str) -> None:
    """Damages the record inside the block's value (after the head and the metadata)."""
    name = tier._k(key)
    value = tier.client.get(name)
    start = remote._HEAD + remote._head(value[:remote._HEAD])[2]
    rec = bytearray(value[start:])
    if kind == "garbage":
        rec = bytearray(b"not a record at all")
    elif kind == "flipped_bit":
        rec[-1] ^= 0x01
    elif kind == "truncated":
        rec = rec[:len(rec) // 2]
    tier.client.set(name, value[:start] + bytes(rec), keepttl=True)


def _reference(path: Path, n: int, ttl_s: float, dtype: torch.dtype) -> ReferenceTier:
    tier = ReferenceTier(n, ttl_s)
    tier.configure(SHAPE, dtype)
    return tier


@dataclasses.dataclass(frozen=True)
class TierFactory:
    id: str
    make: Callable[[Path, int, float, torch.dtype], Tier]  # (empty dir, n blocks, ttl_s, dtype)
    holds_tensors: bool  # Evicted.block is the victim's data during on_evict
    # Damages a stored record (tier, key, kind); None for tiers that store no encoded records.
    damage: Callable[[Tier, bytes, str], None] | None = None
    # The tier keeps its own block budget and LRU order (the remote tier leaves both to the
    # server's maxmemory policy and expiry: tests/tiers/test_remote.py covers that).
    own_budget: bool = True
    needs_server: bool = False  # make() takes server= (the session's valkey-server)

    @property
    def stores_records(self) -> bool:
        return self.damage is not None


FACTORIES = [
    TierFactory("slab-cpu", _slab, holds_tensors=True),
    TierFactory("disk", _disk, holds_tensors=False, damage=_damage_disk_record),
    TierFactory("reference", _reference, holds_tensors=True),
    TierFactory("remote", _remote, holds_tensors=False, damage=_damage_remote_record,
                own_budget=False, needs_server=True),
    TierFactory("remote-zstd-hi", functools.partial(_remote, codec=Codec("zstd-hi")),
                holds_tensors=False, damage=_damage_remote_record, own_budget=False,
                needs_server=True),
]
pytestmark = pytest.mark.parametrize("factory", FACTORIES, ids=[f.id for f in FACTORIES])


@pytest.fixture
def make_tier(tmp_path, request):
    """``make_tier(factory, n=N, ttl_s=TTL, dtype=BF16)``: a fresh tier, closed afterwards."""
    opened = []

    def _make(factory: TierFactory, n: int = N, ttl_s: float = TTL, dtype: torch.dtype = BF16) -> Tier:
        if not factory.own_budget and request.node.get_closest_marker("budget"):
            pytest.skip(f"{factory.id}: the server owns the budget and the eviction order")
        extra = {"server": request.getfixturevalue("valkey")} if factory.needs_server else {}
        tier = factory.make(tmp_path / f"tier{len(opened)}", n, ttl_s, dtype, **extra)
        opened.append(tier)
        return tier
    yield _make
    for tier in opened:
        tier.close()


# -- blocks and chains ----------------------------------------------------------------------------
def key(chain: int, depth: int) -> bytes:
    return struct.pack(">QQ", chain + 1, depth)


def chain(c: int, length: int, t: float, ns: int = 0, dtype: torch.dtype = BF16) -> list[BlockEntry]:
    """Blocks 0..length-1 of chain ``c``, each the child of the one before, used at ``t``."""
    out, parent = [], b""
    for d in range(length):
        block = make_block(1000 * c + d, dtype=dtype)
        out.append(BlockEntry(key(c, d), block, EntryMeta(ns, d, parent, t, t, block.nbytes)))
        parent = key(c, d)
    return out


def roots(cs, t: float) -> list[BlockEntry]:
    """One first block (depth 0) for each chain in ``cs``."""
    return [chain(c, 1, t)[0] for c in cs]


def keys_of(entries) -> list[bytes]:
    return [e.key for e in entries]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def held(tier: Tier) -> set[bytes]:
    return {k for k, _ in tier.entries()}


def assert_in_budget(tier: Tier) -> None:
    u = tier.usage()
    assert u.entries <= N and u.bytes <= u.budget, u
    assert u.entries == len(tier.entries())


def assert_chains_reachable(tier: Tier) -> None:
    """Every held block's parent is held: chains shrink from their tails."""
    metas = dict(tier.entries())
    orphans = [k for k, m in metas.items() if m.depth and m.parent not in metas]
    assert not orphans, f"held blocks whose parent is gone: {orphans}"


MISSING = key(999, 0)
BUDGET = pytest.mark.budget  # relies on the tier's own budget and LRU order


# -- the protocol ---------------------------------------------------------------------------------
def test_the_tier_has_every_member_of_the_protocol(factory, make_tier):
    tier = make_tier(factory)
    methods = [n for n, v in vars(Tier).items() if callable(v) and not n.startswith("_")]
    assert {"put_many", "get_many", "contains_many", "purge", "expire"} <= set(methods)
    for name in methods:
        assert callable(getattr(tier, name, None)), name
    assert isinstance(tier.name, str) and isinstance(tier.slow, bool) and isinstance(tier.shared, bool)
    assert isinstance(tier.device, torch.device)


# -- batch semantics ------------------------------------------------------------------------------
def test_batches_answer_per_entry_and_get_many_copies_bit_exactly(factory, make_tier):
    tier = make_tier(factory)
    es = roots(range(3), T0)
    assert tier.put_many(es, T0) == [True, True, True]
    assert tier.put_many(es[1:2], T0) == [True]  # already held: held, not stored twice
    assert tier.usage().entries == 3
    ks = [es[0].key, MISSING, es[2].key, es[1].key]
    assert tier.contains_many(ks, T0) == [True, False, True, True]
    for now in (T0, None):
        outs = [torch.full(SHAPE, 7.0, dtype=BF16) for _ in ks]
        ptrs = [o.data_ptr() for o in outs]
        assert tier.get_many(ks, outs, now) == [True, False, True, True]
        assert [o.data_ptr() for o in outs] == ptrs  # written in place
        assert same_bits(outs[0], es[0].block)
        assert same_bits(outs[2], es[2].block)
        assert same_bits(outs[3], es[1].block)
    assert tier.contains_many([], T0) == []
    assert tier.get_many([], [], T0) == []
    assert tier.put_many([], T0) == []


def test_the_tier_keeps_its_own_copy_of_a_block(factory, make_tier):
    tier = make_tier(factory)
    (e,) = roots([0], T0)
    original = e.block.clone()
    tier.put_many([e], T0)
    e.block.fill_(3.0)  # the caller reuses its buffer
    out = torch.empty(SHAPE, dtype=BF16)
    assert tier.get_many([e.key], [out], T0) == [True]
    assert same_bits(out, original)


def test_stop_at_miss_ends_the_list_at_the_first_miss(factory, make_tier):
    tier = make_tier(factory)
    es = roots(range(4), T0)
    tier.put_many(es, T0)
    ks = [es[0].key, es[1].key, MISSING, es[2].key, es[3].key]
    assert tier.contains_many(ks, T0, stop_at_miss=True) == [True, True, False]
    assert tier.contains_many(ks, T0) == [True, True, False, True, True]
    assert tier.contains_many([MISSING] + ks, T0, stop_at_miss=True) == [False]
    assert tier.contains_many(keys_of(es), T0, stop_at_miss=True) == [True] * 4


# -- budgets --------------------------------------------------------------------------------------
@BUDGET
def test_one_batch_larger_than_the_budget_stores_what_fits(factory, make_tier):
    tier = make_tier(factory)
    es = roots(range(N + 3), T0)
    ok = tier.put_many(es, T0)
    assert len(ok) == N + 3 and sum(ok) == N
    assert tier.contains_many(keys_of(es), T0) == ok
    assert_in_budget(tier)
    u = tier.usage()
    assert u.entries == N and u.raw_bytes == N * block_nbytes()


@BUDGET
def test_many_batches_stay_in_budget_and_keep_the_most_recent(factory, make_tier):
    tier = make_tier(factory)
    es = roots(range(2 * N), T0)
    for i in range(0, 2 * N, 2):
        t = T0 + i
        for e in es[i:i + 2]:
            e.meta.created = e.meta.last_access = t
        assert tier.put_many(es[i:i + 2], t) == [True, True]
        assert_in_budget(tier)
    assert tier.usage().entries == N
    assert held(tier) == set(keys_of(es[N:]))


# -- eviction order -------------------------------------------------------------------------------
@BUDGET
def test_eviction_takes_a_chain_from_its_tail(factory, make_tier):
    tier = make_tier(factory)
    a = chain(0, N, T0)  # one batch, one instant: depth alone orders it
    assert tier.put_many(a, T0) == [True] * N
    tier.touch_many(keys_of(a), T0)
    c = chain(1, 3, T0 + 1)
    assert tier.put_many(c, T0 + 1) == [True] * 3
    assert held(tier) == set(keys_of(a[:N - 3] + c))
    assert_chains_reachable(tier)


@BUDGET
def test_a_path_touched_parent_first_outlives_its_untouched_tail(factory, make_tier):
    tier = make_tier(factory)
    a, b = chain(0, 4, T0), chain(1, 4, T0 + 1)
    tier.put_many(a, T0)
    tier.put_many(b, T0 + 1)
    tier.touch_many(keys_of(a[:2]) + [MISSING], T0 + 2)  # a prefix of a: a[2:] stay at T0
    c = chain(2, 3, T0 + 3)
    evicted: list[Evicted] = []
    assert tier.put_many(c, T0 + 3, on_evict=evicted.extend) == [True] * 3
    expected = {a[3].key, a[2].key, b[3].key}
    assert {ev.key for ev in evicted} == expected
    assert held(tier) == set(keys_of(a + b + c)) - expected
    assert_chains_reachable(tier)


@BUDGET
@pytest.mark.parametrize("order", ["parent_first", "deepest_first"])
def test_a_chain_longer_than_the_budget_keeps_its_head(factory, make_tier, order):
    tier = make_tier(factory)
    a = chain(0, N + 2, T0)
    batch = a if order == "parent_first" else a[::-1]
    ok = tier.put_many(batch, T0)
    assert sum(ok) == N
    assert_chains_reachable(tier)
    assert held(tier) == set(keys_of(a[:N]))


@BUDGET
def test_an_ancestor_of_the_batch_is_never_evicted(factory, make_tier):
    tier = make_tier(factory)
    r = chain(0, 3, T0)
    tier.put_many(r[:2], T0)  # the oldest blocks in the tier
    fillers = roots(range(1, N - 1), T0 + 1)
    tier.put_many(fillers, T0 + 1)
    assert tier.usage().entries == N
    child = r[2]
    child.meta.created = child.meta.last_access = T0 + 2
    assert tier.put_many([child], T0 + 2) == [True]
    assert tier.contains_many(keys_of(r), T0 + 2) == [True, True, True]
    assert_in_budget(tier)
    assert_chains_reachable(tier)
    assert len(held(tier) & set(keys_of(fillers))) == N - 3


# -- on_evict -------------------------------------------------------------------------------------
@BUDGET
def test_on_evict_sees_capacity_victims_and_their_data(factory, make_tier):
    tier = make_tier(factory)
    es = roots(range(N), T0)
    for i, e in enumerate(es):
        e.meta.created = e.meta.last_access = T0 + i
        tier.put_many([e], T0 + i)
    seen = []

    def on_evict(victims: list[Evicted]) -> None:
        for ev in victims:
            data = ev.block.clone() if ev.block is not None else None
            seen.append((ev.key, ev.reason, ev.meta.depth, data, ev.record))

    new = roots(range(N, N + 2), T0 + N)
    assert tier.put_many(new, T0 + N, on_evict=on_evict) == [True, True]
    by_key = {e.key: e for e in es}
    assert {k for k, *_ in seen} == {es[0].key, es[1].key}
    for k, reason, depth, data, record in seen:
        assert reason == "capacity" and depth == 0
        if factory.holds_tensors:
            assert data is not None and same_bits(data, by_key[k].block)
        if factory.stores_records:
            assert record is not None and same_bits(Codec().decode(record), by_key[k].block)


# -- TTL and pins ---------------------------------------------------------------------------------
def test_idle_blocks_expire_unless_touched_or_pinned(factory, make_tier):
    tier = make_tier(factory)
    a, b, c = es = roots(range(3), T0)
    tier.put_many(es, T0)
    assert tier.pin_many([b.key, MISSING], T0 + 10 * TTL) == 1
    tier.touch_many([c.key], T0 + TTL / 2)
    ks = keys_of(es)
    assert tier.contains_many(ks, T0 + TTL / 2) == [True, True, True]
    later = T0 + 1.5 * TTL
    assert tier.contains_many(ks, later) == [False, True, True]
    outs = [torch.empty(SHAPE, dtype=BF16) for _ in ks]
    assert tier.get_many(ks, outs, later) == [False, True, True]
    assert same_bits(outs[1], b.block) and same_bits(outs[2], c.block)
    gone = tier.expire(later)
    assert [(ev.key, ev.reason) for ev in gone] == [(a.key, "ttl")]
    assert held(tier) == {b.key, c.key}
    assert tier.expire(later) == []
    gone = tier.expire(T0 + 20 * TTL)  # the pin lapsed, c idled out
    assert {ev.key for ev in gone} == {b.key, c.key} and {ev.reason for ev in gone} == {"ttl"}
    assert tier.usage().entries == 0


@BUDGET
def test_a_pinned_block_is_not_evicted_for_capacity(factory, make_tier):
    tier = make_tier(factory)
    es = roots(range(N), T0)
    tier.put_many(es, T0)
    assert tier.pin_many([es[0].key], T0 + TTL / 2) == 1
    for i in range(N):  # N newer blocks, one at a time
        t = T0 + 1 + i
        (e,) = roots([N + i], t)
        assert tier.put_many([e], t) == [True]
        assert_in_budget(tier)
    assert es[0].key in held(tier)
    # Every held block pinned: no room, a dropped write.
    assert tier.pin_many(list(held(tier)), T0 + TTL / 2) == N
    before = held(tier)
    (extra,) = roots([3 * N], T0 + 2 * N)
    assert tier.put_many([extra], T0 + 2 * N) == [False]
    assert held(tier) == before and tier.contains_many([extra.key], T0 + 2 * N) == [False]


# -- purge ----------------------------------------------------------------------------------------
def test_purge_removes_exactly_what_select_accepts_pins_ignored(factory, make_tier):
    tier = make_tier(factory)
    one, two = chain(0, 3, T0, ns=1), chain(1, 3, T0, ns=2)
    tier.put_many(one + two, T0)
    assert tier.pin_many([one[0].key, two[0].key], T0 + 10 * TTL) == 2
    offered = []

    def select(k: bytes, m: EntryMeta) -> bool:
        offered.append(k)
        return m.namespace_id == 1

    gone = tier.purge(select, T0)
    assert set(offered) == set(keys_of(one + two))
    assert sorted(ev.key for ev in gone) == sorted(keys_of(one))
    assert {ev.reason for ev in gone} == {"purge"}
    assert held(tier) == set(keys_of(two))
    assert tier.contains_many(keys_of(one), T0) == [False] * 3
    assert tier.purge(lambda k, m: False, T0) == []
    assert tier.usage().entries == 3


# -- entries --------------------------------------------------------------------------------------
def test_entries_is_a_snapshot_of_keys_and_metadata(factory, make_tier):
    tier = make_tier(factory)
    es = chain(0, 3, T0, ns=7) + roots([5], T0)
    es[-1].meta.namespace_id = 3
    tier.put_many(es, T0)
    tier.touch_many(keys_of(es[:2]), T0 + 5)
    tier.pin_many([es[1].key], T0 + 50)
    tier.flush()
    snap = dict(tier.entries())
    assert set(snap) == set(keys_of(es))
    for e in es:
        m = snap[e.key]
        assert (m.namespace_id, m.depth, m.parent, m.raw_bytes) == \
            (e.meta.namespace_id, e.meta.depth, e.meta.parent, e.meta.raw_bytes)
        assert m.last_access == (T0 + 5 if e in es[:2] else T0)
        assert m.pinned_until == (T0 + 50 if e is es[1] else 0.0)
    snap[es[0].key].depth = 99  # a snapshot: changing it changes nothing in the tier
    assert dict(tier.entries())[es[0].key].depth == 0


# -- bit-exact round trip per dtype ---------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def test_round_trip_is_bit_exact(factory, make_tier, dtype):
    tier = make_tier(factory, n=4, dtype=dtype)  # a slab holds one dtype: a fresh tier each
    g = torch.Generator().manual_seed(7)
    blocks = []
    for _ in range(3):  # every bit pattern: NaN payloads, infinities, -0, subnormals
        raw = torch.randint(0, 256, (block_nbytes(SHAPE, dtype),), dtype=torch.uint8, generator=g)
        blocks.append(raw.view(dtype).reshape(SHAPE))
    es = [BlockEntry(key(i, 0), b, EntryMeta(0, 0, b"", T0, T0, b.nbytes)) for i, b in enumerate(blocks)]
    assert tier.put_many(es, T0) == [True] * 3
    outs = [torch.empty(SHAPE, dtype=dtype) for _ in es]
    assert tier.get_many(keys_of(es), outs, T0) == [True] * 3
    for out, b in zip(outs, blocks):
        assert same_bits(out, b)


# -- faults ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["garbage", "flipped_bit", "truncated"])
def test_a_damaged_record_is_a_counted_miss_and_is_removed(factory, make_tier, kind):
    if not factory.stores_records:
        pytest.skip(f"{factory.id} stores no encoded records")
    tier = make_tier(factory)
    a, b = roots(range(2), T0)
    tier.put_many([a, b], T0)
    factory.damage(tier, a.key, kind)
    outs = [torch.empty(SHAPE, dtype=BF16) for _ in range(2)]
    assert tier.get_many([a.key, b.key], outs, T0) == [False, True]
    assert same_bits(outs[1], b.block)
    assert tier.metrics.value("corrupt_records", tier=tier.name) == 1
    assert tier.contains_many([a.key, b.key], T0) == [False, True]
    assert held(tier) == {b.key} and tier.usage().entries == 1
    assert tier.get_many([a.key], outs[:1], T0) == [False]  # gone: a plain miss, not recounted
    assert tier.metrics.value("corrupt_records", tier=tier.name) == 1
