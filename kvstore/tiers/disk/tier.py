"""DiskTier: the tier policy over the LMDB environment: budget, LRU eviction, idle TTL, pins.

Budget: the sum of ``entry_cost`` over entries never exceeds ``capacity_bytes``; the data file
itself is capped at ``2 * capacity_bytes + 64 MiB`` (room for copy-on-write pages). The budget
and the TTL are the store's stored settings (``disk_bytes``, ``disk_ttl_s``): every write
transaction reads them, so all processes sharing the store enforce the same ones. Last-access
times of hits are kept in memory and written with the next write transaction, so a hit costs
no write transaction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from ...codec import Codec
from ...errors import CorruptEntryError
from ...eviction import EntryMeta, is_expired, is_live, is_pinned
from ...lazy_torch import torch
from ...metrics import Metrics
from ..base import BlockEntry, Evicted, EvictCallback, TierUsage
from .arena import RecordArena
from .env import NO_SPACE, LMDBEnv, LMDBError
from .readahead import will_need
from .removals import RemovalLog
from .schema import TIMES, TIMES_AT, Schema, Totals, entry_cost, unpack_meta

_EXPIRE_BATCH = 1024  # expired entries removed per write transaction, to keep writes short
_PURGE_BATCH = 4096  # entries removed per purge transaction
# Faults of a read: LMDB's, and OSError from adopting another process's map growth (resize.lock,
# the data file's size). Either is a miss for the engine, never an exception.
READ_FAULTS = (LMDBError, OSError)
# Bytes of records a load requests from the kernel beyond the one it decodes (at least one
# record). 2 MiB measured as well as 4 or 8 (cold loads of 128 1.4 MiB blocks,
# docs/benchmarks.md); more only holds more pages in flight.
READ_AHEAD = 2 << 20
PAGE = 4096  # what a record may take beyond its bytes (its last page), for the room a batch asks
# Blocks of at most this many raw bytes: their records (at most the raw bytes and a header of
# about 130) stay inside LMDB's leaf pages, which hold a value of up to about 2,000 bytes.
SMALL_BLOCK_BYTES = 1 << 10


class DiskTier:
    """The disk tier (see ``Tier`` in base.py for each method's contract).

    Args:
        path: directory of the LMDB environment (must exist); ignored when ``env`` is given.
        capacity_bytes: budget of stored records (``entry_cost`` each), until a stored
            ``disk_bytes`` setting says otherwise.
        ttl_s: idle time after which a block is no longer served (likewise ``disk_ttl_s``).
        codec: turns blocks into records and back.
        metrics: sink for evictions, dropped writes, corrupt records and I/O errors.
        readonly: open for reading only (tools inspecting a store).
        env: an open environment to share (the store's ledger lives in the same one).

    Raises (at open):
        StoreOpenError: the directory cannot be opened as an LMDB environment.
        IncompatibleFormatError: the store was written by a newer format version.
    """

    name = "disk"
    slow = True  # writes go through a write-behind queue, loads run on the store's io threads
    shared = True  # other processes on this machine see (and purge) the same blocks
    networked = False

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # a property: torch is imported on first use (lazy_torch)

    def __init__(self, path: str | os.PathLike | None, capacity_bytes: int, ttl_s: float,
                 codec: Codec, metrics: Metrics | None = None, readonly: bool = False,
                 env: LMDBEnv | None = None):
        self._owns_env = env is None
        self.env = env or LMDBEnv(path, 2 * capacity_bytes, readonly=readonly)
        self.path = Path(self.env.path)
        self.readonly = self.env.readonly
        self.codec = codec
        self._arena = RecordArena()
        self.metrics = metrics or Metrics()
        self._set_budget(capacity_bytes, ttl_s)
        self._schema = Schema(self.env)
        self.removals = RemovalLog(self.env)
        self._pending: dict[bytes, float] = {}  # key -> last access not yet written
        self.env.on_reopen(self._pending.clear)

    # Writers, pending touches, reopen; never held by readers. The environment's (a forked child
    # gets a fresh one).
    _lock = property(lambda self: self.env.lock)

    def _set_budget(self, capacity_bytes: int, ttl_s: float) -> None:
        self.capacity_bytes, self.ttl_s = capacity_bytes, ttl_s
        self.env.map_cap = max(self.env.map_cap, 2 * capacity_bytes + (64 << 20))

    def _adopt_settings(self, txn) -> None:
        """Takes the budget and TTL another process may have stored since (one small read)."""
        db = self.env.dbs[b"settings"]
        if db is None:
            return
        cap, ttl = txn.get(b"disk_bytes", db=db), txn.get(b"disk_ttl_s", db=db)
        if cap is not None and ttl is not None:
            self._set_budget(int(json.loads(bytes(cap))), float(json.loads(bytes(ttl))))

    def configure(self, block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        # Records are self-describing: any layout. Small blocks' records live inside LMDB's
        # leaf pages, so the map is read and written a page at a time (LMDBEnv.access_randomly).
        if math.prod(block_shape) * dtype.itemsize <= SMALL_BLOCK_BYTES:
            self.env.access_randomly()

    # -- write helpers -----------------------------------------------------------------------
    def _count_fault(self, e: Exception) -> str:
        """Counts a failed write (``io_errors``); returns why it failed, as a drop reason."""
        self.metrics.add("io_errors", tier=self.name)
        return "no_space" if isinstance(e, OSError) and e.errno in NO_SPACE else "io_error"

    def _locked_write(self, fn: Callable, fallback: object, durable: bool = True) -> object:
        """A write transaction under the lock (``durable``: see ``LMDBEnv.write``); a fault
        (full disk, I/O error) is counted and returns ``fallback``."""
        with self._lock:
            self.env.check_pid()
            try:
                return self.env.write(fn, durable=durable)
            except (LMDBError, OSError) as e:
                self._count_fault(e)
                return fallback

    def _forget_touches(self, written: dict[bytes, float]) -> None:
        """Drops pending last-access times that ``written`` stored (newer ones stay)."""
        for key, ts in written.items():
            if self._pending.get(key) == ts:
                del self._pending[key]

    def _apply_touches(self, txn, touches: dict[bytes, float]) -> None:
        for key, ts in touches.items():
            old = self._schema.get_meta(txn, key)
            if old is not None and ts > old.last_access:
                self._schema.set_meta(txn, key, old, dataclasses.replace(old, last_access=ts))

    # -- reads -------------------------------------------------------------------------------
    def contains_many(self, keys: Sequence[bytes], now: float, stop_at_miss: bool = False) -> list[bool]:
        # The hot path of every lookup (2,000 keys for a 128k-token prompt): read only the two
        # times from each packed meta, no EntryMeta objects.
        out: list[bool] = []
        pending, ttl = self._pending, self.ttl_s
        try:
            with self.env.reading() as txn:
                get, db = txn.get, self._schema.meta
                for key in keys:
                    raw = get(key, db=db)
                    if raw is None:
                        hit = False
                    else:
                        last, pinned = TIMES.unpack_from(raw, TIMES_AT)
                        # A pending touch only makes an entry newer: look it up only if needed.
                        hit = is_live(last, pinned, now, ttl) or is_live(pending.get(key, 0.0), pinned, now, ttl)
                    out.append(hit)
                    if stop_at_miss and not hit:
                        break
        except READ_FAULTS:
            self.metrics.add("io_errors", tier=self.name)
            return [False] * (1 if stop_at_miss else len(keys))
        return out

    def _live_meta(self, txn, key: bytes, now: float) -> EntryMeta | None:
        meta = self._schema.get_meta(txn, key)
        if meta is None:
            return None
        meta.last_access = max(meta.last_access, self._pending.get(key, 0.0))
        return None if is_expired(meta, now, self.ttl_s) else meta

    def get_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor],
                 now: float | None = None) -> list[bool]:
        """Decodes each record into ``outs[i]`` (CPU tensors); corrupt ones are removed.

        Lookups run up to ``READ_AHEAD`` bytes of records ahead of the decoder, and each record's
        pages are requested from the kernel when it is looked up (readahead.py): the disk reads
        the next records while this thread decodes. (Looking a record up touches its first page:
        doing all lookups first read the whole batch synchronously, a read-around at a time,
        before the first decode; cold loads were the sum of the read and the decode.)"""
        ok = [False] * len(keys)
        corrupt: list[bytes] = []

        def decode(i: int, rec) -> None:
            try:
                self.codec.decode(rec, outs[i])  # straight from the map: one copy
                ok[i] = True
            except (CorruptEntryError, ValueError):
                corrupt.append(keys[i])

        try:
            with self.env.reading() as txn:
                asked: deque = deque()  # (i, record): requested, not decoded yet
                ahead = 0
                for i, key in enumerate(keys):
                    if now is not None and self._live_meta(txn, key, now) is None:
                        continue
                    rec = txn.get(key, db=self._schema.records)
                    if rec is None:
                        continue
                    will_need((rec,))
                    asked.append((i, rec))
                    ahead += len(rec)
                    while ahead - len(asked[0][1]) >= READ_AHEAD:  # the rest is asked ahead
                        j, r = asked.popleft()
                        ahead -= len(r)
                        decode(j, r)
                for j, r in asked:
                    decode(j, r)
        except READ_FAULTS:
            self.metrics.add("io_errors", tier=self.name)
        if corrupt:
            self.metrics.add("corrupt_records", len(corrupt), tier=self.name)
            self._delete(corrupt, "corrupt")
        return ok

    def read_record(self, key: bytes) -> tuple[bytes, EntryMeta] | None:
        """A copy of the raw record and its metadata (for tools), or None."""
        with self.env.reading() as txn:
            rec, meta = txn.get(key, db=self._schema.records), self._schema.get_meta(txn, key)
            if rec is None or meta is None:
                return None
            return bytes(rec), meta

    def entries(self) -> list[tuple[bytes, EntryMeta]]:
        """Every entry's key and metadata, in key order (one read transaction)."""
        with self.env.reading() as txn:
            return [(bytes(k), unpack_meta(v)) for k, v in txn.cursor(db=self._schema.meta)]

    def usage(self) -> TierUsage:
        with self.env.reading() as txn:
            t = Totals.read(txn, self._schema.info)
            self._adopt_settings(txn)
        return TierUsage(t.entries, t.used, t.raw, self.capacity_bytes)

    # -- writes ------------------------------------------------------------------------------
    def _lru_scan(self, txn, now: float, skip: set[bytes]):
        """Unpinned (key, meta) in eviction order, excluding ``skip``."""
        for key in self._schema.lru_keys(txn):
            if key in skip:
                continue
            meta = self._schema.get_meta(txn, key)
            if meta is not None and not is_pinned(meta, now):
                yield key, meta

    def _victim(self, txn, key: bytes, meta: EntryMeta, reason: str, with_record: bool) -> Evicted:
        """An eviction; with the encoded record when a level below may take it (no re-encode)."""
        rec = bytes(txn.get(key, db=self._schema.records)) if with_record else None
        return Evicted(key, meta, None, reason, record=rec)

    def _expire_in(self, txn, now: float, t: Totals, limit: int) -> list[Evicted]:
        gone = []
        for key, meta in self._lru_scan(txn, now, set()):
            if len(gone) >= limit or not is_expired(meta, now, self.ttl_s):
                break
            gone.append(Evicted(key, meta, None, "ttl"))
        for ev in gone:
            self._schema.remove(txn, ev.key, ev.meta, t)
        return gone

    def put_many(self, entries: Sequence[BlockEntry], now: float,
                 on_evict: EvictCallback | None = None) -> list[bool]:
        """Encodes (unless an entry carries its record) and stores ``entries`` in one write
        transaction (see ``Tier.put_many``).

        When the budget cannot hold them all, the deepest blocks are dropped (a batch may mix
        chains, e.g. spilled victims, which come deepest first): a parent is never dropped
        while its child is stored.
        """
        if self.readonly:
            raise PermissionError(f"{self.path}: disk tier opened read-only")
        order = sorted(range(len(entries)), key=lambda i: entries[i].meta.depth)
        if order != list(range(len(entries))):
            stored = self.put_many([entries[i] for i in order], now, on_evict)
            result = [False] * len(entries)
            for i, ok in zip(order, stored):
                result[i] = ok
            return result
        records = []
        self._arena.batch()  # the records live until the transaction below ends
        for e in entries:
            rec = e.record if e.record is not None else self.codec.encode_into(e.block, self._arena.take)
            e.meta.stored_bytes = entry_cost(len(rec))
            records.append(rec)
        with self._lock:
            self.env.check_pid()
            touches = dict(self._pending)
            try:
                stored, evicted = self.env.write(
                    lambda txn: self._put_txn(txn, entries, records, now, touches, on_evict is not None),
                    room=sum(e.meta.stored_bytes for e in entries) + PAGE * len(entries))
            except (LMDBError, OSError) as e:
                self.metrics.add("dropped_writes", len(entries), tier=self.name,
                                 reason=self._count_fault(e))
                return [False] * len(entries)
            self._forget_touches(touches)
        self.metrics.add("dropped_writes", stored.count(False), tier=self.name, reason="capacity")
        self._report(evicted, on_evict)
        return stored

    def _put_txn(self, txn, entries, records, now, touches, with_records):
        self._adopt_settings(txn)
        evicted: list[Evicted] = []
        t = Totals.read(txn, self._schema.info)
        self._apply_touches(txn, touches)
        evicted += self._expire_in(txn, now, t, _EXPIRE_BATCH)
        present = [txn.get(e.key, db=self._schema.meta) is not None for e in entries]
        new_cost = sum(e.meta.stored_bytes for e, p in zip(entries, present) if not p)
        batch = self._protected(txn, entries)
        # Keep as many entries (shallowest first) as the budget allows, then free that room.
        keep = len(entries)
        while keep and new_cost > self.capacity_bytes:
            keep -= 1
            if not present[keep]:
                new_cost -= entries[keep].meta.stored_bytes
        need = t.used + new_cost - self.capacity_bytes
        if need > 0:
            victims = []
            for key, meta in self._lru_scan(txn, now, batch):
                if need <= 0:
                    break
                victims.append(self._victim(txn, key, meta, "capacity", with_records))
                need -= meta.stored_bytes
            while need > 0 and keep:  # pinned blocks fill the budget: drop the tail instead
                keep -= 1
                if not present[keep]:
                    need -= entries[keep].meta.stored_bytes
            for ev in victims:
                self._schema.remove(txn, ev.key, ev.meta, t)
            evicted += victims
        stored = []
        for i, (e, rec) in enumerate(zip(entries, records)):
            if present[i] or i < keep:
                if not present[i]:
                    self._schema.insert(txn, e.key, rec, e.meta, t)
                stored.append(True)
            else:
                stored.append(False)
        t.save(txn, self._schema.info)
        return stored, evicted

    def _protected(self, txn, entries) -> set[bytes]:
        """The batch and every ancestor of it: evicting a parent would orphan the batch."""
        keep = {e.key for e in entries}
        for e in entries:
            parent = e.meta.parent
            while parent and parent not in keep:
                keep.add(parent)
                meta = self._schema.get_meta(txn, parent)
                parent = meta.parent if meta is not None else b""
        return keep

    def _report(self, evicted: list[Evicted], on_evict: EvictCallback | None) -> None:
        for reason in {ev.reason for ev in evicted}:
            self.metrics.add("evictions", sum(ev.reason == reason for ev in evicted),
                             tier=self.name, reason=reason)
        if on_evict is not None and evicted:
            on_evict(evicted)

    def touch_many(self, keys: Sequence[bytes], now: float) -> None:
        with self._lock:
            for key in keys:
                self._pending[key] = now

    def flush(self) -> None:
        """Writes pending last-access times (one write transaction), then syncs: every block
        stored, removed or pinned before ``flush`` survives an OS crash. The last-access times
        are not waited for: the next commit, or ``close``, carries them to the disk (an OS crash
        before then makes those blocks look older, nothing else). No disk work when a later
        commit (the store's counters, written first) carried the blocks already. An I/O fault
        is counted, never raised."""
        if self.readonly:
            return
        with self._lock:
            self.env.check_pid()
            touches = dict(self._pending)

            def txn_fn(txn):
                self._apply_touches(txn, touches)
                return True
            if touches and self._locked_write(txn_fn, False, durable=False):
                self._forget_touches(touches)
            try:
                self.env.sync()
            except (LMDBError, OSError):
                self.metrics.add("io_errors", tier=self.name)

    def pin_many(self, keys: Sequence[bytes], until: float) -> int:
        def txn_fn(txn):
            n = 0
            for key in keys:
                old = self._schema.get_meta(txn, key)
                if old is not None:
                    new = dataclasses.replace(old, pinned_until=max(old.pinned_until, until))
                    self._schema.set_meta(txn, key, old, new)
                    n += 1
            return n
        return self._locked_write(txn_fn, 0)

    def _delete(self, keys: Sequence[bytes], reason: str) -> list[Evicted]:
        """Removes ``keys`` for good, logging them for other processes' RAM tiers."""
        def txn_fn(txn):
            t, gone = Totals.read(txn, self._schema.info), []
            for key in keys:
                meta = self._schema.get_meta(txn, key)
                if meta is not None:
                    self._schema.remove(txn, key, meta, t)
                    gone.append(Evicted(key, meta, None, reason))
            t.save(txn, self._schema.info)
            if gone:
                self.removals.log(txn, [ev.key for ev in gone])
            return gone
        with self._lock:
            for key in keys:
                self._pending.pop(key, None)
            gone = self._locked_write(txn_fn, [])
        self._report(gone, None)
        return gone

    def delete_many(self, keys: Sequence[bytes]) -> int:
        return len(self._delete(keys, "purge"))

    def purge(self, select: Callable[[bytes, EntryMeta], bool], now: float,
              reason: str = "purge") -> list[Evicted]:
        chosen = [k for k, m in self.entries() if select(k, m)]
        gone = []
        for i in range(0, len(chosen), _PURGE_BATCH):  # bounded write transactions
            gone += self._delete(chosen[i:i + _PURGE_BATCH], reason)
        if reason == "corrupt" and gone:  # a repair: the records failed their checksums
            self.metrics.add("corrupt_records", len(gone), tier=self.name)
        return gone

    def expire(self, now: float) -> list[Evicted]:
        with self._lock:
            self.env.check_pid()
            touches = dict(self._pending)

            def txn_fn(txn):  # recent uses first: they decide what is idle
                self._adopt_settings(txn)
                self._apply_touches(txn, touches)
                t = Totals.read(txn, self._schema.info)
                gone = self._expire_in(txn, now, t, 1 << 62)
                t.save(txn, self._schema.info)
                return gone
            gone = self._locked_write(txn_fn, None)
            if gone is None:
                return []
            self._forget_touches(touches)
        self._report(gone, None)
        return gone

    def close(self) -> None:
        """Writes pending touches; closes the environment if this tier opened it."""
        self.flush()
        if self._owns_env:
            self.env.close()
