"""The contract every tier meets: batch methods over 16-byte block keys.

A tier owns its medium, its budget and its eviction order; the store (a loop over an ordered
list of tiers, fastest first) decides lookup order, promotion and spill. Methods never raise for
faults inside the tier (I/O errors, corrupt records, an unreachable server): those become misses
or dropped writes, reported through the return values and the tier's counters. Bad arguments
raise ValueError. tests/tiers/test_tier_contract.py holds the suite every tier passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ..eviction import EntryMeta
from ..lazy_torch import torch


@dataclasses.dataclass(slots=True)
class BlockEntry:
    """One block to store: its key, its data, and its metadata.

    ``record`` is the block already encoded (a victim spilled from a tier that stores records):
    a tier that stores records takes it as it is; ``block`` may then be None. ``release``: the
    block is a leased RAM-tier slot (``SlabTier.lease``); a write queue writes it from there,
    without a copy, and calls ``release`` once when done with it.
    """

    key: bytes
    block: torch.Tensor | None
    meta: EntryMeta
    record: bytes | None = None
    release: Callable[[], None] | None = None


@dataclasses.dataclass(slots=True)
class Evicted:
    """A block a tier dropped. ``block`` is valid only during the ``on_evict`` callback;
    ``record`` (tiers that store records, when ``on_evict`` was given) stays valid."""

    key: bytes
    meta: EntryMeta
    block: torch.Tensor | None
    reason: str  # "capacity" | "ttl" | "purge" | "corrupt"
    record: bytes | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TierUsage:
    entries: int
    bytes: int  # bytes counted against the budget (stored bytes; compressed on disk)
    raw_bytes: int  # bytes of the blocks as tensors
    budget: int


EvictCallback = Callable[[list[Evicted]], None]


class Tier(Protocol):
    name: str  # in stats and metrics labels
    slow: bool  # writes go through a write-behind queue; loads run on the store's io threads
    shared: bool  # other processes see its blocks (and may purge them)
    networked: bool  # each call is a round trip to a server: only writer threads ask it what it holds
    device: torch.device  # where ``get`` without ``out`` allocates when this tier is on top

    def configure(self, block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """The block layout is known (once): preallocate what the tier needs."""

    def contains_many(self, keys: Sequence[bytes], now: float, stop_at_miss: bool = False) -> list[bool]:
        """Which keys the tier holds and would serve at ``now`` (expired ones are absent).

        With ``stop_at_miss`` the list ends at the first False (a prefix scan).
        """

    def get_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor],
                 now: float | None = None) -> list[bool]:
        """Copies each held block into ``outs[i]``; False where it is missing, expired at ``now``
        or unreadable (a corrupt record is removed and counted)."""

    def put_many(self, entries: Sequence[BlockEntry], now: float, on_evict: EvictCallback | None = None) -> list[bool]:
        """Stores entries, evicting least recently used unpinned blocks to stay in budget; never
        evicts a parent before its child, nor an ancestor of the batch.

        ``on_evict`` sees the victims before their space is reused. Returns, per entry, whether it
        is now held (False: no room, too big, or a fault: a dropped write).
        """

    def touch_many(self, keys: Sequence[bytes], now: float) -> None:
        """Marks a chain of keys (parent first) as used at ``now``; unknown keys are ignored."""

    def pin_many(self, keys: Sequence[bytes], until: float) -> int:
        """Exempts held keys from eviction and expiry until ``until``; returns how many are held."""

    def purge(self, select: Callable[[bytes, EntryMeta], bool], now: float,
              reason: str = "purge") -> list[Evicted]:
        """Removes every entry ``select`` accepts (pins ignored: an operator's purge wins),
        counted as evictions for ``reason`` ("purge", or "corrupt" for a repair)."""

    def expire(self, now: float) -> list[Evicted]:
        """Removes entries idle past the tier's TTL."""

    def entries(self) -> list[tuple[bytes, EntryMeta]]:
        """A snapshot of every entry's key and metadata."""

    def usage(self) -> TierUsage: ...

    def flush(self) -> None:
        """Makes pending metadata (last-access times) durable; a no-op for memory tiers."""

    def close(self) -> None: ...


@runtime_checkable
class Lender(Protocol):
    """A RAM tier whose slots the write queues may write a block from (``SlabTier``)."""

    def lease(self, key: bytes) -> tuple[torch.Tensor, Callable[[], None]] | None:
        """The slot holding ``key`` and its release (called once): until then the slot keeps
        the block's bytes, even if the tier drops the block. None if not held."""
