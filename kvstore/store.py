"""KVStore: the tiered prefix cache an engine adapter talks to.

The store is a loop over an ordered list of tiers, fastest first (by default device, host,
disk: stack.py), each behind the ``Tier`` protocol (tiers/base.py); it names no concrete tier.
Lookup order is top-down; a block found lower is promoted into every tier above on ``get`` or
``prefetch``. ``put`` copies into the fast tiers and queues writes to the slow ones
(write-behind: it never waits for compression or I/O); a block a tier evicts spills to the tier
below unless it is already there (an encoded record travels down as it is). Every use touches a
block's whole chain at one instant, which with the eviction rule in eviction.py keeps parents
alive at least as long as their children. The store's own records (settings, namespace names,
lifetime counters, the removal log) live in a ``Ledger`` (ledger.py).

Thread-safe: each tier locks itself, and no lock is held across a slow tier's read. Fork-safe: a
store used in a forked child reopens LMDB and restarts its background threads there.

Best effort: faults inside the cache (corrupt record, full disk, I/O errors) become counted
misses or dropped writes and never raise from ``match``/``get``/``put``. Bad arguments raise
ValueError naming what was expected.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import keys as keyslib
from . import lazy_torch
from . import settings
from .codec import DTYPES, dtype_name
from .config import StoreConfig
from .copies import copy_block
from .errors import StoreOpenError
from .eviction import EntryMeta, MonotonicClock
from .lazy_torch import torch
from .ledger import Ledger, MemoryLedger
from .metrics import Metrics
from .stack import open_stack
from .tiers.base import BlockEntry, Evicted, Lender, Tier
from .writeback import WriteBehind


@dataclasses.dataclass(frozen=True)
class Match:
    """The cached prefix of a prompt.

    Attributes:
        namespace: the namespace looked up.
        keys: keys of the matched leading blocks, in order.
        tiers: for each matched block, the name of the highest tier that holds it.
        block_tokens: tokens per block.
        prompt_tokens: length of the prompt that was matched.
        all_keys: keys of every full block of the prompt (for a following ``put``).
    """

    namespace: str
    keys: tuple[bytes, ...]
    tiers: tuple[str, ...]
    block_tokens: int
    prompt_tokens: int
    all_keys: tuple[bytes, ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        """Hit tokens: always a multiple of the block size."""
        return len(self.keys) * self.block_tokens

    @property
    def blocks_by_tier(self) -> dict[str, int]:
        return dict(collections.Counter(self.tiers))


REMOVAL_POLL_S = 1.0  # how stale another process's purge may look to this one's RAM tiers
COUNTERS_EVERY_S = 5.0  # how often write-behind threads persist this process's counters
# Raw bytes a load thread must have to decode for a parallel load to pay: small blocks decode in
# Python under the GIL, and handing them to threads cost more than it spread (the trace replay,
# 64-byte blocks). Large blocks (1.4-8 MiB each) still get a thread a block.
PARALLEL_LOAD_BYTES = 1 << 20


class LoadHandle:
    """A prefetch in flight: ``wait()`` until the matched blocks are in the RAM tiers."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the prefetch finished (True) or ``timeout`` seconds passed (False).

        A prefetch never raises: blocks it could not load are simply not promoted."""
        try:
            self._future.result(timeout)
            return True
        except concurrent.futures.TimeoutError:
            return False

    @property
    def blocks(self) -> int:
        """Blocks the prefetch moved up (0 until it is done)."""
        return self._future.result() if self._future.done() else 0


def _prepare_dir(path: Path, readonly: bool = False) -> None:
    """Creates the store directory owner-only, or checks an existing one is safe to use
    (read-only: it must exist; nothing is created)."""
    if path.exists() and not path.is_dir():
        raise StoreOpenError(f"{path}: exists and is not a directory")
    if readonly and not path.exists():
        raise StoreOpenError(f"{path}: no store here (the directory does not exist)")
    try:
        if not readonly:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StoreOpenError(f"{path}: cannot create the store directory: {e.strerror or e}") from None
    st = path.stat()
    if st.st_uid != os.getuid():
        raise StoreOpenError(
            f"{path}: owned by uid {st.st_uid}, not by this user ({os.getuid()}): refusing to "
            f"load KV another user could have written"
        )
    if st.st_mode & stat.S_IWOTH:
        raise StoreOpenError(
            f"{path}: is world-writable (mode {stat.S_IMODE(st.st_mode):o}); run "
            f"'chmod 700 {path}' or choose another path"
        )
    if not readonly and not os.access(path, os.W_OK | os.X_OK):
        raise StoreOpenError(f"{path}: not writable by this user")


@dataclasses.dataclass(frozen=True)
class PurgePlan:
    """What a purge removes: the blocks its criteria select and every block chained below one
    of them (unreachable once its ancestor is gone), with each one's metadata."""

    selected: frozenset[bytes]
    chained_below: frozenset[bytes]
    meta: dict[bytes, EntryMeta]

    @property
    def keys(self) -> frozenset[bytes]:
        return self.selected | self.chained_below


class KVStore:
    """A tiered, prefix-keyed KV block store. Thread-safe.

    Open with ``KVStore.open(config)``; use as a context manager or call ``close()``.

    Args:
        config: the store's settings; those stored with the data win as settings.py says.
        clock: wall clock (tests pass a fake one).
        metrics: the counters' sink (a new one by default).
        tiers, ledger: an injected tier stack (fastest first) and its ledger, instead of the one
            ``config`` describes (stack.py).
        readonly: inspect only: no RAM tiers, no threads, nothing written (tools; a read-only
            mount); ``put``/``pin``/``purge``/``expire`` raise ValueError.
    """

    def __init__(self, config: StoreConfig, *, clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None, tiers: Sequence[Tier] | None = None,
                 ledger: Ledger | None = None, readonly: bool = False):
        self.metrics = metrics or Metrics()
        self.readonly = readonly
        self._clock = MonotonicClock(clock)
        self._lock = threading.RLock()
        self._closed = False
        if not readonly:
            lazy_torch.load()  # before any thread starts (see lazy_torch)
        _prepare_dir(config.path, readonly)
        if tiers is None:
            stack = open_stack(config, self.metrics, readonly)
            config, tiers, ledger = stack.config, stack.tiers, stack.ledger
        else:
            ledger = ledger if ledger is not None else MemoryLedger()
            config, save = settings.resolve(config, ledger.settings())
            if save and not readonly:
                ledger.save_settings(save)
        self.config = config
        self.tiers: list[Tier] = list(tiers)
        self.ledger = ledger
        self._private = [t for t in self.tiers if not t.shared]
        self._writers: dict[int, WriteBehind] = {}  # level -> its write-behind queue (slow tiers)
        self._removals_seen = ledger.removal_epoch()
        self._removals_checked = time.monotonic()
        self._counters_lock = threading.Lock()
        self._persisted: dict[str, float] = {}
        self._persisted_at = time.monotonic()
        self._start_threads()
        self.block_shape: tuple[int, ...] | None = None
        self._dtype_name: str | None = None
        if config.block_shape is not None and config.dtype is not None:
            self._fix_layout(config.block_shape, config.dtype)

    def tier(self, name: str) -> Tier | None:
        """The tier called ``name`` in this store's stack, or None."""
        return next((t for t in self.tiers if t.name == name), None)

    def _start_threads(self) -> None:
        self._pid = os.getpid()
        n = self.config.io_threads
        self._loaders = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="kvstore-load")
        self._prefetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvstore-prefetch")

    def _check_fork(self) -> None:
        """After fork(): threads did not come along; start them in this process."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._persisted = self.metrics.flat()  # inherited counts are the parent's
                    self._start_threads()
                    for writer in self._writers.values():
                        writer.after_fork()

    @classmethod
    def open(cls, config: StoreConfig, *, clock: Callable[[], float] = time.time,
             metrics: Metrics | None = None, readonly: bool = False) -> KVStore:
        """Opens (creating if needed, unless ``readonly``) the store at ``config.path``.

        Raises:
            StoreOpenError: the path cannot be created or written, or is unsafe; read-only:
                there is no store there.
            IncompatibleFormatError: the store was written by a newer kvstore.
            SettingsMismatchError: ``config`` names another block size or layout than the
                store was created with.
        """
        return cls(config, clock=clock, metrics=metrics, readonly=readonly)

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- layout ------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the store's blocks (None until the layout is known)."""
        return None if self._dtype_name is None else DTYPES[self._dtype_name]

    def _fix_layout(self, shape: tuple[int, ...], name: str) -> None:
        """Fixes the block layout (``name``: the codec's dtype name). A read-only store holds
        the disk tier alone, whose records describe themselves: it configures nothing, so that
        the tools that only read metadata never import torch (lazy_torch)."""
        with self._lock:
            if self.block_shape is not None:
                return
            shape = tuple(shape)
            if not self.readonly:
                dtype = DTYPES[name]
                for tier in self.tiers:
                    tier.configure(shape, dtype)
                nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
                for level, tier in enumerate(self.tiers):
                    if tier.slow:
                        self._writers[level] = WriteBehind(
                            tier, self.config.write_queue_bytes // nbytes, shape, dtype,
                            self.config.io_threads, self._clock, self.metrics,
                            after_batch=self._after_batch,
                            on_evict=self._spill_from(level) if level + 1 < len(self.tiers) else None)
                stored = self.ledger.settings()
                if stored.get("block_shape") is None:
                    self.ledger.save_settings(settings.layout_settings(shape, name))
            self.block_shape, self._dtype_name = shape, name

    def declare_layout(self, block_shape: Sequence[int], dtype: torch.dtype) -> None:
        """Fixes the block layout before the first ``put``, as an engine that knows it does: a
        store with an empty disk can then load blocks that other machines stored (the remote
        tier's records). A no-op when the store already has this layout.

        Raises:
            ValueError: the store (or its config) holds another layout, or an unstorable dtype.
        """
        self._check_open()
        self._check_blocks([torch.empty(tuple(block_shape), dtype=dtype, device="meta")])

    def _learn_layout(self) -> None:
        """Fixes the layout another process stored since this one opened the store."""
        s = self.ledger.settings()
        if s.get("block_shape") is not None and s.get("dtype") in DTYPES:
            self._fix_layout(tuple(s["block_shape"]), s["dtype"])

    def _check_blocks(self, blocks: Sequence[torch.Tensor]) -> None:
        for i, b in enumerate(blocks):
            if not isinstance(b, torch.Tensor):
                raise ValueError(f"blocks[{i}]: expected a torch.Tensor, got {type(b).__name__}")
            if self.block_shape is None:
                dtype_name(b.dtype)  # raises ValueError for a dtype the codec cannot store
                cfg = self.config
                if cfg.block_shape is not None and tuple(b.shape) != cfg.block_shape:
                    raise ValueError(f"blocks[{i}]: expected shape {cfg.block_shape} (config), "
                                     f"got {tuple(b.shape)}")
                if cfg.dtype is not None and dtype_name(b.dtype) != cfg.dtype:
                    raise ValueError(f"blocks[{i}]: expected dtype {cfg.dtype} (config), got {b.dtype}")
                self._fix_layout(tuple(b.shape), dtype_name(b.dtype))
            if tuple(b.shape) != self.block_shape or b.dtype != self.dtype:
                raise ValueError(
                    f"blocks[{i}]: expected shape {self.block_shape} and dtype "
                    f"{dtype_name(self.dtype)} (the store's block layout), got "
                    f"{tuple(b.shape)} and {str(b.dtype).removeprefix('torch.')}"
                )

    def _block_nbytes(self) -> int:
        return int(np.prod(self.block_shape)) * torch.empty((), dtype=self.dtype).element_size()

    # -- lookups -----------------------------------------------------------------------------
    def _ns(self, namespace: str | None) -> str:
        ns = self.config.namespace if namespace is None else namespace
        if not isinstance(ns, str) or not ns:
            raise ValueError(f"namespace: expected a non-empty string, got {ns!r}")
        return ns

    def _check_open(self, writing: bool = False) -> None:
        if self._closed:
            raise ValueError("store is closed")
        if writing and self.readonly:
            raise ValueError(f"{self.config.path}: store opened read-only")
        self._check_fork()

    def match(self, token_ids: Sequence[int] | np.ndarray, namespace: str | None = None,
              touch: bool = True) -> Match:
        """The longest run of leading full blocks of ``token_ids`` held by some tier.

        Counts hit and miss tokens and, with ``touch``, marks the matched chain as used. Reads
        only keys and metadata: no block data moves.

        Raises:
            ValueError: bad token ids or namespace, or the store is closed.
        """
        self._check_open()
        ns = self._ns(namespace)
        all_keys = keyslib.block_keys(ns, token_ids, self.config.block_tokens)
        n_tokens = len(token_ids)
        self._sync_removals()
        now = self._clock()
        held: list[str | None] = [None] * len(all_keys)
        todo = list(range(len(all_keys)))
        for level, tier in enumerate(self.tiers):
            if not todo:
                break
            # The lowest tier is asked only up to its first miss: nothing after can match.
            last = level == len(self.tiers) - 1
            found = tier.contains_many([all_keys[i] for i in todo] if level else all_keys, now,
                                       stop_at_miss=last)
            rest = []
            for i, hit in zip(todo, found):
                if hit:
                    held[i] = tier.name
                else:
                    rest.append(i)
            todo = rest
        n = held.index(None) if None in held else len(held)
        match = Match(ns, tuple(all_keys[:n]), tuple(held[:n]), self.config.block_tokens,
                      n_tokens, tuple(all_keys))
        if touch and n:
            for tier in self.tiers:
                tier.touch_many(match.keys, now)
        for tier, count in match.blocks_by_tier.items():
            self.metrics.add("hit_tokens", count * match.block_tokens, tier=tier)
        self.metrics.add("miss_tokens", n_tokens - match.num_tokens)
        self.metrics.add("requests")
        return match

    def _sync_removals(self, force: bool = False) -> None:
        """Drops from this process's private tiers what another process purged (polled at most
        once a second: one small read)."""
        if not self.ledger.durable or not self._private:
            return
        if not force and time.monotonic() - self._removals_checked < REMOVAL_POLL_S:
            return
        self._removals_checked = time.monotonic()
        try:
            epoch, keys = self.ledger.removals_since(self._removals_seen)
        except Exception:  # best effort: the next poll tries again
            self.metrics.add("io_errors", tier="ledger")
            return
        if epoch == self._removals_seen:
            return
        now = self._clock()
        for tier in self._private:
            tier.purge((lambda k, m: True) if keys is None else (lambda k, m: k in keys), now)
        self._removals_seen = epoch

    def get(self, match: Match, out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Loads the matched blocks, promoting blocks found lower into every tier above.

        Slow tiers' blocks are read and decoded by ``io_threads`` threads in parallel. After a
        completed ``prefetch`` of the same match, only RAM (device) copies remain.

        Args:
            match: from ``match`` on this store.
            out: optional preallocated tensor of shape ``(>= match.num_blocks, *block_shape)``
                (on any device); the returned blocks are views into it. Without it, blocks are
                allocated on the top tier's device (the CPU when there is none).

        Returns:
            One tensor per leading block that could be loaded. Usually ``match.num_blocks`` of
            them; fewer if a block vanished or failed its checksum since ``match`` (a counted
            miss): callers must use ``len(result) * block_tokens`` as the hit length.

        Raises:
            ValueError: ``out`` has the wrong shape or dtype, or the store is closed.
        """
        self._check_open()
        n = match.num_blocks
        if n == 0:
            return []
        t0 = time.perf_counter()
        if self.block_shape is None:
            self._learn_layout()
            if self.block_shape is None:
                return []
        outs = self._outs(n, out)
        now = self._clock()
        source = self._load(match.keys, outs, now)
        loaded = source.index(None) if None in source else n
        raw = self._block_nbytes()
        for level in set(source[:loaded]):  # persisted with the other counters: top's load GB/s
            self.metrics.add("loaded_bytes", source[:loaded].count(level) * raw, tier=self.tiers[level].name)
        if self._promote(match.namespace, match.all_keys, range(loaded), outs, source, now):
            for tier in self.tiers:  # the promoted chain is in use: touch it as one path
                if not tier.slow:
                    tier.touch_many(match.keys[:loaded], now)
        if loaded < n:
            self.metrics.add("load_failed_blocks", n - loaded)
        self.metrics.observe("load_seconds", time.perf_counter() - t0)
        return outs[:loaded]

    def _outs(self, n: int, out: torch.Tensor | None) -> list[torch.Tensor]:
        if out is None:
            device = self.tiers[0].device if self.tiers else "cpu"
            return list(torch.empty((n, *self.block_shape), dtype=self.dtype, device=device))
        if (out.dim() != len(self.block_shape) + 1 or out.shape[0] < n
                or tuple(out.shape[1:]) != self.block_shape or out.dtype != self.dtype):
            raise ValueError(
                f"out: expected a tensor of shape ({n} or more, {', '.join(map(str, self.block_shape))}) "
                f"and dtype {dtype_name(self.dtype)}, got {tuple(out.shape)} and {out.dtype}"
            )
        return [out[i] for i in range(n)]

    def _load(self, keys: Sequence[bytes], outs: list[torch.Tensor], now: float) -> list[int | None]:
        """Fills ``outs[i]`` from the highest tier holding ``keys[i]``; returns each source level
        (None where no tier could supply the block). Tiers are asked top-down, so blocks that a
        prefetch moved up since ``match`` are served from RAM."""
        source: list[int | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for level, tier in enumerate(self.tiers):
            if not todo:
                break
            ks, os_ = [keys[i] for i in todo], [outs[i] for i in todo]
            got = self._load_slow(tier, ks, os_, now) if tier.slow else tier.get_many(ks, os_, now)
            for i, g in zip(todo, got):
                if g:
                    source[i] = level
            todo = [i for i, g in zip(todo, got) if not g]
        return source

    def _load_slow(self, tier: Tier, keys: list[bytes], outs: list[torch.Tensor],
                   now: float) -> list[bool]:
        """Decodes a slow tier's records into ``outs`` with up to ``io_threads`` threads at once,
        so reading one block overlaps decoding another (zstd and LMDB release the GIL)."""
        staging = [o if o.device.type == "cpu" and o.is_contiguous() else torch.empty_like(o, device="cpu")
                   for o in outs]
        parts = min(self.config.io_threads, len(keys),
                    max(1, len(keys) * self._block_nbytes() // PARALLEL_LOAD_BYTES))
        if parts <= 1:
            ok = tier.get_many(keys, staging, now)
        else:
            bounds = [round(i * len(keys) / parts) for i in range(parts + 1)]
            futures = [self._loaders.submit(tier.get_many, keys[a:b], staging[a:b], now)
                       for a, b in zip(bounds, bounds[1:])]
            ok = [g for f in futures for g in f.result()]
        for o, s, g in zip(outs, staging, ok):
            if g and o is not s:
                copy_block(o, s)
        return ok

    def _promote(self, namespace: str, all_keys: Sequence[bytes], positions: Sequence[int],
                 blocks: Sequence[torch.Tensor], source: Sequence[int | None], now: float) -> int:
        """Copies ``blocks[j]`` (block ``positions[j]`` of the chain ``all_keys``), which level
        ``source[j]`` supplied, into every tier above that level (slow ones through their
        write-behind queue); returns the copies made."""
        moved = 0
        for level, tier in enumerate(self.tiers):
            entries = [BlockEntry(all_keys[p], blocks[j], self._meta(namespace, all_keys, p, now))
                       for j, p in enumerate(positions) if source[j] is not None and source[j] > level]
            if not entries:
                continue
            ok = self._write_level(level, entries, now)
            moved += sum(ok)
            self.metrics.add("promoted_blocks", len(entries), tier=tier.name)
        return moved

    def prefetch(self, match: Match) -> LoadHandle:
        """Starts moving the matched blocks up to the top tier in the background.

        Returns a handle to wait on; ``get(match)`` after it completes costs only RAM (device)
        copies. A prefetch never raises: what it cannot load stays where it is.
        """
        self._check_open()

        def job() -> int:
            try:
                if self.block_shape is None and match.num_blocks:
                    self._learn_layout()
                top = self.tiers[0] if self.tiers else None
                if top is None or top.slow or self.block_shape is None:
                    return 0
                now = self._clock()
                missing = [i for i, h in enumerate(top.contains_many(match.keys, now)) if not h]
                if not missing:
                    return 0
                # Stage on the CPU; the promotion copies into the device tier if there is one.
                tmp = [torch.empty(self.block_shape, dtype=self.dtype) for _ in missing]
                source = self._load([match.keys[i] for i in missing], tmp, now)
                moved = self._promote(match.namespace, match.all_keys, missing, tmp, source, now)
                self.metrics.add("prefetched_blocks", moved)
                return moved
            except Exception:  # best effort, like every load
                self.metrics.add("prefetch_errors")
                return 0

        return LoadHandle(self._prefetcher.submit(job))

    def _meta(self, namespace: str, all_keys: Sequence[bytes], i: int, now: float) -> EntryMeta:
        return EntryMeta(
            namespace_id=keyslib.namespace_id(namespace), depth=i,
            parent=all_keys[i - 1] if i else b"", created=now, last_access=now,
            raw_bytes=self._block_nbytes(),
        )

    # -- writes ------------------------------------------------------------------------------
    def _write_level(self, level: int, entries: list[BlockEntry], now: float,
                     copy: bool = True) -> list[bool]:
        """Stores ``entries`` in tier ``level``: queued for a slow tier (False where the queue
        is full; the blocks copied first unless not ``copy``), copied now into a fast one
        (False where it has no room)."""
        if self.tiers[level].slow:
            writer = self._writers.get(level)
            return writer.submit(entries, copy) if writer is not None else [False] * len(entries)
        return self.tiers[level].put_many(entries, now, on_evict=self._spill_from(level))

    def _held(self, level: int, keys: Sequence[bytes], now: float, ask_tier: bool = True) -> list[bool]:
        """Which ``keys`` tier ``level`` holds (unless not ``ask_tier``) or has queued."""
        held = self.tiers[level].contains_many(keys, now) if ask_tier else [False] * len(keys)
        writer = self._writers.get(level)
        if writer is not None:
            held = [h or writer.queued(k) for h, k in zip(held, keys)]
        return held

    def _spill_from(self, level: int) -> Callable[[list[Evicted]], None]:
        """The on_evict callback of tier ``level``: moves capacity victims to the tier below
        unless already there (the block, or a slow tier's encoded record, travels as it is)."""
        def spill(victims: list[Evicted]) -> None:
            if level + 1 >= len(self.tiers):
                return
            victims = [v for v in victims if v.reason == "capacity"
                       and (v.block is not None or v.record is not None)]
            if not victims:
                return
            now = self._clock()
            held = self._held(level + 1, [v.key for v in victims], now)
            down = [BlockEntry(v.key, v.block, v.meta, v.record)
                    for v, h in zip(victims, held) if not h]
            if down:
                self._write_level(level + 1, down, now)
            self.metrics.add("spilled_blocks", len(victims), tier=self.tiers[level].name)
        return spill

    def put(self, token_ids: Sequence[int] | np.ndarray, blocks: Sequence[torch.Tensor],
            namespace: str | None = None, start_block: int = 0, copy: bool = True) -> int:
        """Stores the KV of full blocks of ``token_ids``; returns without waiting for slow I/O.

        Blocks are copied into the fast tiers and into the write-behind queues before this
        returns, so the caller may reuse its buffers: a block the host tier took is written to
        the slow tiers from its slot there (leased until written), any other into a staging
        slot of the queue. ``flush()`` waits for the slow writes.

        Args:
            token_ids: the prompt (and output) the blocks were computed for.
            blocks: ``blocks[j]`` is the KV of block ``start_block + j``; one tensor of the
                store's block shape and dtype each (on any device).
            namespace: defaults to the config's.
            start_block: index of the first block given (the blocks before it are the
                already-cached prefix, typically ``match.num_blocks``).
            copy: False hands the blocks over: the slow tiers' queues keep those in
                contiguous host memory as they are, instead of copying them (a memcpy of
                every block on the caller's thread, before any write starts), and the caller
                must never write them again. For blocks made for this call (the adapters'
                gathered blocks); a reused buffer needs the default.

        Returns:
            How many blocks were newly stored in, or queued for, some tier. Blocks already
            held are skipped (their chain is touched); a block whose parent is no longer held
            is not stored. A full write queue drops slow writes (counted).

        Raises:
            ValueError: blocks of the wrong shape or dtype, more blocks than the full blocks of
                ``token_ids``, bad token ids, or the store is closed or read-only.
        """
        self._check_open(writing=True)
        ns = self._ns(namespace)
        if not isinstance(start_block, int) or start_block < 0:
            raise ValueError(f"start_block: expected an integer >= 0, got {start_block!r}")
        blocks = list(blocks)
        bt = self.config.block_tokens
        full = len(token_ids) // bt
        if start_block + len(blocks) > full:
            raise ValueError(
                f"blocks: token_ids hold {full} full block(s) of {bt} tokens, but "
                f"{len(blocks)} block(s) were given from block {start_block}"
            )
        if not blocks:
            return 0
        t0 = time.perf_counter()
        end = start_block + len(blocks)
        keys = keyslib.block_keys(ns, token_ids, bt, max_blocks=end)
        self._check_blocks(blocks)
        now = self._clock()
        parent = keys[start_block - 1] if start_block else b""
        if parent and not any(self._held(level, [parent], now)[0] for level in range(len(self.tiers))):
            self.metrics.add("orphan_blocks", len(blocks))
            return 0
        ns_id = keyslib.namespace_id(ns)
        self.ledger.register_namespace(ns_id, ns)
        raw = self._block_nbytes()
        new = keys[start_block:end]
        stored = [False] * len(blocks)
        lender = None  # a RAM tier in host memory that took the blocks
        for level, tier in enumerate(self.tiers):
            # A slow tier is touched first, so a held block still on it counts as held (its
            # write would store the same bytes); a fast tier after the insert, so that parents
            # end up newer than their children.
            if tier.slow:
                tier.touch_many(keys[:end], now)
            held = self._held(level, new, now, ask_tier=not tier.networked)
            pos = [j for j in range(len(blocks)) if not held[j]]
            entries = [BlockEntry(new[j], blocks[j],
                                  EntryMeta(ns_id, start_block + j,
                                            keys[start_block + j - 1] if start_block + j else b"",
                                            now, now, raw)) for j in pos]
            if tier.slow and lender is not None and copy:
                # Written from the host tier's slots, leased until written: the block is
                # copied once on this thread, not also into the write queue's staging.
                for e in entries:
                    got = lender.lease(e.key)
                    if got is not None:
                        e.block, e.release = got
            if entries:
                ok = self._write_level(level, entries, now, copy)
                for j, o in zip(pos, ok):
                    stored[j] = stored[j] or o
                if not tier.slow:  # a slow tier counts its own when the write lands
                    self.metrics.add("stored_blocks", ok.count(True), tier=tier.name)
            if not tier.slow:
                tier.touch_many(keys[:end], now)
                if tier.device.type == "cpu" and isinstance(tier, Lender):
                    lender = tier
        self.metrics.observe("put_seconds", time.perf_counter() - t0)
        return sum(stored)

    def pin(self, token_ids: Sequence[int] | np.ndarray, ttl_s: float,
            namespace: str | None = None) -> int:
        """Exempts the cached prefix of ``token_ids`` from eviction and expiry for ``ttl_s``.

        Returns:
            The number of leading blocks pinned (those held now; blocks still in a write
            queue are written first, so the pin reaches every tier).

        Raises:
            ValueError: ``ttl_s`` is not a finite number >= 0, bad token ids, or read-only.
        """
        self._check_open(writing=True)
        if not isinstance(ttl_s, (int, float)) or not np.isfinite(ttl_s) or ttl_s < 0:
            raise ValueError(f"ttl_s: expected a finite number of seconds >= 0, got {ttl_s!r}")
        m = self.match(token_ids, namespace)
        for writer in self._writers.values():
            writer.flush()  # so the slow tiers' copies exist to carry the pin
        until = self._clock() + ttl_s
        for tier in self.tiers:
            tier.pin_many(m.keys, until)
        return m.num_blocks

    def plan_purge(self, older_than_s: float | None = None, idle_longer_than_s: float | None = None,
                   namespace: str | int | None = None, all: bool = False,
                   keys: Sequence[bytes] | None = None) -> PurgePlan:
        """What ``purge`` with the same criteria would remove, in every tier; removes nothing.

        Criteria combine with AND; ``all=True`` alone selects everything; ``namespace`` is a name
        or a namespace id. Blocks chained below a selected block go too: with their ancestor
        gone no prompt can reach them.

        Raises:
            ValueError: no criterion given, or a negative duration.
        """
        self._check_open()
        if not all and older_than_s is None and idle_longer_than_s is None and namespace is None \
                and keys is None:
            raise ValueError("purge: give all=True or at least one of older_than_s, "
                             "idle_longer_than_s, namespace, keys")
        for name, v in (("older_than_s", older_than_s), ("idle_longer_than_s", idle_longer_than_s)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"{name}: expected seconds >= 0, got {v!r}")
        ns_id = keyslib.namespace_id(namespace) if isinstance(namespace, str) else namespace
        keyset = set(keys) if keys is not None else None
        if not self.readonly:
            self.flush()  # queued writes and pending last-access times decide what matches
        now = self._clock()
        meta: dict[bytes, EntryMeta] = {}
        for tier in reversed(self.tiers):  # the top tier's metadata is the most recent
            meta.update(tier.entries())
        selected = {k for k, m in meta.items()
                    if (ns_id is None or m.namespace_id == ns_id)
                    and (keyset is None or k in keyset)
                    and (older_than_s is None or now - m.created > older_than_s)
                    and (idle_longer_than_s is None or now - m.last_access > idle_longer_than_s)}
        children: dict[bytes, list[bytes]] = {}
        for k, m in meta.items():
            if m.parent:
                children.setdefault(m.parent, []).append(k)
        below, todo = set(), list(selected)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in below and child not in selected:
                    below.add(child)
                    todo.append(child)
        return PurgePlan(frozenset(selected), frozenset(below), meta)

    def purge(self, older_than_s: float | None = None, idle_longer_than_s: float | None = None,
              namespace: str | None = None, all: bool = False,
              keys: Sequence[bytes] | None = None, dry_run: bool = False) -> int:
        """Removes blocks from every tier (and, through the removal log, from other processes'
        RAM tiers); the criteria are ``plan_purge``'s, and so is the cascade to blocks chained
        below. Pins do not protect.

        Args:
            older_than_s: created more than this many seconds ago.
            idle_longer_than_s: not used for more than this many seconds.
            namespace: only blocks of this namespace.
            all: everything (alone, or with ``namespace``).
            keys: only these block keys.
            dry_run: count what would be removed, remove nothing.

        Returns:
            The number of distinct blocks removed (or that would be).

        Raises:
            ValueError: no criterion given (``all=True`` is required to remove everything), or
                the store is read-only (unless ``dry_run``).
        """
        plan = self.plan_purge(older_than_s, idle_longer_than_s, namespace, all, keys)
        if dry_run:
            return len(plan.keys)
        return self.remove(plan.keys)

    def remove(self, keys: Sequence[bytes] | frozenset[bytes], reason: str = "purge") -> int:
        """Removes exactly ``keys`` from every tier, counted as evictions for ``reason``
        ("purge"; "corrupt" for records a repair found failing their checksums, which the disk
        tier also counts as corrupt records); returns how many distinct blocks were held."""
        self._check_open(writing=True)
        gone = frozenset(keys)
        if not gone:
            return 0
        now = self._clock()
        removed: set[bytes] = set()
        for tier in self.tiers:
            removed.update(ev.key for ev in tier.purge(lambda k, m: k in gone, now, reason))
        return len(removed)

    def expire(self) -> int:
        """Removes every block idle past its tier's TTL now; returns how many were removed."""
        self._check_open(writing=True)
        now = self._clock()
        return sum(len(tier.expire(now)) for tier in self.tiers)

    def stats(self) -> dict[str, Any]:
        """Tier occupancy, the store's settings and this process's counters, as plain JSON-able
        values."""
        snap = self.metrics.snapshot()["counters"]
        tiers = {}
        for tier in self.tiers:
            u = tier.usage()
            tiers[tier.name] = {"entries": u.entries, "bytes": u.bytes, "raw_bytes": u.raw_bytes,
                                "budget": u.budget}
        hits = {dict(k).get("tier", ""): v for k, v in snap.get("hit_tokens", {}).items()}
        hit, miss = sum(hits.values()), self.metrics.total("miss_tokens")

        def flat(name: str) -> dict[str, float]:
            return {",".join(f"{k}={v}" for k, v in labels) or "total": value
                    for labels, value in snap.get(name, {}).items()}

        return {
            "path": str(self.config.path),
            "block_tokens": self.config.block_tokens,
            "block_shape": list(self.block_shape) if self.block_shape else None,
            "dtype": self._dtype_name,
            "settings": self.settings(),
            "tiers": tiers,
            "hit_tokens": hits,
            "miss_tokens": miss,
            "hit_rate": hit / (hit + miss) if hit + miss else 0.0,
            "requests": self.metrics.total("requests"),
            "stored_blocks": flat("stored_blocks"),
            "evictions": flat("evictions"),
            "dropped_writes": flat("dropped_writes"),
            "corrupt_records": self.metrics.total("corrupt_records"),
            "io_errors": self.metrics.total("io_errors"),
        }

    def settings(self) -> dict[str, Any]:
        """The settings this store runs with (settings.py: stored with the data)."""
        c = self.config
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (
            (k, getattr(c, k)) for k in (*settings.FIXED, *settings.POLICY))}

    def namespaces(self) -> dict[int, str]:
        """Namespace id -> name of every namespace the store has seen (its ledger)."""
        return self.ledger.namespaces()

    def lifetime_counters(self) -> dict[str, float]:
        """Counters summed over every process that used the store (``Metrics.flat`` series,
        persisted by ``flush``/``close`` and every few seconds by the writer threads)."""
        return self.ledger.counters()

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every block put so far is in every slow tier, durable and visible to
        other processes, and writes pending last-access times and this process's counters (so
        ``kvstore stats`` sees lifetime hits and misses; those two reach the disk with the next
        commit or ``close``). False if ``timeout`` ran out."""
        if self._closed or self.readonly:
            return True
        self._check_fork()
        self.metrics.add("flushes")
        done = all([w.flush(timeout) for w in self._writers.values()])
        # Counters first: their commit carries the blocks' commits to the disk (env.py,
        # metasync), so the disk tier's flush then has no sync of its own to wait for.
        self.persist_counters()
        for tier in self.tiers:
            tier.flush()
        return done

    def persist_counters(self) -> None:
        """Adds what this process counted since the last call to the ledger's lifetime
        counters, and writes pending namespace names. Called by ``flush``/``close`` and, at most
        every COUNTERS_EVERY_S, by the write-behind threads (never on the caller's path)."""
        if self.readonly or not self.ledger.durable:
            return
        with self._counters_lock:
            now = self.metrics.flat()
            deltas = {k: v - self._persisted.get(k, 0) for k, v in now.items() if v != self._persisted.get(k, 0)}
            self.ledger.add_counters(deltas)
            self.ledger.flush()
            self._persisted = now
            self._persisted_at = time.monotonic()

    def _after_batch(self) -> None:
        if time.monotonic() - self._persisted_at >= COUNTERS_EVERY_S:
            self.persist_counters()
        else:
            self.ledger.flush()  # namespace names land with their first blocks

    def close(self) -> None:
        """Writes what is queued, stops the background threads and releases every tier.
        Further calls raise ValueError. Idempotent."""
        with self._lock:
            if self._closed:
                return
            for writer in self._writers.values():
                writer.close()
            self.persist_counters()
            self._prefetcher.shutdown(wait=True)
            self._loaders.shutdown(wait=True)
            for tier in self.tiers:
                tier.close()
            self.ledger.close()
            self._closed = True
