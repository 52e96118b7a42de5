"""WriteBehind: moves blocks into a slow tier off the caller's thread.

``submit`` copies each block into a preallocated staging slot (a memcpy: fresh allocations were
measured 10x slower) and queues it; background threads take up to ``batch`` queued blocks at a
time and hand them to the tier's ``put_many``, which compresses outside its lock (so the threads
use every core: zstd releases the GIL) and commits one LMDB transaction per batch. A batch is 64
blocks, or ``BATCH_BYTES`` of small blocks: each commit syncs, and the sync, not the bytes, is
what small blocks cost (64-byte blocks in batches of 64 gave about 4 commits a request on the
trace replay, and under 3,000 block writes a second). When no staging
slot is free the block is dropped and counted: the caller never waits for disk I/O.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from .copies import copy_block, fill_zero, plain_cpu
from .lazy_torch import torch
from .metrics import Metrics
from .tiers.base import BlockEntry, EvictCallback, Tier

log = logging.getLogger(__name__)
BATCH_BLOCKS = 64  # most blocks a transaction of large blocks (1.4-8 MiB each)
BATCH_BYTES = 4 << 20  # ... or of small blocks, counted in raw bytes
# ... and never more raw bytes than this: the batch's records fit the disk tier's RecordArena,
# and one writer encodes while the other commits (batches of 64 1.4 MiB blocks split a put
# of 128 as 64, 32, 16, ..., 1: the last commits ran alone, one after the other).
BATCH_MAX_BYTES = 32 << 20


class WriteBehind:
    """A bounded, batching write queue in front of ``tier``.

    Args:
        tier: the tier written to (the disk tier).
        slots: staging capacity in blocks.
        block_shape, dtype: the layout of every block.
        threads: background writer threads.
        clock: the store's clock (for the tier's expiry sweeps).
        metrics: counts drops of a full queue (``dropped_writes{tier,reason=queue_full}``;
            the tier counts its own: capacity, no_space, io_error) and batch times.
        batch: most blocks in one write transaction (default: ``BATCH_BLOCKS``, or as many
            as ``BATCH_BYTES`` hold when that is more, but no more than ``BATCH_MAX_BYTES``
            hold).
        after_batch: called on a writer thread after each batch (the store persists counters).
        on_evict: passed to the tier's ``put_many`` (the store spills victims further down).
    """

    def __init__(self, tier: Tier, slots: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                 threads: int, clock: Callable[[], float], metrics: Metrics, batch: int | None = None,
                 after_batch: Callable[[], None] | None = None, on_evict: EvictCallback | None = None):
        self.tier, self.clock, self.metrics = tier, clock, metrics
        block_bytes = max(1, math.prod(block_shape) * torch.empty((), dtype=dtype).element_size())
        self.batch = batch or min(max(BATCH_BLOCKS, BATCH_BYTES // block_bytes),
                                  max(1, BATCH_MAX_BYTES // block_bytes))
        self._least = max(1, BATCH_BYTES // block_bytes)  # a share is never smaller
        self.after_batch, self.on_evict = after_batch, on_evict
        self._staging = torch.empty((max(slots, 0), *block_shape), dtype=dtype)
        fill_zero(self._staging)
        self._threads_wanted = threads
        self._cond = threading.Condition()
        self._start()

    def _start(self) -> None:
        self._free = list(range(self._staging.shape[0]))
        self._queue: deque[tuple[BlockEntry, int]] = deque()
        self._queued: set[bytes] = set()
        self._inflight = 0
        self._stop = False
        self._threads = [threading.Thread(target=self._run, name=f"kvstore-writer-{i}", daemon=True)
                         for i in range(self._threads_wanted)]
        for t in self._threads:
            t.start()

    def after_fork(self) -> None:
        """In a forked child: the parent's queue and threads did not come along; start afresh."""
        self._cond = threading.Condition()
        self._start()

    def queued(self, key: bytes) -> bool:
        return key in self._queued

    def queued_keys(self) -> set[bytes]:
        """A snapshot of the keys waiting to be written."""
        with self._cond:
            return set(self._queued)

    def submit(self, entries: Sequence[BlockEntry], copy: bool = True) -> list[bool]:
        """Stages and queues ``entries`` (parent first); False where the queue was full.

        The blocks are copied before this returns: the caller may reuse its buffers at once.
        With ``copy=False`` a block in contiguous host memory is queued as it is (still in a
        slot, which bounds the queue's bytes): the caller must not write it again. An entry
        that carries its encoded record (and no block), or a leased slot (``release``), is
        queued as it is, in a slot; a lease is released once written, or at once if not queued.
        """
        ok, unqueued = [], []
        with self._cond:
            for e in entries:
                queued = e.key in self._queued
                if queued or not self._free or self._stop:
                    ok.append(queued)  # a key queued already will be written
                    unqueued.append(e)
                    continue
                slot = self._free.pop()
                if e.block is not None and e.release is None and (copy or not plain_cpu(e.block)):
                    copy_block(self._staging[slot], e.block)
                    e = BlockEntry(e.key, self._staging[slot], e.meta)
                self._queue.append((e, slot))
                self._queued.add(e.key)
                ok.append(True)
            if any(ok):
                self._cond.notify_all()
        _release(unqueued)
        dropped = ok.count(False)
        self.metrics.add("dropped_writes", dropped, tier=self.tier.name, reason="queue_full")
        return ok

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until everything submitted so far is written; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._inflight, timeout)

    def close(self) -> None:
        """Writes what is queued, stops the threads and frees the staging memory."""
        self.flush()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        # Freed now, not when the closed store is collected: the store's reference cycles wait
        # for the GC, and a test that reopened a store kept 256 MiB a reopen (10-24 GB in a CI
        # run, which the kernel killed).
        self._staging = self._staging[:0].clone()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop)
                if not self._queue:
                    return  # stopping and drained
                # A fair share of the queue, so one large put keeps every writer busy (the
                # first thread awake used to take all of 32 8 MiB blocks and encode them alone),
                # but no less than BATCH_BYTES: small blocks cost a commit, not CPU.
                share = max(self._least, -(-len(self._queue) // max(1, self._threads_wanted)))
                items = [self._queue.popleft() for _ in range(min(self.batch, share, len(self._queue)))]
                self._inflight += 1
            t0 = time.perf_counter()
            try:
                entries, now = [e for e, _ in items], self.clock()
                if self.tier.networked:
                    # put() does not ask a server what it holds on the caller's thread: ask
                    # here, in one round trip, and send only what it lacks.
                    held = self.tier.contains_many([e.key for e in entries], now)
                    entries = [e for e, h in zip(entries, held) if not h]
                stored = self.tier.put_many(entries, now, self.on_evict)
                self.metrics.add("stored_blocks", stored.count(True), tier=self.tier.name)
                self.metrics.observe("store_seconds", time.perf_counter() - t0)
                if self.after_batch is not None:
                    self.after_batch()
            except Exception:  # a bug must not kill the writer: count it and go on
                log.exception("kvstore write-behind batch failed")
                self.metrics.add("dropped_writes", len(items), tier=self.tier.name, reason="error")
            finally:
                _release([e for e, _ in items])
                with self._cond:
                    for e, slot in items:
                        self._queued.discard(e.key)
                        self._free.append(slot)
                    self._inflight -= 1
                    self._cond.notify_all()


def _release(entries: Sequence[BlockEntry]) -> None:
    """Releases the leased slots among ``entries`` (the queue is done with them)."""
    for e in entries:
        if e.release is not None:
            e.release()
