"""The disk tier's record schema: how one block and the tier's totals are laid out in LMDB.

- ``records``: key -> codec record (self-describing, checksummed: codec.py).
- ``meta``: key -> packed ``EntryMeta`` (``_META``); the hot lookup reads only its two times.
- ``lru``: ``lru_rank(last_access, depth) || key`` -> b"": iteration order is eviction order.
- ``info`` / ``totals``: bytes counted against the budget, entries, raw bytes, kept with every
  change in the same transaction (``Totals.add``/``Totals.remove``, the only two writers).

Pure functions over transactions: no ``lmdb`` import (env.py owns the environment).
"""

from __future__ import annotations

import dataclasses
import struct

from ...eviction import EntryMeta, lru_rank

_META = struct.Struct("<QIdddQQ16s")
TIMES = struct.Struct("<dd")  # last_access, pinned_until inside _META
TIMES_AT = 20
_TOTALS = struct.Struct("<QQQ")
ENTRY_OVERHEAD = _META.size + 3 * 16 + 12 + 64  # keys, meta, lru row, LMDB node headers


def entry_cost(record_len: int) -> int:
    """Bytes an entry counts against the disk budget."""
    return record_len + ENTRY_OVERHEAD


def pack_meta(m: EntryMeta) -> bytes:
    return _META.pack(m.namespace_id, m.depth, m.created, m.last_access, m.pinned_until,
                      m.raw_bytes, m.stored_bytes, m.parent.ljust(16, b"\0"))


def unpack_meta(buf) -> EntryMeta:
    ns, depth, created, last, pinned, raw, stored, parent = _META.unpack(buf)
    return EntryMeta(ns, depth, parent if depth else b"", created, last, raw, stored, pinned)


@dataclasses.dataclass
class Totals:
    """The tier's running totals; read and saved inside the transaction that changes them."""

    used: int = 0
    entries: int = 0
    raw: int = 0

    @classmethod
    def read(cls, txn, info_db) -> Totals:
        raw = txn.get(b"totals", db=info_db)
        return cls(*_TOTALS.unpack(raw)) if raw else cls()

    def save(self, txn, info_db) -> None:
        txn.put(b"totals", _TOTALS.pack(self.used, self.entries, self.raw), db=info_db)

    def add(self, meta: EntryMeta) -> None:
        self.used += meta.stored_bytes
        self.entries += 1
        self.raw += meta.raw_bytes

    def remove(self, meta: EntryMeta) -> None:
        self.used -= meta.stored_bytes
        self.entries -= 1
        self.raw -= meta.raw_bytes


class Schema:
    """Row operations on the tier's databases of ``env`` (handles are looked up on use: a
    forked child's reopened environment has new ones)."""

    def __init__(self, env):
        self._dbs = lambda: env.dbs

    records = property(lambda self: self._dbs()[b"records"])
    meta = property(lambda self: self._dbs()[b"meta"])
    lru = property(lambda self: self._dbs()[b"lru"])
    info = property(lambda self: self._dbs()[b"info"])

    def get_meta(self, txn, key: bytes) -> EntryMeta | None:
        raw = txn.get(key, db=self.meta)
        return None if raw is None else unpack_meta(raw)

    def set_meta(self, txn, key: bytes, old: EntryMeta | None, new: EntryMeta) -> None:
        """Writes ``new`` and moves the key's LRU row from ``old``'s rank to ``new``'s."""
        if old is not None:
            txn.delete(lru_rank(old.last_access, old.depth) + key, db=self.lru)
        txn.put(lru_rank(new.last_access, new.depth) + key, b"", db=self.lru)
        txn.put(key, pack_meta(new), db=self.meta)

    def insert(self, txn, key: bytes, record, meta: EntryMeta, t: Totals) -> None:
        txn.put(key, record, db=self.records)
        self.set_meta(txn, key, None, meta)
        t.add(meta)

    def remove(self, txn, key: bytes, meta: EntryMeta, t: Totals) -> None:
        txn.delete(key, db=self.records)
        txn.delete(key, db=self.meta)
        txn.delete(lru_rank(meta.last_access, meta.depth) + key, db=self.lru)
        t.remove(meta)

    def lru_keys(self, txn):
        """Keys in eviction order (oldest, deepest first)."""
        for rank_key, _ in txn.cursor(db=self.lru):
            yield bytes(rank_key[-16:])
