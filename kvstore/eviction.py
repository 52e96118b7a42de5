"""Eviction policy: LRU within a byte budget, idle TTL, pins. The clock is passed in.

Ordering rule (the invariant the store relies on): among blocks with the same last-access time,
the deeper block (later in its chain) is older. Every use of a block touches its whole path at
one instant, so a parent's last access is never earlier than any child's, and with the depth
tie-break a parent is never evicted or expired before its children: a chain shrinks from its
tail and a surviving block is always reachable.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

_RANK = struct.Struct(">QI")
_MAX_DEPTH = 0xFFFFFFFF


@dataclasses.dataclass(slots=True)
class EntryMeta:
    """What every tier keeps about one block besides its data."""

    namespace_id: int
    depth: int  # block index in its chain: 0 is the first block of a prompt
    parent: bytes  # key of block depth-1; b"" for depth 0
    created: float
    last_access: float
    raw_bytes: int
    stored_bytes: int = 0
    pinned_until: float = 0.0


def is_pinned(meta: EntryMeta, now: float) -> bool:
    return meta.pinned_until > now


def is_live(last_access: float, pinned_until: float, now: float, ttl_s: float) -> bool:
    """Servable: used within ``ttl_s`` or pinned. (Plain floats: the disk tier's hot path.)"""
    return pinned_until > now or now - last_access <= ttl_s


def is_expired(meta: EntryMeta, now: float, ttl_s: float) -> bool:
    """Idle longer than ``ttl_s`` and not pinned: never to be served again."""
    return not is_live(meta.last_access, meta.pinned_until, now, ttl_s)


def lru_rank(last_access: float, depth: int) -> bytes:
    """A byte string that sorts in eviction order (oldest first, deeper first on ties)."""
    return _RANK.pack(int(last_access * 1_000_000), _MAX_DEPTH - depth)


class MonotonicClock:
    """Wraps a wall clock so that it never goes backwards within a process.

    Wall time (not ``time.monotonic``) because last-access times outlive the process on disk.
    """

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._last = float("-inf")

    def __call__(self) -> float:
        self._last = max(self._last, self._clock())
        return self._last


class LRUIndex:
    """In-memory LRU order of one tier's entries (not thread-safe; the tier locks).

    Iteration order is eviction order. Callers touch a path parent-first; the index applies it
    deepest-first so that parents end up more recent than their children.
    """

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, EntryMeta] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: bytes) -> bool:
        return key in self._order

    def get(self, key: bytes) -> EntryMeta | None:
        return self._order.get(key)

    def add(self, key: bytes, meta: EntryMeta) -> None:
        self._order[key] = meta
        self._order.move_to_end(key)

    def remove(self, key: bytes) -> EntryMeta | None:
        return self._order.pop(key, None)

    def touch_path(self, keys: Iterable[bytes], now: float) -> None:
        """Marks ``keys`` (a chain, parent first) used at ``now``; unknown keys are ignored."""
        for key in reversed(list(keys)):
            meta = self._order.get(key)
            if meta is not None:
                meta.last_access = now
                self._order.move_to_end(key)

    def items(self) -> Iterator[tuple[bytes, EntryMeta]]:
        return iter(list(self._order.items()))

    def expired(self, now: float, ttl_s: float) -> list[bytes]:
        """Keys idle longer than ``ttl_s`` (pins exempt), oldest first."""
        out = []
        for key, meta in self._order.items():
            if is_pinned(meta, now):
                continue
            if not is_expired(meta, now, ttl_s):
                break  # everything after is at least as recent
            out.append(key)
        return out

    def victims(self, now: float) -> Iterator[bytes]:
        """Unpinned keys in eviction order (a snapshot: safe to remove while iterating)."""
        for key, meta in list(self._order.items()):
            if not is_pinned(meta, now):
                yield key
