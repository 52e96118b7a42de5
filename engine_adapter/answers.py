"""The server's own answers: by tenant and text, the token ids it generated them as.

Why: a chat that sends an answer back as text gets it re-tokenized by the template, often into
other ids than the ones generated (and stored), so the cached prefix breaks right after the
earlier prompt (see chat_prompt.py). Kept in a log file beside the store, so a restarted server
still feeds its earlier answers back as their ids and the conversation keeps hitting disk.

The log is best effort, like the cache: an unreadable or unwritable file leaves the book in
memory only (logged once, counted in ``faults``); a torn or corrupt record (a crash mid-append)
is skipped on replay, never read as ids. Each record is one ``write`` on an ``O_APPEND`` file,
so several server processes on one store can share the log.

Record: magic ``b"KVA1"``, payload length (u32), xxh64 of the payload (u64), then the payload:
the 16-byte key (xxh3-128 of tenant and text) and the ids as u32.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import struct
import threading
from array import array
from collections.abc import Sequence
from pathlib import Path

import xxhash

log = logging.getLogger(__name__)

__all__ = ["AnswerBook"]

_MAGIC = b"KVA1"
_HEAD = struct.Struct("<4sIQ")
_KEY = 16
# Replay rewrites the log to the live entries once it holds this many times the capacity.
_COMPACT_FACTOR = 4


class AnswerBook:
    """Answers this server generated, by tenant and text: the content token ids to feed back.

    Bounded (least recently used go first). With ``path`` the entries are also appended to a
    log there and replayed by the next book opened on it; without, memory only. Thread-safe.
    Never raises for a file problem: the book then stays in memory (``faults`` counts them).
    """

    def __init__(self, capacity: int = 4096, path: str | os.PathLike | None = None):
        if capacity < 0:
            raise ValueError(f"capacity: expected >= 0, got {capacity}")
        self.capacity = capacity
        self.path = Path(path) if path is not None else None
        self.faults = 0
        self._lock = threading.Lock()
        self._ids: collections.OrderedDict[bytes, tuple[int, ...]] = collections.OrderedDict()
        self._fd: int | None = None
        if self.path is not None and capacity:
            self._open()

    @staticmethod
    def _key(tenant: str, text: str) -> bytes:
        return xxhash.xxh3_128_digest(tenant.encode() + b"\0" + text.encode())

    def remember(self, tenant: str, text: str, ids: Sequence[int]) -> None:
        """Records that ``text`` (as returned to the client) was generated as ``ids``."""
        if not text or not ids or not self.capacity:
            return
        key = self._key(tenant, text)
        with self._lock:
            self._put(key, tuple(ids))
            if self._fd is not None:
                self._append(key, ids)

    def lookup(self, tenant: str, text: str) -> list[int] | None:
        """The ids ``text`` was generated as for ``tenant``, or None."""
        key = self._key(tenant, text)
        with self._lock:
            ids = self._ids.get(key)
            if ids is not None:
                self._ids.move_to_end(key)
        return None if ids is None else list(ids)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __len__(self) -> int:
        return len(self._ids)

    # -- memory ---------------------------------------------------------------------------------
    def _put(self, key: bytes, ids: tuple[int, ...]) -> None:
        self._ids[key] = ids
        self._ids.move_to_end(key)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    # -- the log --------------------------------------------------------------------------------
    def _fault(self, what: str, e: OSError) -> None:
        self.faults += 1
        if self.faults == 1:
            log.warning("answer log %s: %s: %s; own answers are kept in memory only", self.path, what,
                        e.strerror or e)

    def _open(self) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            self._fault("cannot open", e)
            return
        try:
            # Exclusive while replaying: a compaction must not race another process's replay.
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                records = self._replay(fd)
                if records > _COMPACT_FACTOR * self.capacity:
                    fd = self._compact(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as e:
            os.close(fd)
            self._fault("cannot read", e)
            return
        self._fd = fd

    def _replay(self, fd: int) -> int:
        """Loads every intact record in file order (later ones are more recent); returns how
        many there were. A damaged stretch is skipped up to the next record's magic."""
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        pos, n = 0, 0
        while True:
            pos = data.find(_MAGIC, pos)
            if pos < 0 or pos + _HEAD.size > len(data):
                return n
            _, length, digest = _HEAD.unpack_from(data, pos)
            body = data[pos + _HEAD.size: pos + _HEAD.size + length]
            if (len(body) != length or length < _KEY or (length - _KEY) % 4
                    or xxhash.xxh64_intdigest(body) != digest):
                pos += 1  # torn or corrupt: resynchronise on the next magic
                continue
            self._put(bytes(body[:_KEY]), tuple(array("I", body[_KEY:])))
            pos += _HEAD.size + length
            n += 1

    def _compact(self, fd: int) -> int:
        """Rewrites the log to the entries in memory (oldest first) and returns the new fd."""
        assert self.path is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(out, b"".join(self._record(k, ids) for k, ids in self._ids.items()))
            os.fsync(out)
        finally:
            os.close(out)
        os.replace(tmp, self.path)
        new = os.open(self.path, os.O_RDWR | os.O_APPEND)
        fcntl.flock(new, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return new

    @staticmethod
    def _record(key: bytes, ids: Sequence[int]) -> bytes:
        body = key + array("I", ids).tobytes()
        return _HEAD.pack(_MAGIC, len(body), xxhash.xxh64_intdigest(body)) + body

    def _append(self, key: bytes, ids: Sequence[int]) -> None:
        assert self._fd is not None and self.path is not None
        try:
            # Another process may have compacted the log since: follow it to the new file.
            if os.stat(self.path).st_ino != os.fstat(self._fd).st_ino:
                fd, self._fd = self._fd, None
                os.close(fd)
                self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            os.write(self._fd, self._record(key, ids))  # one write: whole on an O_APPEND file
        except (OSError, OverflowError) as e:
            self._fault("cannot append", e if isinstance(e, OSError) else OSError(str(e)))
