"""SlabTier: blocks in one preallocated tensor of fixed-size slots (the host and device tiers).

The slab is allocated and touched once, when the block layout is known, because copies into
fresh memory were measured 10x slower than into touched memory on these machines. On the host
the slab is pinned only when CUDA is present (``pin_memory=True`` raises without it). Budget:
``capacity_bytes // block_nbytes`` slots; eviction is LRU with idle TTL and pins (eviction.py).

A slot can be leased (``lease``): the write-behind queue then writes the block to the slow tiers
from the slot itself instead of from a copy of its own. A leased slot whose block is dropped
is not reused until its last lease is released.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence

from ..copies import copy_block, fill_zero
from ..eviction import EntryMeta, LRUIndex, is_expired
from ..lazy_torch import torch
from ..metrics import Metrics
from .base import BlockEntry, Evicted, EvictCallback, TierUsage


class SlabTier:
    """A fixed-slot tier on one torch device.

    Args:
        name: ``"host"`` or ``"device"``: used in stats and metrics.
        capacity_bytes: budget; the slab holds ``capacity_bytes // block_nbytes`` blocks.
        ttl_s: idle time after which a block is no longer served.
        device: torch device of the slab.
        pin_memory: pin a CPU slab (only honoured when CUDA is available).
    """

    slow = False
    shared = False
    networked = False

    def __init__(self, name: str, capacity_bytes: int, ttl_s: float, device: str | torch.device = "cpu",
                 pin_memory: bool = True, metrics: Metrics | None = None):
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.ttl_s = ttl_s
        self.device = torch.device(device)
        self.pin_memory = pin_memory and self.device.type == "cpu" and torch.cuda.is_available()
        self.metrics = metrics or Metrics()
        self._lock = threading.RLock()
        self._index = LRUIndex()
        self._slot_of: dict[bytes, int] = {}
        self._free: list[int] = []
        self._leases: dict[int, int] = {}  # slot -> leases not yet released
        self._retired: set[int] = set()  # leased slots whose block was dropped
        self._pid = os.getpid()
        self._slab: torch.Tensor | None = None
        self.block_nbytes = 0

    def configure(self, block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Allocates the slab for blocks of ``block_shape``/``dtype`` (once per tier)."""
        with self._lock:
            if self._slab is not None:
                return
            nbytes = torch.empty((), dtype=dtype).element_size()
            for d in block_shape:
                nbytes *= d
            slots = self.capacity_bytes // nbytes
            self._slab = torch.empty((slots, *block_shape), dtype=dtype, device=self.device,
                                     pin_memory=self.pin_memory)
            fill_zero(self._slab)  # touch every page now, not on the engine's first puts
            self._free = list(range(slots - 1, -1, -1))
            self.block_nbytes = nbytes

    @property
    def slots(self) -> int:
        return 0 if self._slab is None else self._slab.shape[0]

    def contains_many(self, keys: Sequence[bytes], now: float, stop_at_miss: bool = False) -> list[bool]:
        out = []
        with self._lock:
            for key in keys:
                meta = self._index.get(key)
                hit = meta is not None and not is_expired(meta, now, self.ttl_s)
                out.append(hit)
                if stop_at_miss and not hit:
                    break
        return out

    def get_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor],
                 now: float | None = None) -> list[bool]:
        ok = []
        with self._lock:
            for key, out in zip(keys, outs):
                slot = self._slot_of.get(key)
                if slot is not None and now is not None and is_expired(self._index.get(key), now, self.ttl_s):
                    slot = None
                if slot is not None:
                    copy_block(out, self._slab[slot])
                ok.append(slot is not None)
        return ok

    def view(self, key: bytes) -> torch.Tensor | None:
        """The slot holding ``key`` (valid until the next write to this tier), or None."""
        with self._lock:
            slot = self._slot_of.get(key)
            return None if slot is None else self._slab[slot]

    def lease(self, key: bytes) -> tuple[torch.Tensor, Callable[[], None]] | None:
        """The slot holding ``key`` and its release (call it once): until released the slot
        keeps the block's bytes, even if the block is dropped meanwhile. None if not held."""
        with self._lock:
            self._check_pid()
            slot = self._slot_of.get(key)
            if slot is None:
                return None
            self._leases[slot] = self._leases.get(slot, 0) + 1
            pid, held = self._pid, [True]

            def release() -> None:
                with self._lock:
                    if not held or self._pid != pid or self._slab is None:
                        return  # released already, or a lease of another process or a closed tier
                    held.clear()
                    left = self._leases.pop(slot) - 1
                    if left:
                        self._leases[slot] = left
                    elif slot in self._retired:
                        self._retired.discard(slot)
                        self._free.append(slot)
            return self._slab[slot], release

    def _check_pid(self) -> None:
        """In a forked child the parent's write queues did not come along, nor will their
        releases: every slot is free of leases."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._free.extend(self._retired)
            self._retired.clear()
            self._leases.clear()

    def put_many(self, entries: Sequence[BlockEntry], now: float,
                 on_evict: EvictCallback | None = None) -> list[bool]:
        with self._lock:
            self._check_pid()
            if self._slab is None or not entries:
                return [False] * len(entries)
            self._drop(self._index.expired(now, self.ttl_s), "ttl", on_evict)
            # Shallowest first: when slots run short the chain keeps its head (spilled victims
            # arrive deepest first).
            new = sorted((e for e in entries if e.key not in self._slot_of), key=lambda e: e.meta.depth)
            need = len(new) - len(self._free)
            if need > 0:
                protect = self._protected(entries)
                # A leased block's slot would not come free: keep serving it instead.
                victims = [k for k in self._index.victims(now)
                           if k not in protect and self._slot_of[k] not in self._leases][:need]
                self._drop(victims, "capacity", on_evict)
            # Keep parents when slots run short; insert oldest and deepest first so that, as in
            # the disk tier's rank, a child is evicted before its parent.
            keep = new[:len(self._free)]
            for e in sorted(keep, key=lambda e: (e.meta.last_access, -e.meta.depth)):
                slot = self._free.pop()
                copy_block(self._slab[slot], e.block)
                self._slot_of[e.key] = slot
                e.meta.stored_bytes = self.block_nbytes
                self._index.add(e.key, dataclasses.replace(e.meta))
            return [e.key in self._slot_of for e in entries]

    def _protected(self, entries: Sequence[BlockEntry]) -> set[bytes]:
        """The batch and every ancestor of it: evicting a parent would orphan the batch."""
        keep = {e.key for e in entries}
        for e in entries:
            parent = e.meta.parent
            while parent and parent not in keep:
                keep.add(parent)
                meta = self._index.get(parent)
                parent = meta.parent if meta is not None else b""
        return keep

    def _drop(self, keys: Sequence[bytes], reason: str, on_evict: EvictCallback | None) -> list[Evicted]:
        """Removes ``keys``; ``on_evict`` sees them while their slots still hold the data."""
        gone = [Evicted(k, self._index.get(k), self._slab[self._slot_of[k]], reason) for k in keys]
        self.metrics.add("evictions", len(gone), tier=self.name, reason=reason)
        if on_evict is not None and gone:
            on_evict(gone)
        for ev in gone:
            self._index.remove(ev.key)
            slot = self._slot_of.pop(ev.key)
            if slot in self._leases:
                self._retired.add(slot)  # reused once the lease is released
            else:
                self._free.append(slot)
            ev.block = None  # the slot is free now: its data may be overwritten
        return gone

    def touch_many(self, keys: Sequence[bytes], now: float) -> None:
        with self._lock:
            self._index.touch_path(keys, now)

    def pin_many(self, keys: Sequence[bytes], until: float) -> int:
        n = 0
        with self._lock:
            for key in keys:
                meta = self._index.get(key)
                if meta is not None:
                    meta.pinned_until = max(meta.pinned_until, until)
                    n += 1
        return n

    def delete_many(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            return len(self._drop([k for k in keys if k in self._slot_of], "purge", None))

    def purge(self, select: Callable[[bytes, EntryMeta], bool], now: float,
              reason: str = "purge") -> list[Evicted]:
        with self._lock:
            return self._drop([k for k, m in self._index.items() if select(k, m)], reason, None)

    def expire(self, now: float) -> list[Evicted]:
        with self._lock:
            return self._drop(self._index.expired(now, self.ttl_s), "ttl", None)

    def entries(self) -> list[tuple[bytes, EntryMeta]]:
        with self._lock:
            return [(k, dataclasses.replace(m)) for k, m in self._index.items()]

    def usage(self) -> TierUsage:
        with self._lock:
            n = len(self._slot_of)
            return TierUsage(n, n * self.block_nbytes, n * self.block_nbytes, self.capacity_bytes)

    def flush(self) -> None:
        pass  # nothing outlives the process

    def close(self) -> None:
        with self._lock:
            self._slab = None
            self._slot_of.clear()
            self._index = LRUIndex()
            self._free = []
            self._leases.clear()
            self._retired.clear()
