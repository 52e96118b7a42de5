"""KVStore: the tiered prefix cache an engine adapter talks to.

Lookup order is top-down (host, then disk); a block found lower is promoted up on ``get``.
``put`` writes through every tier; a block a tier evicts spills to the tier below unless it is
already there. Every use touches a block's whole chain at one instant, which with the eviction
rule in eviction.py keeps parents alive at least as long as their children.

Best effort: faults inside the cache (corrupt record, full disk, I/O errors) become counted
misses or dropped writes and never raise from ``match``/``get``/``put``. Bad arguments raise
ValueError naming what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import stat
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
from .tiers.slab import SlabTier


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
        counts: dict[str, int] = {}
        for t in self.tiers:
            counts[t] = counts.get(t, 0) + 1
        return counts


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
        self.tiers: list[Tier] = [t for t in (self.host, self.disk) if t is not None]
        self.block_shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        if config.block_shape is not None and config.dtype is not None:
            self._fix_layout(config.block_shape, DTYPES[config.dtype])

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
        self.block_shape, self.dtype = tuple(shape), dtype
        if self.host is not None:
            self.host.configure(self.block_shape, dtype)

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

    # -- public API --------------------------------------------------------------------------
    def _ns(self, namespace: str | None) -> str:
        ns = self.config.namespace if namespace is None else namespace
        if not isinstance(ns, str) or not ns:
            raise ValueError(f"namespace: expected a non-empty string, got {ns!r}")
        return ns

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("store is closed")

    def match(self, token_ids: Sequence[int] | np.ndarray, namespace: str | None = None,
              touch: bool = True) -> Match:
        """The longest run of leading full blocks of ``token_ids`` held by some tier.

        Counts hit and miss tokens and, with ``touch``, marks the matched chain as used.

        Raises:
            ValueError: bad token ids or namespace, or the store is closed.
        """
        self._check_open()
        ns = self._ns(namespace)
        all_keys = keyslib.block_keys(ns, token_ids, self.config.block_tokens)
        n_tokens = len(token_ids)
        with self._lock:
            now = self._clock()
            held: list[str | None] = [None] * len(all_keys)
            todo = list(range(len(all_keys)))
            for level, tier in enumerate(self.tiers):
                if not todo:
                    break
                # The lowest tier is asked only up to its first miss: nothing after can match.
                last = level == len(self.tiers) - 1
                found = tier.contains_many([all_keys[i] for i in todo], now, stop_at_miss=last)
                for i, hit in zip(todo, found):
                    if hit:
                        held[i] = tier.name
                todo = [i for i, hit in zip(todo, found) if not hit]
            n = 0
            while n < len(held) and held[n] is not None:
                n += 1
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

    def get(self, match: Match, out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Loads the matched blocks, promoting disk hits to the host tier.

        Args:
            match: from ``match`` on this store.
            out: optional preallocated tensor of shape ``(>= match.num_blocks, *block_shape)``;
                the returned blocks are views into it.

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
        with self._lock:
            now = self._clock()
            if self.block_shape is None:
                self._learn_layout(match.keys[0])
            if self.block_shape is None:
                return []
            outs = self._outs(n, out)
            ok = [False] * n
            for tier in self.tiers:
                idx = [i for i in range(n) if match.tiers[i] == tier.name]
                if not idx:
                    continue
                if isinstance(tier, DiskTier):
                    got = tier.get_many([match.keys[i] for i in idx], [outs[i] for i in idx], now)
                else:
                    got = tier.get_many([match.keys[i] for i in idx], [outs[i] for i in idx])
                for i, g in zip(idx, got):
                    ok[i] = g
            loaded = ok.index(False) if False in ok else n
            self._promote(match, outs[:loaded], now)
        if loaded < n:
            self.metrics.add("load_failed_blocks", n - loaded)
        self.metrics.observe("load_seconds", time.perf_counter() - t0)
        return outs[:loaded]

    def _outs(self, n: int, out: torch.Tensor | None) -> list[torch.Tensor]:
        if out is None:
            return [torch.empty(self.block_shape, dtype=self.dtype) for _ in range(n)]
        if (out.dim() != len(self.block_shape) + 1 or out.shape[0] < n
                or tuple(out.shape[1:]) != self.block_shape or out.dtype != self.dtype):
            raise ValueError(
                f"out: expected a tensor of shape ({n} or more, {', '.join(map(str, self.block_shape))}) "
                f"and dtype {self.dtype}, got {tuple(out.shape)} and {out.dtype}"
            )
        return [out[i] for i in range(n)]

    def _learn_layout(self, key: bytes) -> None:
        """Fixes the layout from a stored record (a store reopened before its first put)."""
        if self.disk is None:
            return
        found = self.disk.read_record(key)
        if found is None:
            return
        try:
            h = self.codec.read_header(found[0])
        except Exception:
            return
        self._fix_layout(h["shape"], h["torch_dtype"])

    def _promote(self, match: Match, blocks: list[torch.Tensor], now: float) -> None:
        """Copies blocks served by a lower tier into every tier above it."""
        for level, tier in enumerate(self.tiers[:-1]):
            below = {t.name for t in self.tiers[level + 1:]}
            entries = [
                BlockEntry(match.keys[i], blocks[i], self._meta(match, i, now))
                for i in range(len(blocks)) if match.tiers[i] in below
            ]
            if entries:
                tier.put_many(entries, now, on_evict=self._spill_from(level))
                tier.touch_many(match.keys[:len(blocks)], now)

    def _meta(self, match: Match, i: int, now: float) -> EntryMeta:
        return EntryMeta(
            namespace_id=keyslib.namespace_id(match.namespace), depth=i,
            parent=match.all_keys[i - 1] if i else b"", created=now, last_access=now,
            raw_bytes=self._block_nbytes(),
        )

    def _block_nbytes(self) -> int:
        return int(np.prod(self.block_shape)) * torch.empty((), dtype=self.dtype).element_size()

    def _spill_from(self, level: int) -> Callable[[list[Evicted]], None] | None:
        """The on_evict callback of tier ``level``: moves victims down unless already there."""
        if level + 1 >= len(self.tiers):
            return None
        lower = self.tiers[level + 1]

        def spill(victims: list[Evicted]) -> None:
            now = self._clock()
            victims = [v for v in victims if v.reason == "capacity" and v.block is not None]
            held = lower.contains_many([v.key for v in victims], now)
            down = [BlockEntry(v.key, v.block, v.meta) for v, h in zip(victims, held) if not h]
            if down:
                lower.put_many(down, now, on_evict=self._spill_from(level + 1))
                self.metrics.add("spilled_blocks", len(down), tier=lower.name)
        return spill

    def put(self, token_ids: Sequence[int] | np.ndarray, blocks: Sequence[torch.Tensor],
            namespace: str | None = None, start_block: int = 0) -> int:
        """Stores the KV of full blocks of ``token_ids``.

        Args:
            token_ids: the prompt (and output) the blocks were computed for.
            blocks: ``blocks[j]`` is the KV of block ``start_block + j``; one tensor of the
                store's block shape and dtype each.
            namespace: defaults to the config's.
            start_block: index of the first block given (the blocks before it are the
                already-cached prefix, typically ``match.num_blocks``).

        Returns:
            How many blocks were newly stored in some tier. Blocks already held are skipped
            (their chain is touched); a block whose parent is no longer held is not stored.

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
        with self._lock:
            self._check_blocks(blocks)
            now = self._clock()
            if start_block and not any(t.contains_many([keys[start_block - 1]], now)[0]
                                       for t in self.tiers):
                self.metrics.add("orphan_blocks", len(blocks))
                return 0
            ns_id = keyslib.namespace_id(ns)
            raw = self._block_nbytes()
            stored = [False] * len(blocks)
            for level, tier in enumerate(self.tiers):
                tier.touch_many(keys[:end], now)
                held = tier.contains_many(keys[start_block:end], now)
                entries = [
                    BlockEntry(keys[start_block + j], blocks[j],
                               EntryMeta(ns_id, start_block + j, keys[start_block + j - 1]
                                         if start_block + j else b"", now, now, raw))
                    for j in range(len(blocks)) if not held[j]
                ]
                if not entries:
                    continue
                extra = {"namespaces": {ns_id: ns}} if isinstance(tier, DiskTier) else {}
                ok = tier.put_many(entries, now, on_evict=self._spill_from(level), **extra)
                pos = [j for j in range(len(blocks)) if not held[j]]
                for j, o in zip(pos, ok):
                    stored[j] = stored[j] or o
                self.metrics.add("stored_blocks", ok.count(True), tier=tier.name)
                self.metrics.add("dropped_writes", ok.count(False), tier=tier.name)
        self.metrics.observe("store_seconds", time.perf_counter() - t0)
        return sum(stored)

    def pin(self, token_ids: Sequence[int] | np.ndarray, ttl_s: float,
            namespace: str | None = None) -> int:
        """Exempts the cached prefix of ``token_ids`` from eviction and expiry for ``ttl_s``.

        Returns:
            The number of leading blocks pinned (those held now).

        Raises:
            ValueError: ``ttl_s`` is not a finite number >= 0, or bad token ids.
        """
        if not isinstance(ttl_s, (int, float)) or not np.isfinite(ttl_s) or ttl_s < 0:
            raise ValueError(f"ttl_s: expected a finite number of seconds >= 0, got {ttl_s!r}")
        m = self.match(token_ids, namespace)
        with self._lock:
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
        if not all and older_than_s is None and idle_longer_than_s is None and namespace is None \
                and keys is None:
            raise ValueError("purge: give all=True or at least one of older_than_s, "
                             "idle_longer_than_s, namespace, keys")
        for name, v in (("older_than_s", older_than_s), ("idle_longer_than_s", idle_longer_than_s)):
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"{name}: expected seconds >= 0, got {v!r}")
        ns_id = keyslib.namespace_id(namespace) if namespace is not None else None
        keyset = set(keys) if keys is not None else None

        with self._lock:
            now = self._clock()

            def select(key: bytes, meta: EntryMeta) -> bool:
                return ((ns_id is None or meta.namespace_id == ns_id)
                        and (keyset is None or key in keyset)
                        and (older_than_s is None or now - meta.created > older_than_s)
                        and (idle_longer_than_s is None or now - meta.last_access > idle_longer_than_s))

            if self.disk is not None:
                self.disk.flush()  # pending last-access times decide idle purges
            removed: set[bytes] = set()
            for tier in self.tiers:
                if dry_run:
                    removed.update(k for k, m in tier.entries() if select(k, m))
                else:
                    removed.update(ev.key for ev in tier.purge(select, now))
        return len(removed)

    def expire(self) -> int:
        """Removes every block idle past its tier's TTL now; returns how many were removed."""
        with self._lock:
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

    def flush(self) -> None:
        """Makes everything put so far durable and visible to other processes."""
        with self._lock:
            if self.disk is not None and not self._closed:
                self.disk.flush()

    def close(self) -> None:
        """Flushes and releases every tier; further calls raise ValueError. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self.flush()
            for tier in self.tiers:
                tier.close()
            self._closed = True
