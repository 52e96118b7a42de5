"""Stateful property tests of KVStore against a reference model (dict + LRU order + clock).

``ExactDiskModel`` runs the store with only its disk tier and predicts every match exactly:
LRU within a budget of N records (uncompressed records have a fixed size), idle TTL, pins,
purges, expiry and reopen. ``TwoTierMachine`` adds a small host tier, where spill and promotion
make exact prediction a re-implementation; it checks the invariants instead: what is served is
bit-exact, a match never exceeds what was stored, budgets hold, nothing idle is served.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvstore import KVStore, StoreConfig, keys
from kvstore.tiers.disk import entry_cost

from .conftest import BLOCK_TOKENS as B, FakeClock, examples, make_block

TTL = 100.0
CAPACITY = 6  # records the disk budget holds
NS = "default"

paths = st.lists(st.integers(0, 2), min_size=1, max_size=5).map(tuple)


def tokens_of(path: tuple[int, ...], tail: int = 0) -> list[int]:
    """Block id i at position p always becomes the same 8 tokens, so paths share prefixes."""
    out = []
    for p, i in enumerate(path):
        out += [1000 * i + 10 * p + t for t in range(B)]
    return out + list(range(7, 7 + tail))


def data_of(path: tuple[int, ...]) -> torch.Tensor:
    return make_block(sum((v + 1) * 4**i for i, v in enumerate(path)))  # same prefix, same KV


class Entry:
    def __init__(self, key: bytes, depth: int, now: float):
        self.key, self.depth, self.created, self.last, self.pinned = key, depth, now, now, 0.0

    def live(self, now: float) -> bool:
        return now - self.last <= TTL or self.pinned > now


class StoreMachine(RuleBasedStateMachine):
    host_blocks = 0

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kvstore-stateful-"))
        self.clock = FakeClock()
        probe = len(KVStore.open(StoreConfig(path=self.dir / "probe", compression="none"))
                    .tier("disk").codec.encode(make_block(0)))
        self.cfg = StoreConfig(path=self.dir / "s", block_tokens=B, compression="none",
                               host_bytes=self.host_blocks * make_block(0).numel() * 2,
                               disk_bytes=CAPACITY * entry_cost(probe),
                               host_ttl_s=TTL, disk_ttl_s=TTL, io_threads=1)
        self.store = KVStore.open(self.cfg, clock=self.clock)
        self.stored: dict[tuple[int, ...], bytes] = {}  # every prefix ever stored -> key

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def key(self, path):
        return keys.block_keys(NS, tokens_of(path), B)[-1]

    @rule(seconds=st.sampled_from([0, 1, 30, 60, 99, 101, 150]))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = KVStore.open(self.cfg, clock=self.clock)

    @rule(path=paths, tail=st.integers(0, B - 1))
    def get_matches_stored_data(self, path, tail):
        m = self.store.match(tokens_of(path, tail))
        got = self.store.get(m)
        assert len(got) == m.num_blocks  # no faults injected here: everything matched loads
        for i, block in enumerate(got):
            assert torch.equal(block.view(torch.int16), data_of(path[:i + 1]).view(torch.int16))
        assert m.num_tokens == m.num_blocks * B <= len(path) * B
        self.matched(path, m.num_blocks)

    def matched(self, path, n):
        """Hook: the store touched the first ``n`` blocks of ``path``."""

    @invariant()
    def budgets_hold(self):
        for name, u in self.store.stats()["tiers"].items():
            assert u["bytes"] <= u["budget"], name


class ExactDiskModel(StoreMachine):
    def __init__(self):
        super().__init__()
        self.model: dict[tuple[int, ...], Entry] = {}

    def live_prefix(self, path) -> int:
        n = 0
        while n < len(path) and path[:n + 1] in self.model and self.model[path[:n + 1]].live(self.clock.now):
            n += 1
        return n

    def order(self, e: Entry):
        return (int(e.last * 1_000_000), -e.depth, e.key)

    @rule(path=paths, start=st.integers(0, 4))
    def put(self, path, start):
        start = min(start, len(path) - 1)
        now = self.clock.now
        n = self.store.put(tokens_of(path), [data_of(path[:i + 1]) for i in range(start, len(path))],
                           start_block=start)
        self.store.flush()  # write-behind: the disk-only store shows a block once it is written
        # model
        if start and self.live_prefix(path[:start]) < start:
            assert n == 0
            return
        for i in range(len(path)):
            if path[:i + 1] in self.model:
                self.model[path[:i + 1]].last = now
        new = [path[:i + 1] for i in range(start, len(path)) if path[:i + 1] not in self.model]
        if not new:
            assert n == 0  # only touches: no write transaction, so no expiry sweep either
            return
        for p in [p for p, e in self.model.items() if not e.live(now)]:
            del self.model[p]  # the write transaction sweeps expired entries first
        keep = min(len(new), CAPACITY)
        need = len(self.model) + keep - CAPACITY
        protected = {path[:i + 1] for i in range(len(path))}
        victims = sorted((p for p, e in self.model.items() if p not in protected and e.pinned <= now),
                         key=lambda p: self.order(self.model[p]))[:max(need, 0)]
        if need > len(victims):
            keep -= need - len(victims)
        for p in victims:
            del self.model[p]
        for p in new[:keep]:
            self.model[p] = Entry(self.key(p), len(p) - 1, now)
            self.stored[p] = self.model[p].key
        assert n == len(new)  # queued; the budget drops the tail (keep) when written

    @rule(path=paths, tail=st.integers(0, B - 1))
    def match(self, path, tail):
        expect = self.live_prefix(path)
        assert self.store.match(tokens_of(path, tail)).num_blocks == expect
        self.matched(path, expect)

    def matched(self, path, n):
        assert n == self.live_prefix(path)
        for i in range(n):
            self.model[path[:i + 1]].last = self.clock.now

    @rule(path=paths, ttl=st.sampled_from([10.0, 200.0, 1000.0]))
    def pin(self, path, ttl):
        n = self.live_prefix(path)
        assert self.store.pin(tokens_of(path), ttl) == n
        for i in range(n):
            e = self.model[path[:i + 1]]
            e.last = self.clock.now
            e.pinned = max(e.pinned, self.clock.now + ttl)

    @rule(idle=st.sampled_from([None, 0.0, 50.0, 120.0]))
    def purge(self, idle):
        now = self.clock.now
        gone = [p for p, e in self.model.items() if idle is None or now - e.last > idle]
        n = self.store.purge(all=idle is None, idle_longer_than_s=idle)
        assert n == len(gone)
        for p in gone:
            del self.model[p]

    @rule()
    def expire(self):
        gone = [p for p, e in self.model.items() if not e.live(self.clock.now)]
        assert self.store.expire() == len(gone)
        for p in gone:
            del self.model[p]

    @invariant()
    def parents_outlive_children(self):
        # In one tier a parent outlives its children (a parent may still be in the write queue,
        # read first: blocks only move from it to the disk). Across tiers this cannot hold:
        # they evict independently, and a RAM block whose parent left every tier is simply
        # unreachable, never served, and ages out; so the two-tier machine does not check it.
        queued = set().union(*(w.queued_keys() for w in self.store._writers.values()))
        disk = dict(self.store.tier("disk").entries())
        for key, meta in disk.items():
            if meta.depth:
                assert meta.parent in disk or meta.parent in queued, "a child outlived its parent"

    @invariant()
    def entry_count_matches(self):
        assert self.store.stats()["tiers"]["disk"]["entries"] == len(self.model)


class TwoTierMachine(StoreMachine):
    host_blocks = 3
    flushing = True

    @rule(flushing=st.booleans())
    def write_behind_mode(self, flushing):
        """Either wait for each put's disk writes, or let them overlap the next operations."""
        self.flushing = flushing

    @rule(path=paths, start=st.integers(0, 4))
    def put(self, path, start):
        start = min(start, len(path) - 1)
        self.store.put(tokens_of(path), [data_of(path[:i + 1]) for i in range(start, len(path))],
                       start_block=start)
        if self.flushing:
            self.store.flush()
        for i in range(len(path)):
            self.stored.setdefault(path[:i + 1], self.key(path[:i + 1]))

    @rule(path=paths)
    def match_never_exceeds_what_was_stored(self, path):
        n = self.store.match(tokens_of(path)).num_blocks
        assert all(path[:i + 1] in self.stored for i in range(n))

    pins_until = 0.0

    @rule(path=paths, ttl=st.sampled_from([10.0, 1000.0]))
    def pin(self, path, ttl):
        if self.store.pin(tokens_of(path), ttl):
            self.pins_until = max(self.pins_until, self.clock.now + ttl)

    @rule()
    def purge_all(self):
        self.store.flush()  # no queued write lands after the purge
        self.store.purge(all=True)
        self.stored.clear()  # a purged block served again breaks match_never_exceeds_what_was_stored
        assert self.store.match(tokens_of((0, 1, 2))).num_blocks == 0

    @rule()
    def nothing_idle_past_the_ttl_is_served(self):
        self.clock.advance(TTL + 1)
        if self.clock.now > self.pins_until:
            for p in self.stored:
                assert self.store.match(tokens_of(p)).num_blocks == 0


TestExactDiskModel = ExactDiskModel.TestCase
TestExactDiskModel.settings = settings(max_examples=examples(100), stateful_step_count=40, deadline=None)
TestTwoTiers = TwoTierMachine.TestCase
TestTwoTiers.settings = settings(max_examples=examples(60), stateful_step_count=40, deadline=None)
