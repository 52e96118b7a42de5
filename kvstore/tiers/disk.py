"""DiskTier: cold blocks as compressed, checksummed records in one LMDB environment.

Every LMDB rule of the project lives in this file:
- each transaction is a ``with env.begin(...)`` block; read transactions stay short;
- ``buffers=True`` values are decoded (copied) before their transaction ends;
- ``writemap=True`` (measured fastest for large values). With it a write into a page the disk
  never allocated is SIGBUS when the disk is full, so no write transaction runs until the data
  file is allocated (``posix_fallocate``) up to the map size, the lock file is created
  allocated, and a full disk turns into dropped writes;
- ``set_mapsize`` only outside transactions, on ``MapFullError`` (grow) and ``MapResizedError``
  (another process grew it). With writemap LMDB truncates the file to the map size it is given,
  so opening and every map change hold ``resize.lock`` and never map less than the file: no
  process shrinks the file under another's map;
- ``reader_check()`` at open clears reader slots of killed processes;
- never ``readahead=False`` (measured 30 MB/s cold);
- the environment belongs to the process that opened it: a forked child reopens it.

Databases: ``records`` key -> codec record; ``meta`` key -> packed EntryMeta; ``lru`` eviction
rank || key -> b""; ``info`` store-wide counters and the format version; ``namespaces`` id ->
name. Budget: the sum of ``entry_cost`` over entries never exceeds ``capacity_bytes``; the data
file itself is capped at ``2 * capacity_bytes + 64 MiB`` (room for copy-on-write pages).
Last-access times of hits are kept in memory and written with the next write transaction, so a
hit costs no write transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import lmdb
import torch

from ..codec import Codec
from ..errors import CorruptEntryError, IncompatibleFormatError, StoreOpenError
from ..eviction import EntryMeta, is_expired, is_live, is_pinned, lru_rank
from ..metrics import Metrics
from .base import BlockEntry, Evicted, EvictCallback, TierUsage

DISK_FORMAT_VERSION = 1
_META = struct.Struct("<QIdddQQ16s")
_TIMES = struct.Struct("<dd")  # last_access, pinned_until inside _META
_TIMES_AT = 20
_U64 = struct.Struct("<Q")
_NS = struct.Struct(">Q")
_ENTRY_OVERHEAD = _META.size + 3 * 16 + 12 + 64  # keys, meta, lru row, LMDB node headers
_MIN_MAP = 64 << 20
_NEW_MAP = 1 << 20  # a new store's first map; growth reserves the rest as it is needed
_MIN_STEP = 1 << 20  # the smallest growth asked of a nearly full disk
# The size LMDB gives its lock file for max_readers=512: 511 64-byte reader slots after a 192-byte
# header. Created at exactly this size, LMDB keeps it as it is (a larger file means more readers,
# which processes that mapped the smaller one would not see).
_LOCK_BYTES = 32896
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_DBS = (b"records", b"meta", b"lru", b"info", b"namespaces", b"purges", b"counters")
_EXPIRE_BATCH = 1024  # expired entries removed per write transaction, to keep writes short
_PURGE_LOG_EPOCHS = 256  # removal batches remembered for other processes' RAM tiers


def entry_cost(record_len: int) -> int:
    """Bytes an entry counts against the disk budget."""
    return record_len + _ENTRY_OVERHEAD


def _allocate(path: Path, nbytes: int) -> None:
    """Allocates ``path``'s blocks up to ``nbytes`` (creating it owner-only), so writes through a
    shared map cannot fault. A filesystem that cannot allocate is left as it is.

    Raises OSError: ENOSPC or EDQUOT when the disk is full, others on I/O errors."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def _pack_meta(m: EntryMeta) -> bytes:
    return _META.pack(m.namespace_id, m.depth, m.created, m.last_access, m.pinned_until,
                      m.raw_bytes, m.stored_bytes, m.parent.ljust(16, b"\0"))


def _unpack_meta(buf) -> EntryMeta:
    ns, depth, created, last, pinned, raw, stored, parent = _META.unpack(buf)
    return EntryMeta(ns, depth, parent if depth else b"", created, last, raw, stored, pinned)


class _RemapGate:
    """Transactions share; a remap (``set_mapsize``) is exclusive.

    LMDB forbids changing the map while any transaction of the process is open (the mapping
    moves under the readers' pointers). Read transactions run without the tier's lock, so every
    transaction holds this gate shared, and growth or adoption of another process's growth
    holds it alone.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._remapping = False

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._remapping)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._remapping)
            self._remapping = True
            self._cond.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            with self._cond:
                self._remapping = False
                self._cond.notify_all()


@dataclasses.dataclass
class _Totals:
    used: int = 0
    entries: int = 0
    raw: int = 0


class DiskTier:
    """The disk tier.

    Args:
        path: directory of the LMDB environment (must exist).
        capacity_bytes: budget of stored records (``entry_cost`` each).
        ttl_s: idle time after which a block is no longer served.
        codec: turns blocks into records and back.
        metrics: sink for evictions, dropped writes, corrupt records and I/O errors.
        readonly: open for reading only (tools inspecting a store).

    Raises (at open):
        StoreOpenError: the directory cannot be opened as an LMDB environment.
        IncompatibleFormatError: the store was written by a newer format version.
    """

    name = "disk"

    def __init__(self, path: str | os.PathLike, capacity_bytes: int, ttl_s: float, codec: Codec,
                 metrics: Metrics | None = None, readonly: bool = False):
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes
        self.map_cap = 2 * capacity_bytes + _MIN_MAP
        self.ttl_s = ttl_s
        self.codec = codec
        self.metrics = metrics or Metrics()
        self.readonly = readonly
        self._lock = threading.RLock()  # writers, pending touches, reopen; never held by readers
        self._gate = _RemapGate()
        self._pending: dict[bytes, float] = {}  # key -> last access not yet written
        self._new_names: dict[int, str] = {}  # namespace names not yet written
        self._known_names: set[int] = set()
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self._open()
        self._fork_hooks()

    def _fork_hooks(self) -> None:
        """A fork waits for the write transaction in progress (the tier's lock), so none comes
        along to the child: closing an environment with another thread's write transaction
        open blocks forever. The child starts with fresh locks and reopens the environment on
        first use (``_check_pid``)."""
        tier = weakref.ref(self)

        def call(name: str) -> None:
            t = tier()
            if t is not None:
                getattr(t, name)()
        os.register_at_fork(before=lambda: call("_before_fork"),
                            after_in_parent=lambda: call("_after_fork_in_parent"),
                            after_in_child=lambda: call("_fresh_locks"))

    def _before_fork(self) -> None:
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    # -- environment -------------------------------------------------------------------------
    def _open(self) -> None:
        data = self.path / "data.mdb"
        with self._resizing():
            size = data.stat().st_size if data.exists() else 0
            if not self.readonly:
                self._allocate_lock_file()
            try:
                # Never less than the file: with writemap LMDB truncates the file to this size.
                env = lmdb.open(
                    str(self.path), map_size=size or _NEW_MAP, max_dbs=8, writemap=True,
                    metasync=True, sync=True, readahead=True, max_readers=512,
                    readonly=self.readonly, lock=True, mode=0o600, create=not self.readonly,
                )
            except lmdb.Error as e:
                raise StoreOpenError(f"{self.path}: cannot open the disk tier: {e}") from None
            self._env, self._pid, self._backed = env, os.getpid(), 0
            if not self.readonly and not size:
                try:
                    self._ensure_backed()
                except OSError as e:
                    env.close()
                    raise StoreOpenError(f"{self.path}: cannot create the disk tier: "
                                         f"{e.strerror or e}") from None
        def open_dbs(txn):
            """The databases and the stored format version; writes nothing unless the store is new."""
            dbs = {name: env.open_db(name, txn=txn, create=True) for name in _DBS}
            raw = txn.get(b"format", db=dbs[b"info"])
            if raw is None:
                txn.put(b"format", _U64.pack(DISK_FORMAT_VERSION), db=dbs[b"info"])
            return dbs, raw
        try:
            env.reader_check()
            if self.readonly:  # LMDB keeps handles opened in a read transaction only until it ends
                dbs = {name: env.open_db(name, create=False) for name in _DBS}
                with env.begin() as txn:
                    raw = txn.get(b"format", db=dbs[b"info"])
            else:
                dbs, raw = self._write(open_dbs)
        except (lmdb.Error, OSError) as e:
            env.close()
            raise StoreOpenError(f"{self.path}: cannot open the disk tier: {e}") from None
        version = _U64.unpack(raw)[0] if raw is not None else None
        if version is not None and version > DISK_FORMAT_VERSION:
            env.close()
            raise IncompatibleFormatError(
                f"{self.path}: written by disk format version {version}; this kvstore reads "
                f"up to {DISK_FORMAT_VERSION}: upgrade kvstore or use another path"
            )
        (self._records, self._meta, self._lru, self._info, self._names, self._purges,
         self._counters) = (dbs[name] for name in _DBS)

    def _fresh_locks(self) -> None:
        """In a forked child: locks of the parent's threads did not come along."""
        self._lock = threading.RLock()
        self._gate = _RemapGate()

    def _check_pid(self) -> None:
        # LMDB environments must not cross fork(): a child reopens its own. Closing the
        # inherited handle first is safe: no write transaction came along (see ``_fork_hooks``),
        # LMDB clears only reader slots of the calling pid, and the parent's file locks are not
        # the child's to release.
        if self._pid != os.getpid():
            self._pending.clear()
            self._gate = _RemapGate()
            self._env.close()
            self._open()

    @contextlib.contextmanager
    def _resizing(self):
        """Holds ``resize.lock``: one process at a time opens or changes its map (see top)."""
        if self.readonly:  # without writemap LMDB never truncates: nothing to serialize
            yield
            return
        fd = os.open(self.path / "resize.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a lock per open file: threads exclude each other too
            yield
        finally:
            os.close(fd)

    def _allocate_lock_file(self) -> None:
        """Creates LMDB's lock file allocated (or fills an existing one's holes): LMDB writes
        reader slots through a shared map, where an unallocated page on a full disk is SIGBUS."""
        lock = self.path / "lock.mdb"
        try:
            _allocate(lock, max(lock.stat().st_size if lock.exists() else 0, _LOCK_BYTES))
        except OSError as e:
            raise StoreOpenError(f"{lock}: cannot allocate the lock file: {e.strerror or e}") from None

    def _reserve(self, nbytes: int) -> None:
        """Allocates the data file up to ``nbytes`` (see ``_allocate``)."""
        _allocate(self.path / "data.mdb", nbytes)

    def _ensure_backed(self) -> None:
        """Before a write transaction: the data file is allocated up to the map size."""
        size = self._env.info()["map_size"]
        if self._backed < size:
            self._reserve(size)
            self._backed = size

    def _grow(self) -> bool:
        """Doubles the map up to ``map_cap``, reserving the file space first; on a nearly full
        disk asks for less, down to _MIN_STEP. False at ``map_cap``.

        Raises OSError: the disk cannot give even _MIN_STEP (ENOSPC), or an I/O error."""
        with self._resizing():
            current = self._env.info()["map_size"]
            on_disk = (self.path / "data.mdb").stat().st_size
            if on_disk > current:  # another process grew the file: map that first
                self._remap(on_disk)
                return True
            if current >= self.map_cap:
                return False
            step = min(self.map_cap, max(2 * current, _MIN_MAP)) - current
            while True:
                try:
                    self._reserve(current + step)
                    break
                except OSError as e:
                    if e.errno not in _NO_SPACE or step <= _MIN_STEP:
                        raise
                    step = max(_MIN_STEP, step // 2 // _MIN_STEP * _MIN_STEP)
            self._remap(current + step)
            self._backed = current + step
        return True

    def _remap(self, size: int) -> None:
        with self._gate.exclusive():
            self._env.set_mapsize(size)

    def _write(self, fn: Callable[[lmdb.Transaction], object]) -> object:
        """Runs ``fn`` in a write transaction, growing the map on MapFullError.

        ``fn`` may run more than once (an aborted transaction changed nothing).

        Raises lmdb.Error, or OSError (ENOSPC when the disk is full): nothing was written.
        """
        for _ in range(32):
            try:
                self._ensure_backed()
                with self._gate.shared(), self._env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self._adopt_map()
            except lmdb.MapFullError:
                if not self._grow():
                    raise
        raise lmdb.MapFullError("map could not be grown")  # pragma: no cover

    def _adopt_map(self) -> None:
        """Maps the size another process grew the file to (the file size: never less)."""
        with self._resizing():
            self._remap(max(self._env.info()["map_size"], (self.path / "data.mdb").stat().st_size))

    def _count_fault(self, e: Exception) -> str:
        """Counts a failed write (``io_errors``); returns why it failed, as a drop reason."""
        self.metrics.add("io_errors", tier=self.name)
        return "no_space" if isinstance(e, OSError) and e.errno in _NO_SPACE else "io_error"

    def _locked_write(self, fn: Callable[[lmdb.Transaction], object], fallback: object) -> object:
        """``_write`` under the tier's lock; a fault (full disk, I/O error) is counted and
        returns ``fallback``."""
        with self._lock:
            self._check_pid()
            try:
                return self._write(fn)
            except (lmdb.Error, OSError) as e:
                self._count_fault(e)
                return fallback

    def _forget_touches(self, written: dict[bytes, float]) -> None:
        """Drops pending last-access times that ``written`` stored (newer ones stay)."""
        for key, ts in written.items():
            if self._pending.get(key) == ts:
                del self._pending[key]

    @contextlib.contextmanager
    def _reading(self):
        """A short read transaction (``buffers=True``), run without the tier's lock."""
        with self._lock:
            self._check_pid()
        for attempt in range(2):
            with self._gate.shared():
                try:
                    txn = self._env.begin(buffers=True)
                except lmdb.MapResizedError:
                    if attempt:
                        raise
                else:
                    with txn:
                        yield txn
                    return
            self._adopt_map()

    # -- reads -------------------------------------------------------------------------------
    def _live_meta(self, txn, key: bytes, now: float) -> EntryMeta | None:
        raw = txn.get(key, db=self._meta)
        if raw is None:
            return None
        meta = _unpack_meta(raw)
        meta.last_access = max(meta.last_access, self._pending.get(key, 0.0))
        return None if is_expired(meta, now, self.ttl_s) else meta

    def contains_many(self, keys: Sequence[bytes], now: float, stop_at_miss: bool = False) -> list[bool]:
        # The hot path of every lookup (2,000 keys for a 128k-token prompt): read only the two
        # times from each packed meta, no EntryMeta objects.
        out: list[bool] = []
        pending, ttl = self._pending, self.ttl_s
        try:
            with self._reading() as txn:
                get, db = txn.get, self._meta
                for key in keys:
                    raw = get(key, db=db)
                    if raw is None:
                        hit = False
                    else:
                        last, pinned = _TIMES.unpack_from(raw, _TIMES_AT)
                        # A pending touch only makes an entry newer: look it up only if needed.
                        hit = is_live(last, pinned, now, ttl) or is_live(pending.get(key, 0.0), pinned, now, ttl)
                    out.append(hit)
                    if stop_at_miss and not hit:
                        break
        except lmdb.Error:
            self.metrics.add("io_errors", tier=self.name)
            return [False] * (1 if stop_at_miss else len(keys))
        return out

    def get_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor], now: float | None = None) -> list[bool]:
        """Decodes each record into ``outs[i]`` (CPU tensors); corrupt ones are removed."""
        ok: list[bool] = []
        corrupt: list[bytes] = []
        try:
            with self._reading() as txn:
                for key, out in zip(keys, outs):
                    if now is not None and self._live_meta(txn, key, now) is None:
                        ok.append(False)
                        continue
                    rec = txn.get(key, db=self._records)
                    if rec is None:
                        ok.append(False)
                        continue
                    try:
                        self.codec.decode(rec, out)  # straight from the map: one copy
                        ok.append(True)
                    except (CorruptEntryError, ValueError):
                        corrupt.append(key)
                        ok.append(False)
        except lmdb.Error:
            self.metrics.add("io_errors", tier=self.name)
            ok += [False] * (len(keys) - len(ok))
        if corrupt:
            self.metrics.add("corrupt_records", len(corrupt), tier=self.name)
            self._delete(corrupt, "corrupt")
        return ok

    def read_record(self, key: bytes) -> tuple[bytes, EntryMeta] | None:
        """A copy of the raw record and its metadata (for tools), or None."""
        with self._reading() as txn:
            rec, raw = txn.get(key, db=self._records), txn.get(key, db=self._meta)
            if rec is None or raw is None:
                return None
            return bytes(rec), _unpack_meta(raw)

    def entries(self) -> list[tuple[bytes, EntryMeta]]:
        """Every entry's key and metadata, in key order (one read transaction)."""
        with self._reading() as txn:
            return [(bytes(k), _unpack_meta(v)) for k, v in txn.cursor(db=self._meta)]

    def namespaces(self) -> dict[int, str]:
        with self._reading() as txn:
            return {_NS.unpack(bytes(k))[0]: bytes(v).decode() for k, v in txn.cursor(db=self._names)}

    def usage(self) -> TierUsage:
        with self._reading() as txn:
            t = self._totals(txn)
        return TierUsage(t.entries, t.used, t.raw, self.capacity_bytes)

    # -- writes ------------------------------------------------------------------------------
    def _totals(self, txn) -> _Totals:
        raw = txn.get(b"totals", db=self._info)
        return _Totals(*struct.unpack("<QQQ", raw)) if raw else _Totals()

    def _save_totals(self, txn, t: _Totals) -> None:
        txn.put(b"totals", struct.pack("<QQQ", t.used, t.entries, t.raw), db=self._info)

    def _remove(self, txn, key: bytes, meta: EntryMeta, t: _Totals) -> None:
        txn.delete(key, db=self._records)
        txn.delete(key, db=self._meta)
        txn.delete(lru_rank(meta.last_access, meta.depth) + key, db=self._lru)
        t.used -= meta.stored_bytes
        t.entries -= 1
        t.raw -= meta.raw_bytes

    def _set_meta(self, txn, key: bytes, old: EntryMeta | None, new: EntryMeta) -> None:
        if old is not None:
            txn.delete(lru_rank(old.last_access, old.depth) + key, db=self._lru)
        txn.put(lru_rank(new.last_access, new.depth) + key, b"", db=self._lru)
        txn.put(key, _pack_meta(new), db=self._meta)

    def _apply_touches(self, txn, touches: dict[bytes, float]) -> None:
        for key, ts in touches.items():
            raw = txn.get(key, db=self._meta)
            if raw is None:
                continue
            old = _unpack_meta(raw)
            if ts > old.last_access:
                self._set_meta(txn, key, old, dataclasses.replace(old, last_access=ts))

    def _lru_scan(self, txn, now: float, skip: set[bytes]):
        """Unpinned (key, meta) in eviction order, excluding ``skip``."""
        for rank_key, _ in txn.cursor(db=self._lru):
            key = bytes(rank_key[-16:])
            if key in skip:
                continue
            raw = txn.get(key, db=self._meta)
            if raw is None:  # pragma: no cover - lru and meta change together
                continue
            meta = _unpack_meta(raw)
            if not is_pinned(meta, now):
                yield key, meta

    def _expire_in(self, txn, now: float, t: _Totals, limit: int) -> list[Evicted]:
        gone = []
        for key, meta in self._lru_scan(txn, now, set()):
            if len(gone) >= limit or not is_expired(meta, now, self.ttl_s):
                break
            gone.append(Evicted(key, meta, None, "ttl"))
        for ev in gone:
            self._remove(txn, ev.key, ev.meta, t)
        return gone

    def put_many(self, entries: Sequence[BlockEntry], now: float,
                 on_evict: EvictCallback | None = None) -> list[bool]:
        """Encodes and stores ``entries`` in one write transaction (see ``Tier.put_many``).

        When the budget cannot hold them all, the deepest blocks are dropped (a batch may mix
        chains, e.g. spilled victims, which come deepest first): a parent is never dropped
        while its child is stored.
        """
        if self.readonly:
            raise PermissionError(f"{self.path}: disk tier opened read-only")
        order = sorted(range(len(entries)), key=lambda i: entries[i].meta.depth)
        if order != list(range(len(entries))):
            stored = self.put_many([entries[i] for i in order], now, on_evict)
            result = [False] * len(entries)
            for i, ok in zip(order, stored):
                result[i] = ok
            return result
        records = []
        for e in entries:
            rec = self.codec.encode(e.block)
            e.meta.stored_bytes = entry_cost(len(rec))
            records.append(rec)
        with self._lock:
            self._check_pid()
            touches = dict(self._pending)
            names = dict(self._new_names)
            try:
                stored, evicted = self._write(
                    lambda txn: self._put_txn(txn, entries, records, now, touches, names))
            except (lmdb.Error, OSError) as e:
                self.metrics.add("dropped_writes", len(entries), tier=self.name,
                                 reason=self._count_fault(e))
                return [False] * len(entries)
            self._forget_touches(touches)
            for ns_id in names:
                self._new_names.pop(ns_id, None)
        self.metrics.add("dropped_writes", stored.count(False), tier=self.name, reason="capacity")
        self._report(evicted, on_evict)
        return stored

    def _put_txn(self, txn, entries, records, now, touches, namespaces):
        evicted: list[Evicted] = []
        t = self._totals(txn)
        self._apply_touches(txn, touches)
        evicted += self._expire_in(txn, now, t, _EXPIRE_BATCH)
        present = [txn.get(e.key, db=self._meta) is not None for e in entries]
        new_cost = sum(e.meta.stored_bytes for e, p in zip(entries, present) if not p)
        batch = self._protected(txn, entries)
        # Keep as many entries (shallowest first) as the budget allows, then free that room.
        keep = len(entries)
        while keep and new_cost > self.capacity_bytes:
            keep -= 1
            if not present[keep]:
                new_cost -= entries[keep].meta.stored_bytes
        need = t.used + new_cost - self.capacity_bytes
        if need > 0:
            victims = []
            for key, meta in self._lru_scan(txn, now, batch):
                if need <= 0:
                    break
                victims.append(Evicted(key, meta, None, "capacity"))
                need -= meta.stored_bytes
            while need > 0 and keep:  # pinned blocks fill the budget: drop the tail instead
                keep -= 1
                if not present[keep]:
                    need -= entries[keep].meta.stored_bytes
            for ev in victims:
                self._remove(txn, ev.key, ev.meta, t)
            evicted += victims
        stored = []
        for i, (e, rec) in enumerate(zip(entries, records)):
            if present[i]:
                stored.append(True)
                continue
            if i >= keep:
                stored.append(False)
                continue
            txn.put(e.key, rec, db=self._records)
            self._set_meta(txn, e.key, None, e.meta)
            t.used += e.meta.stored_bytes
            t.entries += 1
            t.raw += e.meta.raw_bytes
            stored.append(True)
        for ns_id, name in namespaces.items():
            txn.put(_NS.pack(ns_id), name.encode(), db=self._names, overwrite=False)
        self._save_totals(txn, t)
        return stored, evicted

    def _protected(self, txn, entries) -> set[bytes]:
        """The batch and every ancestor of it: evicting a parent would orphan the batch."""
        keep = {e.key for e in entries}
        for e in entries:
            parent = e.meta.parent
            while parent and parent not in keep:
                keep.add(parent)
                raw = txn.get(parent, db=self._meta)
                parent = _unpack_meta(raw).parent if raw is not None else b""
        return keep

    def _report(self, evicted: list[Evicted], on_evict: EvictCallback | None) -> None:
        for reason in {ev.reason for ev in evicted}:
            self.metrics.add("evictions", sum(ev.reason == reason for ev in evicted),
                             tier=self.name, reason=reason)
        if on_evict is not None and evicted:
            on_evict(evicted)

    def register_namespace(self, ns_id: int, name: str) -> None:
        """Records the name of a namespace id (written with the next put, for tools)."""
        if ns_id not in self._known_names:
            with self._lock:
                self._new_names[ns_id] = name
                self._known_names.add(ns_id)

    def touch_many(self, keys: Sequence[bytes], now: float) -> None:
        with self._lock:
            for key in keys:
                self._pending[key] = now

    def flush(self) -> None:
        """Writes pending last-access times (one write transaction)."""
        if self.readonly:
            return
        with self._lock:
            self._check_pid()
            if not self._pending:
                return
            touches = dict(self._pending)

            def txn_fn(txn):
                self._apply_touches(txn, touches)
                return True
            if self._locked_write(txn_fn, False):
                self._forget_touches(touches)

    def pin_many(self, keys: Sequence[bytes], until: float) -> int:
        def txn_fn(txn):
            n = 0
            for key in keys:
                raw = txn.get(key, db=self._meta)
                if raw is not None:
                    old = _unpack_meta(raw)
                    txn.put(key, _pack_meta(dataclasses.replace(
                        old, pinned_until=max(old.pinned_until, until))), db=self._meta)
                    n += 1
            return n
        return self._locked_write(txn_fn, 0)

    def _delete(self, keys: Sequence[bytes], reason: str) -> list[Evicted]:
        def txn_fn(txn):
            t, gone = self._totals(txn), []
            for key in keys:
                raw = txn.get(key, db=self._meta)
                if raw is not None:
                    meta = _unpack_meta(raw)
                    self._remove(txn, key, meta, t)
                    gone.append(Evicted(key, meta, None, reason))
            self._save_totals(txn, t)
            if gone:
                self._log_removal(txn, [ev.key for ev in gone])
            return gone
        with self._lock:
            for key in keys:
                self._pending.pop(key, None)
            gone = self._locked_write(txn_fn, [])
        self._report(gone, None)
        return gone

    # -- removals other processes must see in their RAM tiers ----------------------------------
    # A purge or a corrupt record removes a block for good: a RAM copy in another process would
    # keep serving it. Each such removal bumps an epoch and logs the keys (the last
    # _PURGE_LOG_EPOCHS removals); stores poll the epoch and drop those keys from their RAM.
    def _log_removal(self, txn, keys: list[bytes]) -> None:
        raw = txn.get(b"purge_epoch", db=self._info)
        epoch = (_U64.unpack(raw)[0] if raw else 0) + 1
        txn.put(b"purge_epoch", _U64.pack(epoch), db=self._info)
        txn.put(_NS.pack(epoch), b"".join(keys), db=self._purges)
        old = epoch - _PURGE_LOG_EPOCHS
        if old > 0:
            txn.delete(_NS.pack(old), db=self._purges)

    def removal_epoch(self) -> int:
        """The count of purges/corrupt removals ever made in this store (by any process)."""
        with self._reading() as txn:
            raw = txn.get(b"purge_epoch", db=self._info)
        return _U64.unpack(raw)[0] if raw else 0

    def removals_since(self, epoch: int) -> tuple[int, set[bytes] | None]:
        """``(current epoch, keys removed after epoch)``; None for the keys when the log no
        longer reaches back that far (drop everything)."""
        with self._reading() as txn:
            raw = txn.get(b"purge_epoch", db=self._info)
            now = _U64.unpack(raw)[0] if raw else 0
            keys: set[bytes] | None = set()
            for e in range(epoch + 1, now + 1):
                rec = txn.get(_NS.pack(e), db=self._purges)
                if rec is None:
                    return now, None
                rec = bytes(rec)
                keys.update(rec[i:i + 16] for i in range(0, len(rec), 16))
        return now, keys

    # -- lifetime counters of every process, for tools outside the engine -------------------
    def add_counters(self, deltas: dict[str, float]) -> None:
        """Adds ``deltas`` (series name -> increment) to the store's lifetime counters."""
        if self.readonly or not deltas:
            return

        def txn_fn(txn):
            for name, delta in deltas.items():
                key = name.encode()
                raw = txn.get(key, db=self._counters)
                old = struct.unpack("<d", raw)[0] if raw else 0.0
                txn.put(key, struct.pack("<d", old + delta), db=self._counters)
        self._locked_write(txn_fn, None)

    def counters(self) -> dict[str, float]:
        """Lifetime counters summed over every process that used the store."""
        with self._reading() as txn:
            return {bytes(k).decode(): struct.unpack("<d", v)[0] for k, v in txn.cursor(db=self._counters)}

    def delete_many(self, keys: Sequence[bytes]) -> int:
        return len(self._delete(keys, "purge"))

    def purge(self, select: Callable[[bytes, EntryMeta], bool], now: float) -> list[Evicted]:
        chosen = [k for k, m in self.entries() if select(k, m)]
        gone = []
        for i in range(0, len(chosen), 4096):  # bounded write transactions
            gone += self._delete(chosen[i:i + 4096], "purge")
        return gone

    def expire(self, now: float) -> list[Evicted]:
        with self._lock:
            self._check_pid()
            touches = dict(self._pending)

            def txn_fn(txn):  # recent uses first: they decide what is idle
                self._apply_touches(txn, touches)
                t = self._totals(txn)
                gone = self._expire_in(txn, now, t, 1 << 62)
                self._save_totals(txn, t)
                return gone
            gone = self._locked_write(txn_fn, None)
            if gone is None:
                return []
            self._forget_touches(touches)
        self._report(gone, None)
        return gone

    def close(self) -> None:
        with self._lock:
            if self._env is not None and self._pid == os.getpid():
                self.flush()
                self._env.close()
            self._env = None
