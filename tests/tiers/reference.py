"""A dict-backed reference tier: the ``Tier`` protocol done simply and obviously correctly.

Every entry is ``key -> (tensor clone, EntryMeta)``. Eviction order is the ordering rule of
eviction.py written out: the unpinned entry with the smallest ``(last_access, -depth)`` goes
first. Budget: ``capacity_blocks`` blocks. No speed, no locking, no layout: it exists so that the
contract suite (test_tier_contract.py) is known to be satisfiable, and as a model to compare
real tiers against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from kvstore.eviction import EntryMeta, is_expired, is_pinned
from kvstore.tiers.base import BlockEntry, Evicted, EvictCallback, TierUsage


class ReferenceTier:
    """Blocks in a dict, held within ``capacity_blocks`` blocks, idle TTL ``ttl_s``, pins."""

    name = "reference"
    slow = False
    shared = False
    networked = False
    device = torch.device("cpu")

    def __init__(self, capacity_blocks: int, ttl_s: float):
        self.capacity_blocks = capacity_blocks
        self.ttl_s = ttl_s
        self.block_nbytes = 0
        self._data: dict[bytes, tuple[torch.Tensor, EntryMeta]] = {}

    def configure(self, block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if self.block_nbytes:
            return
        nbytes = torch.empty((), dtype=dtype).element_size()
        for d in block_shape:
            nbytes *= d
        self.block_nbytes = nbytes

    # -- reads -----------------------------------------------------------------------------
    def _live(self, key: bytes, now: float | None) -> bool:
        held = self._data.get(key)
        return held is not None and (now is None or not is_expired(held[1], now, self.ttl_s))

    def contains_many(self, keys: Sequence[bytes], now: float, stop_at_miss: bool = False) -> list[bool]:
        out = []
        for key in keys:
            out.append(self._live(key, now))
            if stop_at_miss and not out[-1]:
                break
        return out

    def get_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor],
                 now: float | None = None) -> list[bool]:
        ok = []
        for key, out in zip(keys, outs):
            hit = self._live(key, now)
            if hit:
                out.copy_(self._data[key][0])
            ok.append(hit)
        return ok

    def entries(self) -> list[tuple[bytes, EntryMeta]]:
        return [(k, dataclasses.replace(m)) for k, (_, m) in self._data.items()]

    def usage(self) -> TierUsage:
        n = len(self._data)
        return TierUsage(n, n * self.block_nbytes, n * self.block_nbytes,
                         self.capacity_blocks * self.block_nbytes)

    # -- writes ----------------------------------------------------------------------------
    def _remove(self, keys: Sequence[bytes], reason: str, on_evict: EvictCallback | None) -> list[Evicted]:
        gone = [Evicted(k, self._data[k][1], self._data[k][0], reason) for k in keys]
        if on_evict is not None and gone:
            on_evict(gone)  # the data is still ours: readable during the callback
        for ev in gone:
            del self._data[ev.key]
            ev.block = None
        return gone

    def _ancestors_and_batch(self, entries: Sequence[BlockEntry]) -> set[bytes]:
        keep = {e.key for e in entries}
        for e in entries:
            parent = e.meta.parent
            while parent and parent not in keep:
                keep.add(parent)
                held = self._data.get(parent)
                parent = held[1].parent if held is not None else b""
        return keep

    def put_many(self, entries: Sequence[BlockEntry], now: float,
                 on_evict: EvictCallback | None = None) -> list[bool]:
        if not self.block_nbytes:
            return [False] * len(entries)
        self._remove([k for k, (_, m) in self._data.items() if is_expired(m, now, self.ttl_s)],
                     "ttl", on_evict)
        new: list[BlockEntry] = []
        for e in sorted(entries, key=lambda e: e.meta.depth):  # parents before children
            if e.key not in self._data and all(e.key != n.key for n in new):
                new.append(e)
        need = len(self._data) + len(new) - self.capacity_blocks
        if need > 0:
            protect = self._ancestors_and_batch(entries)
            candidates = sorted(
                ((m.last_access, -m.depth), k) for k, (_, m) in self._data.items()
                if k not in protect and not is_pinned(m, now))
            self._remove([k for _, k in candidates[:need]], "capacity", on_evict)
        room = self.capacity_blocks - len(self._data)
        for e in new[:max(room, 0)]:
            meta = dataclasses.replace(e.meta, stored_bytes=self.block_nbytes)
            self._data[e.key] = (e.block.detach().to("cpu", copy=True).contiguous(), meta)
        return [e.key in self._data for e in entries]

    def touch_many(self, keys: Sequence[bytes], now: float) -> None:
        for key in keys:
            held = self._data.get(key)
            if held is not None:
                held[1].last_access = now

    def pin_many(self, keys: Sequence[bytes], until: float) -> int:
        n = 0
        for key in keys:
            held = self._data.get(key)
            if held is not None:
                held[1].pinned_until = max(held[1].pinned_until, until)
                n += 1
        return n

    def delete_many(self, keys: Sequence[bytes]) -> int:
        return len(self._remove([k for k in keys if k in self._data], "purge", None))

    def purge(self, select: Callable[[bytes, EntryMeta], bool], now: float,
              reason: str = "purge") -> list[Evicted]:
        return self._remove([k for k, (_, m) in self._data.items() if select(k, m)], reason, None)

    def expire(self, now: float) -> list[Evicted]:
        return self._remove([k for k, (_, m) in self._data.items() if is_expired(m, now, self.ttl_s)],
                            "ttl", None)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._data.clear()
