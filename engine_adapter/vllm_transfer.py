"""The vLLM connector's worker side off the engine step: loads and saves on its own threads.

``Transfers`` takes load and save orders from the engine thread and returns at once; its threads
move the KV between the store and vLLM's paged cache through staging buffers allocated once
(pinned when CUDA is present). The engine thread only learns what finished
(``take_finished``), which vLLM turns into "this request may run now" (loads) and "these blocks
may be freed now" (saves of finished requests).

Why it is safe to touch vLLM's blocks from another thread while the engine runs:

- a load writes blocks vLLM allocated for a request that waits for that load
  (``WAITING_FOR_REMOTE_KVS``): nothing reads or writes them until the load is reported done;
- a save reads full prompt blocks, which vLLM never rewrites while the request holds them; a
  finished request keeps them until its saves are reported (``request_finished`` delays the
  free), and a preempted one, whose blocks vLLM may hand to another request in this very step,
  is waited for in ``wait_for_requests`` before the step's forward pass (rare: preemption).

``BlockCopier`` does the copies between staging and vLLM's blocks: on CUDA ``non_blocking`` on
a dedicated stream, ordered after the engine's stream by an event, and the worker thread waits
on an event for its own copies; on the CPU one indexed copy per layer (the copies are done when
it returns, so no stream or event is needed).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import torch

from kvstore import KVStore
from kvstore.copies import copy_block, fill_zero



class BlockCopier:
    """Copies between a staging buffer of store blocks and vLLM's per-layer paged caches.

    A store block is ``(layers, per_block, *vllm_block_shape)``: ``per_block`` consecutive vLLM
    blocks of every layer. ``kv_caches[layer][vllm_block_id]`` is one vLLM block.
    """

    def __init__(self, kv_caches: Sequence[torch.Tensor], per_block: int):
        self.kv_caches = list(kv_caches)
        self.per_block = per_block
        first = self.kv_caches[0]
        self.block_shape = (len(self.kv_caches), per_block, *first.shape[1:])
        self.dtype = first.dtype
        self.cuda = first.is_cuda and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device=first.device) if self.cuda else None

    def staging(self, blocks: int) -> torch.Tensor:
        """A host buffer of ``blocks`` store blocks, pinned on CUDA, touched once now."""
        buf = torch.empty((blocks, *self.block_shape), dtype=self.dtype, pin_memory=self.cuda)
        fill_zero(buf)
        return buf

    def step_done(self) -> torch.cuda.Event | None:
        """Called on the engine thread after the step's forward: an event the copy stream waits
        for before reading the blocks this step wrote (None on the CPU, where the forward has
        finished when the engine thread gets here)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.kv_caches[0].device))
        return ev

    def _run(self, copies: Callable[[], None], after: torch.cuda.Event | None) -> None:
        if not self.cuda:
            copies()
            return
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            copies()
        done = torch.cuda.Event()
        done.record(self.stream)
        done.synchronize()  # on this worker thread: the engine's stream never waits on it

    def _pairs(self, vllm_ids: Sequence[int], first: int):
        """(staging block i, slot j, vLLM block id) for vLLM blocks ``first..`` of a run that
        starts at a store block boundary."""
        for k, vid in enumerate(vllm_ids[first:], start=first):
            yield divmod(k, self.per_block) + (vid,)

    def gather(self, vllm_ids: Sequence[int], out: torch.Tensor,
               after: torch.cuda.Event | None = None) -> None:
        """``out[i]`` = store block i of the run ``vllm_ids`` (``len(vllm_ids) // per_block``
        whole store blocks), once the step ``after`` marks has written them."""
        if not self.cuda:
            n = len(vllm_ids) // self.per_block
            for j, ids in self._columns(vllm_ids, 0):
                for layer, kv in enumerate(self.kv_caches):
                    out[:n, layer, j].copy_(kv.index_select(0, ids))
            return

        def copies() -> None:
            for i, j, vid in self._pairs(vllm_ids, 0):
                for layer, kv in enumerate(self.kv_caches):
                    out[i, layer, j].copy_(kv[vid], non_blocking=True)
        self._run(copies, after)

    def scatter(self, src: torch.Tensor, vllm_ids: Sequence[int], first: int) -> None:
        """vLLM blocks ``vllm_ids[first:]`` = their part of the store blocks in ``src`` (the run
        ``vllm_ids`` starts at store block 0 of ``src``); returns when they are in place."""
        if not self.cuda:
            for j, ids, rows in self._columns(vllm_ids, first, rows=True):
                for layer, kv in enumerate(self.kv_caches):
                    kv.index_copy_(0, ids, src[rows, layer, j])
            return

        def copies() -> None:
            for i, j, vid in self._pairs(vllm_ids, first):
                for layer, kv in enumerate(self.kv_caches):
                    kv[vid].copy_(src[i, layer, j], non_blocking=True)
        self._run(copies, None)

    def _columns(self, vllm_ids: Sequence[int], first: int, rows: bool = False):
        """Per slot j of a store block: the vLLM block ids (from ``first``) in that slot, as a
        tensor, and (``rows``) the store blocks they belong to: one indexed copy per layer and
        slot instead of one per vLLM block, so the copy thread holds the GIL a few dozen times
        per load, not thousands (the engine thread needs it between steps)."""
        for j in range(self.per_block):
            picked = [(k // self.per_block, vid) for k, vid in enumerate(vllm_ids)
                      if k >= first and k % self.per_block == j]
            if not picked:
                continue
            ids = torch.tensor([v for _, v in picked], dtype=torch.long)
            if rows:  # consecutive store blocks: a slice, no copy of the source
                yield j, ids, slice(picked[0][0], picked[-1][0] + 1)
            else:
                yield j, ids


@dataclasses.dataclass
class LoadJob:
    req_id: str
    token_ids: list[int]  # whole store blocks covering vllm_ids
    vllm_ids: list[int]  # the request's vLLM blocks [0, end)
    first: int  # vLLM blocks before it are vLLM's own hit: never written
    namespace: str


@dataclasses.dataclass
class SaveJob:
    req_id: str
    token_ids: list[int]  # the first (start_block + blocks) * block_tokens tokens
    vllm_ids: list[int]  # vLLM blocks of store blocks start_block.. (whole store blocks)
    start_block: int
    namespace: str


class Transfers:
    """Loads and saves of one worker, on ``load_threads`` loader threads and one saver thread.

    Args:
        store: the worker's store.
        copier: copies for this worker's KV caches.
        block_tokens: tokens per store block.
        staging_blocks: store blocks per staging buffer (one per loader, one for the saver); a
            load never needs more (the scheduler caps hits to it), a larger save goes in parts.
        visible: called after a save's put; makes the blocks visible to the scheduler's lookups
            where it does not share this store object (a flush, on the saver thread).
        stats: ``add(**sums)`` sink for the connector's counters (called under this lock).
        fault: ``fault(stage, exception)`` for a store fault turned into a miss.
    """

    def __init__(self, store: KVStore, copier: BlockCopier, block_tokens: int, staging_blocks: int,
                 visible: Callable[[], None], stats, fault: Callable[[str, Exception], None],
                 load_threads: int = 2):
        self.store, self.copier, self.bt = store, copier, block_tokens
        self.visible, self.stats, self.fault = visible, stats, fault
        self.block_bytes = (torch.empty((), dtype=copier.dtype).element_size()
                            * torch.Size(copier.block_shape).numel())
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._loads_inflight = 0
        self._finished = 0  # loads and save batches finished so far (wait_for_progress)
        self._load_done: set[str] = set()
        self._load_errors: set[int] = set()
        self._saves_pending: dict[str, int] = {}  # req_id -> save jobs not yet done
        self._saved_reqs: set[str] = set()  # requests that ever had a save (their free waits)
        self._finishing: set[str] = set()  # finished requests whose saves must end first
        self._buffers = [copier.staging(staging_blocks) for _ in range(load_threads)]
        self._free_buffers = list(range(load_threads))
        self._save_buffer = copier.staging(staging_blocks)
        self._loader = concurrent.futures.ThreadPoolExecutor(load_threads, thread_name_prefix="kvstore-vllm-load")
        self._saver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvstore-vllm-save")

    # -- loads -------------------------------------------------------------------------------
    def load(self, job: LoadJob) -> None:
        """Starts ``job``; ``take_finished`` reports it, its failed blocks in ``take_errors``."""
        with self._lock:
            self._loads_inflight += 1
        self._loader.submit(self._load, job)

    def _load(self, job: LoadJob) -> None:
        t0 = time.perf_counter()
        per = self.copier.per_block
        with self._lock:
            slot = self._free_buffers.pop()  # one buffer per loader thread: never empty
        buf = self._buffers[slot]
        loaded, tiers = 0, {}
        try:
            m = self.store.match(job.token_ids, job.namespace)
            n = min(m.num_blocks, buf.shape[0])
            if n < m.num_blocks:  # a leading part is a valid match too
                m = dataclasses.replace(m, keys=m.keys[:n], tiers=m.tiers[:n])
            blocks = self.store.get(m, out=buf) if n else []  # ValueError: another layout
            loaded = min(len(blocks), n)
            stop = min(loaded * per, len(job.vllm_ids))
            if stop > job.first:
                self.copier.scatter(buf, job.vllm_ids[:stop], job.first)
            for t in m.tiers[:loaded]:
                tiers[t] = tiers.get(t, 0) + self.bt
        except Exception as e:  # best effort: what did not load is recomputed by vLLM
            self.fault("load", e)
            loaded, tiers = 0, {}
        finally:
            # Always reported, or the request would wait for its KV forever.
            done_blocks = max(0, min(loaded * per, len(job.vllm_ids)) - job.first)
            failed = job.vllm_ids[max(loaded * per, job.first):]
            with self._lock:
                self._free_buffers.append(slot)
                self._load_errors.update(failed)
                self._load_done.add(job.req_id)
                self._loads_inflight -= 1
                self._finished += 1
                self._idle.notify_all()
            self.stats.add(loaded_tokens=done_blocks * (self.bt // per),
                           loaded_bytes=done_blocks * self.block_bytes // per,
                           load_seconds=time.perf_counter() - t0, loads=1,
                           failed_blocks=-(-len(failed) // per), hit_tokens=tiers)

    # -- saves -------------------------------------------------------------------------------
    def save(self, jobs: Sequence[SaveJob]) -> None:
        """Queues this step's saves; ``after`` ordering on CUDA comes from the copier's event."""
        if not jobs:
            return
        after = self.copier.step_done()
        with self._lock:
            for j in jobs:
                self._saves_pending[j.req_id] = self._saves_pending.get(j.req_id, 0) + 1
                self._saved_reqs.add(j.req_id)
        self._saver.submit(self._save, list(jobs), after)

    def _save(self, jobs: list[SaveJob], after) -> None:
        t0 = time.perf_counter()
        tokens = 0
        per, cap = self.copier.per_block, self._save_buffer.shape[0]
        try:
            for job in jobs:
                try:
                    n = len(job.vllm_ids) // per
                    for a in range(0, n, cap):  # parts of a staging buffer each
                        b = min(n, a + cap)
                        self.copier.gather(job.vllm_ids[a * per:b * per], self._save_buffer, after)
                        # put copies the blocks before it returns: the buffer is free again.
                        new = self.store.put(job.token_ids[:(job.start_block + b) * self.bt],
                                             list(self._save_buffer[:b - a]),
                                             namespace=job.namespace, start_block=job.start_block + a)
                        tokens += new * self.bt
                except Exception as e:  # best effort: a dropped save is a future miss
                    self.fault("store", e)
            self.visible()
        except Exception as e:
            self.fault("flush", e)
        finally:
            self._saved(jobs, tokens, time.perf_counter() - t0)

    def _saved(self, jobs: list[SaveJob], tokens: int, seconds: float) -> None:
        with self._lock:
            for job in jobs:
                self._saves_pending[job.req_id] -= 1
                if not self._saves_pending[job.req_id]:
                    del self._saves_pending[job.req_id]
            self._finished += 1
            self._idle.notify_all()
        self.stats.add(stored_tokens=tokens, store_seconds=seconds)

    # -- what finished -----------------------------------------------------------------------
    def take_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(finished requests whose saves are all done: vLLM may free their blocks, requests
        whose load completed); ``finished_req_ids`` are the requests vLLM finished since the
        last call. Failed blocks of the reported loads are in ``take_errors`` from now on."""
        with self._lock:
            self._finishing |= finished_req_ids & self._saved_reqs
            sent = {r for r in self._finishing if r not in self._saves_pending}
            self._finishing -= sent
            self._saved_reqs -= sent
            received, self._load_done = self._load_done, set()
            return sent, received

    def take_errors(self) -> set[int]:
        """vLLM blocks of reported loads that hold no valid KV (vLLM recomputes them)."""
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
            return errors

    def wait_for_requests(self, req_ids: set[str]) -> None:
        """Blocks until no save of ``req_ids`` is pending (before vLLM reuses their blocks)."""
        with self._idle:
            self._idle.wait_for(lambda: not (req_ids & self._saves_pending.keys()))

    def wait_for_progress(self, timeout: float) -> bool:
        """Blocks until a load or save in flight finishes, at most ``timeout`` seconds. Returns
        at once, False, when none is in flight or a finished load waits to be reported;
        otherwise True (it waited)."""
        with self._idle:
            if not (self._loads_inflight or self._saves_pending) or self._load_done:
                return False
            seen = self._finished
            self._idle.wait_for(lambda: self._finished != seen, timeout)
            return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Blocks until no load or save is in flight; False if ``timeout`` ran out."""
        with self._idle:
            return self._idle.wait_for(
                lambda: not self._saves_pending and not self._loads_inflight, timeout)

    def close(self) -> None:
        self._loader.shutdown(wait=True)
        self._saver.shutdown(wait=True)
