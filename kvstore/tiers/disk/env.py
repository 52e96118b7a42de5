"""LMDBEnv: one LMDB environment shared by the disk tier and the store's own records.

Every LMDB rule of the project lives in this module (the only one that imports ``lmdb``):
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
- never ``readahead=False`` (measured 30 MB/s cold); a store of small blocks advises
  ``MADV_RANDOM`` itself (``access_randomly``), re-advised after LMDB maps anew;
- ``metasync=False``: a commit syncs its data pages but not its meta page: one sync a commit
  instead of two, and LMDB keeps the database consistent. With writemap a commit's sync is an
  ``msync`` of the whole map, made before it writes its own meta page, so it also carries every
  earlier commit's meta page to the disk: only the newest commit waits for a later commit or
  ``sync()``. ``sync()`` skips the disk when the commits that asked to be durable are on it
  already (``write(durable=False)``: last-access times and counters, which a later commit
  carries). A process crash loses nothing committed (the page cache holds it); an OS crash can
  undo the newest commit not followed by ``sync()``. Never ``sync=False``: with writemap an OS
  crash could then corrupt the database, not just lose commits;
- the environment belongs to the process that opened it: a forked child reopens it;
- every open holds ``open.lock`` shared for the environment's life; ``compact`` takes it
  exclusive, so a compaction never swaps the file under a process that maps it, and an open
  waits for a compaction in progress to finish.

A read-only environment writes nothing (no lock-file allocation, no ``resize.lock``, no database
created) and works on a read-only mount, where LMDB runs without its lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import struct
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import lmdb

from ...errors import IncompatibleFormatError, StoreBusyError, StoreOpenError
from .readahead import advise_random

LMDBError = lmdb.Error  # what a transaction raises for a fault inside LMDB
DISK_FORMAT_VERSION = 1
# Databases: records, meta and lru belong to the tier (schema.py); info holds the format version,
# totals and the removal epoch; the rest are the store's own records (ledger.py, removals.py).
DBS = (b"records", b"meta", b"lru", b"info", b"namespaces", b"purges", b"counters", b"settings")
_U64 = struct.Struct("<Q")
_NEW_MAP = 1 << 20  # a new store's first map; growth reserves the rest as it is needed
_MIN_MAP = 64 << 20
_MIN_STEP = 1 << 20  # the smallest growth asked of a nearly full disk
# The size LMDB gives its lock file for max_readers=512: 511 64-byte reader slots after a 192-byte
# header. Created at exactly this size, LMDB keeps it as it is (a larger file means more readers,
# which processes that mapped the smaller one would not see).
_LOCK_BYTES = 32896
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_META_PAGES = 2 * 4096  # the smallest LMDB data file: its two meta pages


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


class LMDBEnv:
    """The environment at ``path`` (a directory that must exist) and its named databases.

    Args:
        path: the environment's directory.
        map_cap: the largest map (and data file) this process grows to.
        readonly: open for reading only; the environment must already exist.
        exclusive: the only process with the environment open (``compact`` needs it); refused,
            not waited for, when others have it open.

    Raises (at open):
        StoreOpenError: the directory cannot be opened (or, read-only, holds no environment).
        StoreBusyError: ``exclusive`` and other processes have the environment open.
        IncompatibleFormatError: the store was written by a newer format version.
    """

    def __init__(self, path: str | os.PathLike, map_cap: int, readonly: bool = False,
                 exclusive: bool = False):
        self.path = Path(path)
        self.map_cap = max(map_cap, _MIN_MAP)
        self.readonly = readonly
        self.exclusive = exclusive
        self.lock = threading.RLock()  # writers and reopen; never held by readers
        self._after_fork: list[Callable[[], None]] = []
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self.random_access = False  # see access_randomly
        self._users = self._hold_open_lock()
        try:
            self._open()
        except BaseException:
            if self._users is not None:
                os.close(self._users)
            raise
        self._fork_hooks()

    def _hold_open_lock(self) -> int | None:
        """Takes ``open.lock`` (shared, or exclusive without waiting) and returns its descriptor,
        held until ``close``. A forked child shares the parent's descriptor, and with it the lock.
        A read-only open where the lock file cannot be created (a read-only mount) goes without:
        nothing can compact such a store.

        Raises StoreBusyError: ``exclusive`` and another process holds the lock."""
        lock = self.path / "open.lock"
        try:
            fd = os.open(lock, os.O_RDONLY if self.readonly else os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            if self.readonly:
                return None
            raise StoreOpenError(f"{lock}: cannot create the open lock") from None
        try:
            if self.exclusive:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StoreBusyError(f"{self.path.parent}: in use by {_holders(lock)}: stop "
                                         "them (engines, kvstore commands) and try again") from None
            else:
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a compaction swaps the file
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fork_hooks(self) -> None:
        """A fork waits for the write transaction in progress (``lock``), so none comes along to
        the child: closing an environment with another thread's write transaction open blocks
        forever. The child starts with fresh locks and reopens the environment on first use
        (``check_pid``)."""
        ref = weakref.ref(self)

        def call(fn) -> None:
            env = ref()
            if env is not None:
                fn(env)
        os.register_at_fork(before=lambda: call(lambda e: e.lock.acquire()),
                            after_in_parent=lambda: call(lambda e: e.lock.release()),
                            after_in_child=lambda: call(LMDBEnv._fresh_locks))

    def _fresh_locks(self) -> None:
        """In a forked child: locks held by the parent's threads did not come along."""
        self.lock = threading.RLock()
        self._gate = _RemapGate()

    def on_reopen(self, fn: Callable[[], None]) -> None:
        """Registers ``fn``, called (under ``lock``) when a forked child reopens the environment."""
        self._after_fork.append(fn)

    # -- open, fork ----------------------------------------------------------------------------
    def _open(self) -> None:
        data = self.path / "data.mdb"
        self._gate = _RemapGate()
        # LMDB transaction ids: this process's newest commit, its newest one that asked to be
        # durable, and one that every commit up to is on the disk (meta page included). A forked
        # child starts afresh: the parent syncs its own.
        self._last = self._durable = self._synced = 0
        if self.readonly and (not data.exists() or data.stat().st_size < _META_PAGES):
            # Refused before LMDB sees it: opening would create a lock file beside it.
            raise StoreOpenError(f"{self.path}: cannot open the disk tier: no LMDB data file "
                                 f"here ({'missing' if not data.exists() else 'too short'})")
        with self._resizing():
            size = data.stat().st_size if data.exists() else 0
            if not self.readonly:
                self._allocate_lock_file()
            try:
                # Never less than the file: with writemap LMDB truncates the file to this size.
                env = lmdb.open(
                    str(self.path), map_size=size or _NEW_MAP, max_dbs=16, writemap=True,
                    metasync=False, sync=True, readahead=True, max_readers=512,
                    readonly=self.readonly, lock=True, mode=0o600, create=not self.readonly,
                )
            except lmdb.Error as e:
                raise StoreOpenError(f"{self.path}: cannot open the disk tier: {e}") from None
            self._env, self._pid, self._backed = env, os.getpid(), 0
            self._advise()
            if not self.readonly and not size:
                try:
                    self._ensure_backed()
                except OSError as e:
                    env.close()
                    raise StoreOpenError(f"{self.path}: cannot create the disk tier: "
                                         f"{e.strerror or e}") from None

        def open_dbs(txn):
            """The databases and the stored format version; writes nothing unless the store is new."""
            dbs = {name: env.open_db(name, txn=txn, create=True) for name in DBS}
            raw = txn.get(b"format", db=dbs[b"info"])
            if raw is None:
                txn.put(b"format", _U64.pack(DISK_FORMAT_VERSION), db=dbs[b"info"])
            return dbs, raw
        try:
            if not self.readonly:
                env.reader_check()
                dbs, raw = self.write(open_dbs)
            else:  # LMDB keeps handles opened in a read transaction only until it ends
                dbs = {}
                for name in DBS:
                    try:
                        dbs[name] = env.open_db(name, create=False)
                    except lmdb.NotFoundError:  # a database a newer kvstore added: read as empty
                        dbs[name] = None
                if dbs[b"info"] is None:
                    raise lmdb.NotFoundError("not a kvstore disk tier")
                with env.begin() as txn:
                    raw = txn.get(b"format", db=dbs[b"info"])
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
        self.dbs = dbs

    def check_pid(self) -> None:
        """In a forked child: reopens the environment (call under ``lock``).

        LMDB environments must not cross fork(): a child reopens its own. Closing the inherited
        handle first is safe: no write transaction came along (``_fork_hooks``), LMDB clears only
        reader slots of the calling pid, and the parent's file locks are not the child's to
        release."""
        if self._pid != os.getpid():
            self._env.close()
            self._open()
            for fn in self._after_fork:
                fn()

    def reader_check(self) -> int:
        """Clears reader slots of processes that died holding them; returns how many."""
        with self.lock:
            self.check_pid()
            return self._env.reader_check()

    def readers(self) -> str:
        """LMDB's reader table as text (one line per slot: pid, thread, txn id)."""
        return self._env.readers()

    def info(self) -> dict:
        return self._env.info()

    def file_usage(self) -> dict[str, int]:
        """How the data file is used: ``file_bytes`` (its size; allocated up to the map, and
        it never shrinks), ``written_bytes`` (LMDB's high-water mark: the pages ever used),
        ``data_bytes`` (pages the databases hold now: records, metadata, indexes) and
        ``free_bytes`` (written pages free for reuse by later writes; LMDB's own free list is
        counted among them, which it is too small to matter).
        """
        with self.reading() as txn:
            info, main = self._env.info(), self._env.stat()
            stats = [main] + [txn.stat(db) for db in self.dbs.values() if db is not None]
        psize = main["psize"]
        data = 2 + sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats)  # 2: meta pages
        written = info["last_pgno"] + 1
        return {"file_bytes": (self.path / "data.mdb").stat().st_size, "written_bytes": written * psize,
                "data_bytes": data * psize, "free_bytes": max(written - data, 0) * psize}

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

    # -- map growth ------------------------------------------------------------------------------
    def _reserve(self, nbytes: int) -> None:
        """Allocates the data file up to ``nbytes`` (see ``_allocate``)."""
        _allocate(self.path / "data.mdb", nbytes)

    def _ensure_backed(self) -> None:
        """Before a write transaction: the data file is allocated up to the map size."""
        size = self._env.info()["map_size"]
        if self._backed < size:
            self._reserve(size)
            self._backed = size

    def _fits(self, nbytes: int) -> bool:
        """Whether a write transaction can take ``nbytes`` of pages without growing the map: in
        the map's never-written pages, or with the free pages too (LMDB reuses free pages first,
        though not those an open read transaction still sees: MapFullError stays possible)."""
        info = self._env.info()
        unused = info["map_size"] - (info["last_pgno"] + 1) * self._env.stat()["psize"]
        return unused >= nbytes or unused + self.file_usage()["free_bytes"] >= nbytes

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
                    if e.errno not in NO_SPACE or step <= _MIN_STEP:
                        raise
                    step = max(_MIN_STEP, step // 2 // _MIN_STEP * _MIN_STEP)
            self._remap(current + step)
            self._backed = current + step
        return True

    def _remap(self, size: int) -> None:
        with self._gate.exclusive():
            self._env.set_mapsize(size)
            self._advise()  # LMDB mapped the file anew

    # -- access advice -----------------------------------------------------------------------------
    def access_randomly(self) -> None:
        """From now on this process maps the data file with ``MADV_RANDOM``, for a store whose
        records all live inside LMDB's leaf pages (small blocks): every access is then one page
        at a random place. Without it a fault reads around its page into a large folio, and a
        commit's sync writes back every folio it dirtied whole: 28 pages a 64-byte block stored
        on a full store, against 4.2 (docs/benchmarks.md). Not for large records: their
        readahead would go (cold loads measured at 0.13 GB/s, against 1.15)."""
        self.random_access = True
        self._advise()

    def _advise(self) -> None:
        if self.random_access and self._env is not None:
            advise_random((self.path / "data.mdb").resolve())

    def _adopt_map(self) -> None:
        """Maps the size another process grew the file to (the file size: never less)."""
        with self._resizing():
            self._remap(max(self._env.info()["map_size"], (self.path / "data.mdb").stat().st_size))

    # -- transactions ------------------------------------------------------------------------------
    def write(self, fn: Callable[[lmdb.Transaction], object], room: int = 0,
              durable: bool = True) -> object:
        """Runs ``fn`` in a write transaction, growing the map on MapFullError. Call under
        ``lock``. ``fn`` may run more than once (an aborted transaction changed nothing).

        ``durable=False``: ``sync()`` need not wait for this commit; the next commit (or
        ``close``) carries it to the disk, and an OS crash before then may undo it.

        ``room``: about how many bytes of pages ``fn`` writes. When the map cannot hold them
        the map grows first: a transaction that fills the map is thrown away and run again
        (a fresh store's first 62 MB of records cost two runs of their transaction).

        Raises lmdb.Error, or OSError (ENOSPC when the disk is full): nothing was written.
        """
        if self.readonly:
            raise PermissionError(f"{self.path}: disk tier opened read-only")
        try:
            while room and not self._fits(room) and self._grow():
                pass
        except OSError:
            pass  # a nearly full disk: the transaction may fit all the same (MapFullError if not)
        for _ in range(32):
            try:
                self._ensure_backed()
                with self._gate.shared():
                    with self._env.begin(write=True) as txn:
                        t = txn.id()
                        out = fn(txn)
                    self._committed(t, durable)
                return out
            except lmdb.MapResizedError:
                self._adopt_map()
            except lmdb.MapFullError:
                if not self._grow():
                    raise
        raise lmdb.MapFullError("map could not be grown")  # pragma: no cover

    def _committed(self, t: int, durable: bool) -> None:
        """Notes commit ``t``. LMDB commits a transaction that wrote nothing without a sync or
        a meta page (the newest id stays below ``t``); otherwise the commit with id ``t``
        (ours, or another process's when ours was empty) synced the map before writing its own
        meta page, carrying every earlier commit to the disk."""
        if self._env.info()["last_txnid"] < t:
            return
        self._synced = max(self._synced, t - 1)
        self._last = max(self._last, t)
        if durable:
            self._durable = max(self._durable, t)

    @contextlib.contextmanager
    def reading(self):
        """A short read transaction (``buffers=True``), run without ``lock``."""
        with self.lock:
            self.check_pid()
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

    # -- compaction ------------------------------------------------------------------------------
    def compact(self, progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, int]]:
        """Replaces the data file with LMDB's compacting copy: only the pages in use, free pages
        dropped, every database (records, settings, counters, ...) kept. Needs ``exclusive``.

        The copy is made beside the file, checked (every database holds as many entries), synced
        and renamed over the file; a failure leaves the old file as it was. ``progress(done,
        total)`` is called about 10 times a second with the bytes copied and those to copy.

        Returns ``{"before": file_usage(), "after": file_usage()}``.
        Raises StoreOpenError: the copy failed (no space, I/O error) or does not match.
        """
        if not self.exclusive or self.readonly:
            raise PermissionError(f"{self.path}: compaction needs the environment opened exclusive")
        before = self.file_usage()
        tmp = self.path / "compact.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a compaction killed half-way left it
        tmp.mkdir(mode=0o700)
        try:
            with self.lock:
                self._copy_compacted(tmp, before["data_bytes"], progress)
                expected = self._entry_counts(self._env)
                copy = lmdb.open(str(tmp), readonly=True, lock=False, max_dbs=16)
                try:
                    got = self._entry_counts(copy)
                finally:
                    copy.close()
                if got != expected:
                    raise StoreOpenError(f"{self.path}: the compacted copy does not match "
                                         f"(entries {got} instead of {expected}); store left as it was")
                fd = os.open(tmp / "data.mdb", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # Nobody else maps the file (open.lock): close ours, swap, reopen the copy.
                self._env.close()
                self._env = None
                os.replace(tmp / "data.mdb", self.path / "data.mdb")
                dfd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                self._open()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"before": before, "after": self.file_usage()}

    def _copy_compacted(self, tmp: Path, total: int, progress: Callable[[int, int], None] | None) -> None:
        """``env.copy(compact=True)`` into ``tmp`` on a thread, reporting the copy's growth."""
        failed: list[BaseException] = []

        def copy() -> None:
            try:
                with self._gate.shared():
                    self._env.copy(str(tmp), compact=True)
            except BaseException as e:  # reported on the caller's thread
                failed.append(e)
        if progress is not None:
            progress(0, total)  # the start: a rate shown is over the whole copy
        t = threading.Thread(target=copy, name="kvstore-compact", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.1)
            if progress is not None:
                out = tmp / "data.mdb"
                progress(out.stat().st_size if out.exists() else 0, total)
        if failed:
            e = failed[0]
            raise StoreOpenError(f"{self.path}: compaction failed, store left as it was: "
                                 f"{getattr(e, 'strerror', None) or e}") from None

    def _entry_counts(self, env: lmdb.Environment) -> dict[str, int]:
        out = {}
        with env.begin() as txn:
            for name in DBS:
                try:
                    db = env.open_db(name, txn=txn, create=False)
                except lmdb.NotFoundError:
                    continue
                out[name.decode()] = txn.stat(db)["entries"]
        return out

    def sync(self, everything: bool = False) -> None:
        """Makes every commit of this process that asked to be durable (with ``everything``,
        every commit) reach the disk, meta page included (see ``metasync``); no disk work when a
        later commit's sync carried them.

        Raises lmdb.Error or OSError on an I/O fault."""
        if self.readonly:
            return
        with self.lock:
            self.check_pid()
            if self._synced >= (self._last if everything else self._durable):
                return
            with self._gate.shared():
                newest = self._env.info()["last_txnid"]
                self._env.sync(True)
            self._synced = max(self._synced, newest)

    def close(self) -> None:
        """Syncs this process's commits not on the disk yet (a fault is dropped: closing a
        cache never fails), then closes."""
        with self.lock:
            if self._env is not None and self._pid == os.getpid():
                with contextlib.suppress(lmdb.Error, OSError):
                    self.sync(everything=True)
                self._env.close()
            self._env = None
            if self._users is not None:
                os.close(self._users)
                self._users = None


def _holders(lock: Path) -> str:
    """The processes holding ``lock`` (from /proc/locks: pid and command line), for a refusal."""
    try:
        inode = lock.stat().st_ino
        with open("/proc/locks") as f:
            pids = sorted({int(p[4]) for p in (line.split() for line in f)
                           if len(p) > 5 and p[1] == "FLOCK" and p[5].endswith(f":{inode}")
                           and p[4].isdigit() and int(p[4]) != os.getpid()})
    except (OSError, ValueError):
        pids = []
    if not pids:
        return "another process"
    names = []
    for pid in pids[:5]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        names.append(f"pid {pid}" + (f" ({cmd[:60]})" if cmd else ""))
    more = f" and {len(pids) - 5} more" if len(pids) > 5 else ""
    return ", ".join(names) + more
