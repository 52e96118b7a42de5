"""KVStore: the tiered prefix cache an engine adapter talks to.

Lookup order is top-down (device, host, disk); a block found lower is promoted up on ``get`` or
``prefetch``. ``put`` copies into the RAM tiers and queues the disk write (write-behind: it
never waits for compression or disk I/O); a block a tier evicts spills to the tier below unless
it is already there. Every use touches a block's whole chain at one instant, which with the
eviction rule in eviction.py keeps parents alive at least as long as their children.

Thread-safe: each tier locks itself, and no lock is held across a disk read. Fork-safe: a store
used in a forked child reopens LMDB and restarts its background threads there.

Best effort: faults inside the cache (corrupt record, full disk, I/O errors) become counted
misses or dropped writes and never raise from ``match``/``get``/``put``. Bad arguments raise
ValueError naming what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import keys as keyslib
from .codec import Codec, dtype_name, DTYPES
from .config import StoreConfig
from .errors import StoreOpenError
from .eviction import EntryMeta, MonotonicClock
from .metrics import Metrics
from .tiers.base import BlockEntry, Evicted, Tier
from .tiers.disk import DiskTier
from .tiers.slab import SlabTier, copy_block
from .writeback import WriteBehind


@dataclasses.dataclass(frozen=True)
class Match:
    """The cached prefix of a prompt.

    Attributes:
        namespace: the namespace looked up.
        keys: keys of the matched leading blocks, in order.
        tiers: for each matched block, the tier that holds it (``"host"`` or ``"disk"``).
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


def _prepare_dir(path: Path) -> None:
    """Creates the store directory owner-only, or checks an existing one is safe to use."""
    if path.exists() and not path.is_dir():
        raise StoreOpenError(f"{path}: exists and is not a directory")
    try:
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
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreOpenError(f"{path}: not writable by this user")


class KVStore:
    """A tiered, prefix-keyed KV block store. Thread-safe.

    Open with ``KVStore.open(config)``; use as a context manager or call ``close()``.
    """

    def __init__(self, config: StoreConfig, *, clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self._clock = MonotonicClock(clock)
        self._lock = threading.RLock()
        self._closed = False
        _prepare_dir(config.path)
        self.codec = Codec(config.compression, config.zstd_level, config.byte_split)
        self.device_tier: SlabTier | None = None
        if config.device_bytes > 0:
            self.device_tier = SlabTier("device", config.device_bytes, config.device_ttl_s,
                                        device=config.resolved_device(), metrics=self.metrics)
        self.host: SlabTier | None = None
        if config.host_bytes > 0:
            self.host = SlabTier("host", config.host_bytes, config.host_ttl_s, device="cpu",
                                 metrics=self.metrics)
        self.disk: DiskTier | None = None
        if config.disk_bytes > 0:
            disk_dir = config.path / "disk"
            disk_dir.mkdir(mode=0o700, exist_ok=True)
            self.disk = DiskTier(disk_dir, config.disk_bytes, config.disk_ttl_s, self.codec,
                                 self.metrics)
        self.ram_tiers: list[SlabTier] = [t for t in (self.device_tier, self.host) if t is not None]
        self.tiers: list[Tier] = [*self.ram_tiers, *([self.disk] if self.disk is not None else [])]
        self.writer: WriteBehind | None = None
        self._removals_seen = self.disk.removal_epoch() if self.disk is not None else 0
        self._removals_checked = time.monotonic()
        self._counters_lock = threading.Lock()
        self._persisted: dict[str, float] = {}
        self._persisted_at = time.monotonic()
        self._start_threads()
        self.block_shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        if config.block_shape is not None and config.dtype is not None:
            self._fix_layout(config.block_shape, DTYPES[config.dtype])

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
                    if self.writer is not None:
                        self.writer.after_fork()

    @classmethod
    def open(cls, config: StoreConfig, *, clock: Callable[[], float] = time.time,
             metrics: Metrics | None = None) -> KVStore:
        """Opens (creating if needed) the store at ``config.path``.

        Raises:
            StoreOpenError: the path cannot be created or written, or is unsafe.
            IncompatibleFormatError: the store was written by a newer kvstore.
        """
        return cls(config, clock=clock, metrics=metrics)

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- layout ------------------------------------------------------------------------------
    def _fix_layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        with self._lock:
            if self.block_shape is not None:
                return
            for tier in self.ram_tiers:
                tier.configure(tuple(shape), dtype)
            if self.disk is not None:
                nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
                self.writer = WriteBehind(self.disk, self.config.write_queue_bytes // nbytes,
                                          tuple(shape), dtype, self.config.io_threads, self._clock,
                                          self.metrics, after_batch=self._after_batch)
            self.block_shape, self.dtype = tuple(shape), dtype

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
                self._fix_layout(tuple(b.shape), b.dtype)
            if tuple(b.shape) != self.block_shape or b.dtype != self.dtype:
                raise ValueError(
                    f"blocks[{i}]: expected shape {self.block_shape} and dtype "
                    f"{dtype_name(self.dtype)} (the store's block layout), got "
                    f"{tuple(b.shape)} and {str(b.dtype).removeprefix('torch.')}"
                )

    def _learn_layout(self, key: bytes) -> None:
        """Fixes the layout from a stored record (a store reopened before its first put)."""
        found = self.disk.read_record(key) if self.disk is not None else None
        if found is None:
            return
        try:
            h = self.codec.read_header(found[0])
        except Exception:
            return
        self._fix_layout(h["shape"], h["torch_dtype"])

    def _block_nbytes(self) -> int:
        return int(np.prod(self.block_shape)) * torch.empty((), dtype=self.dtype).element_size()

    # -- lookups -----------------------------------------------------------------------------
    def _ns(self, namespace: str | None) -> str:
        ns = self.config.namespace if namespace is None else namespace
        if not isinstance(ns, str) or not ns:
            raise ValueError(f"namespace: expected a non-empty string, got {ns!r}")
        return ns

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("store is closed")
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
        """Drops from the RAM tiers what another process purged (polled at most once a second:
        one small read transaction)."""
        if self.disk is None or not self.ram_tiers:
            return
        if not force and time.monotonic() - self._removals_checked < REMOVAL_POLL_S:
            return
        self._removals_checked = time.monotonic()
        try:
            epoch, keys = self.disk.removals_since(self._removals_seen)
        except Exception:  # best effort: the next poll tries again
            self.metrics.add("io_errors", tier=self.disk.name)
            return
        if epoch == self._removals_seen:
            return
        for tier in self.ram_tiers:
            if keys is None:
                tier.purge(lambda k, m: True, self._clock())
            else:
                tier.delete_many([k for k, _ in tier.entries() if k in keys])
        self._removals_seen = epoch

    def get(self, match: Match, out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Loads the matched blocks, promoting blocks found lower to the RAM tiers above.

        Disk blocks are read and decompressed by ``io_threads`` threads in parallel. After a
        completed ``prefetch`` of the same match, only RAM (device) copies remain.

        Args:
            match: from ``match`` on this store.
            out: optional preallocated tensor of shape ``(>= match.num_blocks, *block_shape)``
                (on any device); the returned blocks are views into it. Without it, blocks are
                allocated on the device tier's device (the CPU when there is none).

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
            self._learn_layout(match.keys[0])
            if self.block_shape is None:
                return []
        outs = self._outs(n, out)
        now = self._clock()
        source = self._load(match.keys, outs, now)
        loaded = source.index(None) if None in source else n
        if self._promote(match.namespace, match.all_keys, range(loaded), outs, source, now):
            for tier in self.ram_tiers:  # the promoted chain is in use: touch it as one path
                tier.touch_many(match.keys[:loaded], now)
        if loaded < n:
            self.metrics.add("load_failed_blocks", n - loaded)
        self.metrics.observe("load_seconds", time.perf_counter() - t0)
        return outs[:loaded]

    def _outs(self, n: int, out: torch.Tensor | None) -> list[torch.Tensor]:
        if out is None:
            device = self.device_tier.device if self.device_tier is not None else "cpu"
            return list(torch.empty((n, *self.block_shape), dtype=self.dtype, device=device))
        if (out.dim() != len(self.block_shape) + 1 or out.shape[0] < n
                or tuple(out.shape[1:]) != self.block_shape or out.dtype != self.dtype):
            raise ValueError(
                f"out: expected a tensor of shape ({n} or more, {', '.join(map(str, self.block_shape))}) "
                f"and dtype {dtype_name(self.dtype)}, got {tuple(out.shape)} and {out.dtype}"
            )
        return [out[i] for i in range(n)]

    def _load(self, keys: Sequence[bytes], outs: list[torch.Tensor], now: float) -> list[str | None]:
        """Fills ``outs[i]`` from the highest tier holding ``keys[i]``; returns each source tier
        (None where no tier could supply the block). Tiers are asked top-down, so blocks that a
        prefetch moved up since ``match`` are served from RAM."""
        source: list[str | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for tier in self.ram_tiers:
            if not todo:
                break
            got = tier.get_many([keys[i] for i in todo], [outs[i] for i in todo])
            for i, g in zip(todo, got):
                if g:
                    source[i] = tier.name
            todo = [i for i, g in zip(todo, got) if not g]
        if todo and self.disk is not None:
            got = self._load_disk([keys[i] for i in todo], [outs[i] for i in todo], now)
            for i, g in zip(todo, got):
                if g:
                    source[i] = self.disk.name
        return source

    def _load_disk(self, keys: list[bytes], outs: list[torch.Tensor], now: float) -> list[bool]:
        """Decodes disk records into ``outs`` with up to ``io_threads`` threads at once, so
        reading one block overlaps decompressing another (zstd and LMDB release the GIL)."""
        staging = [o if o.device.type == "cpu" and o.is_contiguous() else torch.empty_like(o, device="cpu")
                   for o in outs]
        parts = min(self.config.io_threads, len(keys))
        if parts <= 1:
            ok = self.disk.get_many(keys, staging, now)
        else:
            bounds = [round(i * len(keys) / parts) for i in range(parts + 1)]
            futures = [self._loaders.submit(self.disk.get_many, keys[a:b], staging[a:b], now)
                       for a, b in zip(bounds, bounds[1:])]
            ok = [g for f in futures for g in f.result()]
        for o, s, g in zip(outs, staging, ok):
            if g and o is not s:
                copy_block(o, s)
        return ok

    def _promote(self, namespace: str, all_keys: Sequence[bytes], positions: Sequence[int],
                 blocks: Sequence[torch.Tensor], source: Sequence[str | None], now: float) -> int:
        """Copies ``blocks[j]`` (block ``positions[j]`` of the chain ``all_keys``), which tier
        ``source[j]`` supplied, into every RAM tier above that one; returns the copies made."""
        names = [t.name for t in self.tiers]
        moved = 0
        for level, tier in enumerate(self.ram_tiers):
            entries = [BlockEntry(all_keys[p], blocks[j], self._meta(namespace, all_keys, p, now))
                       for j, p in enumerate(positions)
                       if source[j] is not None and names.index(source[j]) > level]
            if entries:
                moved += sum(tier.put_many(entries, now, on_evict=self._spill_from(level)))
                self.metrics.add("promoted_blocks", len(entries), tier=tier.name)
        return moved

    def prefetch(self, match: Match) -> LoadHandle:
        """Starts moving the matched blocks up to the RAM tiers in the background.

        Returns a handle to wait on; ``get(match)`` after it completes costs only RAM (device)
        copies. A prefetch never raises: what it cannot load stays where it is.
        """
        self._check_open()

        def job() -> int:
            try:
                if self.block_shape is None and match.num_blocks:
                    self._learn_layout(match.keys[0])
                top = self.ram_tiers[0] if self.ram_tiers else None
                if top is None or self.block_shape is None:
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
    def _spill_from(self, level: int) -> Callable[[list[Evicted]], None] | None:
        """The on_evict callback of RAM tier ``level``: moves victims down unless already there
        (to the next RAM tier, or through the write-behind queue to disk)."""
        def spill(victims: list[Evicted]) -> None:
            now = self._clock()
            victims = [v for v in victims if v.reason == "capacity" and v.block is not None]
            if not victims:
                return
            if level + 1 < len(self.ram_tiers):
                lower = self.ram_tiers[level + 1]
                held = lower.contains_many([v.key for v in victims], now)
                down = [BlockEntry(v.key, v.block, v.meta) for v, h in zip(victims, held) if not h]
                if down:
                    lower.put_many(down, now, on_evict=self._spill_from(level + 1))
            elif self.disk is not None and self.writer is not None:
                held = self.disk.contains_many([v.key for v in victims], now)
                down = [BlockEntry(v.key, v.block, v.meta) for v, h in zip(victims, held)
                        if not h and not self.writer.queued(v.key)]
                if down:
                    self.writer.submit(down)
            else:
                return
            self.metrics.add("spilled_blocks", len(victims), tier=self.ram_tiers[level].name)
        return spill

    def put(self, token_ids: Sequence[int] | np.ndarray, blocks: Sequence[torch.Tensor],
            namespace: str | None = None, start_block: int = 0) -> int:
        """Stores the KV of full blocks of ``token_ids``; returns without waiting for disk I/O.

        Blocks are copied into the RAM tiers and into the write-behind queue before this
        returns, so the caller may reuse its buffers. ``flush()`` waits for the disk writes.

        Args:
            token_ids: the prompt (and output) the blocks were computed for.
            blocks: ``blocks[j]`` is the KV of block ``start_block + j``; one tensor of the
                store's block shape and dtype each (on any device).
            namespace: defaults to the config's.
            start_block: index of the first block given (the blocks before it are the
                already-cached prefix, typically ``match.num_blocks``).

        Returns:
            How many blocks were newly stored in, or queued for, some tier. Blocks already
            held are skipped (their chain is touched); a block whose parent is no longer held
            is not stored. A full write queue drops disk writes (counted).

        Raises:
            ValueError: blocks of the wrong shape or dtype, more blocks than the full blocks of
                ``token_ids``, bad token ids, or the store is closed.
        """
        self._check_open()
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
        if parent and not (any(t.contains_many([parent], now)[0] for t in self.tiers)
                           or (self.writer is not None and self.writer.queued(parent))):
            self.metrics.add("orphan_blocks", len(blocks))
            return 0
        ns_id = keyslib.namespace_id(ns)
        self._namespaces_seen(ns_id, ns)
        raw = self._block_nbytes()

        def entries_for(held: list[bool]) -> tuple[list[int], list[BlockEntry]]:
            pos = [j for j in range(len(blocks)) if not held[j]]
            return pos, [BlockEntry(keys[start_block + j], blocks[j],
                                    EntryMeta(ns_id, start_block + j,
                                              keys[start_block + j - 1] if start_block + j else b"",
                                              now, now, raw)) for j in pos]

        stored = [False] * len(blocks)
        for level, tier in enumerate(self.ram_tiers):
            pos, entries = entries_for(tier.contains_many(keys[start_block:end], now))
            if entries:
                ok = tier.put_many(entries, now, on_evict=self._spill_from(level))
                for j, o in zip(pos, ok):
                    stored[j] = stored[j] or o
                self.metrics.add("stored_blocks", ok.count(True), tier=tier.name)
            tier.touch_many(keys[:end], now)  # after the insert: parents end up newer than children
        if self.disk is not None and self.writer is not None:
            self.disk.touch_many(keys[:end], now)
            held = self.disk.contains_many(keys[start_block:end], now)
            held = [h or self.writer.queued(k) for h, k in zip(held, keys[start_block:end])]
            pos, entries = entries_for(held)
            if entries:
                for j, o in zip(pos, self.writer.submit(entries)):
                    stored[j] = stored[j] or o
        self.metrics.observe("put_seconds", time.perf_counter() - t0)
        return sum(stored)

    def _namespaces_seen(self, ns_id: int, ns: str) -> None:
        """Remembers namespace names for the disk tier (written with the next batch)."""
        if self.disk is not None:
            self.disk.register_namespace(ns_id, ns)

    def pin(self, token_ids: Sequence[int] | np.ndarray, ttl_s: float,
            namespace: str | None = None) -> int:
        """Exempts the cached prefix of ``token_ids`` from eviction and expiry for ``ttl_s``.

        Returns:
            The number of leading blocks pinned (those held now; blocks still in the write
            queue are pinned on disk after ``flush()``).

        Raises:
            ValueError: ``ttl_s`` is not a finite number >= 0, or bad token ids.
        """
        if not isinstance(ttl_s, (int, float)) or not np.isfinite(ttl_s) or ttl_s < 0:
            raise ValueError(f"ttl_s: expected a finite number of seconds >= 0, got {ttl_s!r}")
        m = self.match(token_ids, namespace)
        if self.writer is not None:
            self.writer.flush()  # so the disk copies exist to carry the pin
        until = self._clock() + ttl_s
        for tier in self.tiers:
            tier.pin_many(m.keys, until)
        return m.num_blocks

    def purge(self, older_than_s: float | None = None, idle_longer_than_s: float | None = None,
              namespace: str | None = None, all: bool = False,
              keys: Sequence[bytes] | None = None, dry_run: bool = False) -> int:
        """Removes blocks from every tier; criteria combine with AND. Pins do not protect.

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
            ValueError: no criterion given (``all=True`` is required to remove everything).
        """
        self._check_open()
        if not all and older_than_s is None and idle_longer_than_s is None and namespace is None \
                and keys is None:
            raise ValueError("purge: give all=True or at least one of older_than_s, "
                             "idle_longer_than_s, namespace, keys")
        for name, v in (("older_than_s", older_than_s), ("idle_longer_than_s", idle_longer_than_s)):
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"{name}: expected seconds >= 0, got {v!r}")
        ns_id = keyslib.namespace_id(namespace) if namespace is not None else None
        keyset = set(keys) if keys is not None else None
        self.flush()  # queued writes and pending last-access times decide what matches
        now = self._clock()

        def select(key: bytes, meta: EntryMeta) -> bool:
            return ((ns_id is None or meta.namespace_id == ns_id)
                    and (keyset is None or key in keyset)
                    and (older_than_s is None or now - meta.created > older_than_s)
                    and (idle_longer_than_s is None or now - meta.last_access > idle_longer_than_s))

        removed: set[bytes] = set()
        for tier in self.tiers:
            if dry_run:
                removed.update(k for k, m in tier.entries() if select(k, m))
            else:
                removed.update(ev.key for ev in tier.purge(select, now))
        return len(removed)

    def expire(self) -> int:
        """Removes every block idle past its tier's TTL now; returns how many were removed."""
        self._check_open()
        now = self._clock()
        return sum(len(tier.expire(now)) for tier in self.tiers)

    def stats(self) -> dict[str, Any]:
        """Tier occupancy and this process's counters, as plain JSON-able values."""
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
            "dtype": dtype_name(self.dtype) if self.dtype else None,
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

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every block put so far is on disk, durable and visible to other
        processes, and writes pending last-access times and this process's counters (so
        ``kvstore stats`` sees lifetime hits and misses). False if ``timeout`` ran out."""
        if self._closed:
            return True
        self._check_fork()
        done = self.writer.flush(timeout) if self.writer is not None else True
        if self.disk is not None:
            self.disk.flush()
            self.persist_counters()
        return done

    def persist_counters(self) -> None:
        """Adds what this process counted since the last call to the disk tier's lifetime
        counters. Called by ``flush``/``close`` and, at most every COUNTERS_EVERY_S, by the
        write-behind threads (never on the caller's path)."""
        if self.disk is None:
            return
        with self._counters_lock:
            now = self.metrics.flat()
            deltas = {k: v - self._persisted.get(k, 0) for k, v in now.items() if v != self._persisted.get(k, 0)}
            self.disk.add_counters(deltas)
            self._persisted = now
            self._persisted_at = time.monotonic()

    def _after_batch(self) -> None:
        if time.monotonic() - self._persisted_at >= COUNTERS_EVERY_S:
            self.persist_counters()

    def close(self) -> None:
        """Writes what is queued, stops the background threads and releases every tier.
        Further calls raise ValueError. Idempotent."""
        with self._lock:
            if self._closed:
                return
            if self.writer is not None:
                self.writer.close()
            if self.disk is not None:
                self.disk.flush()
                self.persist_counters()
            self._prefetcher.shutdown(wait=True)
            self._loaders.shutdown(wait=True)
            for tier in self.tiers:
                tier.close()
            self._closed = True
