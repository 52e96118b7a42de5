"""How the kernel reads the data file: ask it for a cold record's pages before decoding it
(``will_need``), and for one page at a time on a small-block store's map (``advise_random``).

A record read straight from LMDB's memory map is otherwise faulted in by the decoding thread,
a read-around at a time, each one a synchronous disk round trip. ``madvise(WILLNEED)`` queues
a record's reads at once (the kernel reads them asynchronously into the page cache), so a
decoder that asks for the records ahead of the one it decodes meets pages that have arrived.
One call reads at most max(``read_ahead_kb``, ``max_sectors_kb``) of the device (measured: a
64 MiB request read 8 MiB here, 4 MiB with ``read_ahead_kb`` at 128), so a view is asked for in
pieces of ``CHUNK`` bytes, under any device's limit. A record whose second and last pages are
already cached (``mincore``) was read whole before and is not asked for again: asking walks
every page in the kernel, measured at 5-15% of a warm load. The first page says nothing (looking
a record up touches it); the second is the first to go when the kernel evicts a record's pages
oldest first. A record with a page missing in between is read by faults: slower, never
wrong. Where ``madvise`` is not available the calls do nothing: reads are then only slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
from collections.abc import Iterable

import numpy as np

_MADV_RANDOM, _MADV_WILLNEED = 1, 3  # the same values on Linux and the BSDs
_PAGE = mmap.PAGESIZE
CHUNK = 256 << 10  # bytes a call; the smallest common read_ahead_kb is 128 KiB, max_sectors_kb larger


def _libc_fn(name: str, *argtypes):
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_madvise_fn = _libc_fn("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mincore_fn = _libc_fn("mincore", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_local = threading.local()  # each thread's one-page mincore vector


def _cached(page: int) -> bool:
    """Whether the page at address ``page`` (page-aligned) is in the page cache."""
    if _mincore_fn is None:
        return False
    vec = getattr(_local, "vec", None)
    if vec is None:
        vec = _local.vec = (ctypes.c_ubyte * 1)()
    return _mincore_fn(page, 1, vec) == 0 and bool(vec[0] & 1)


def address(view) -> int:
    """The memory address of a buffer (an LMDB value read with ``buffers=True``)."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


def will_need(views: Iterable) -> None:
    """Starts reading all of the pages behind each buffer of ``views`` (views into a file
    mapping), in calls of at most ``CHUNK`` bytes; skips a buffer read whole before (see above).

    Advisory only: errors are ignored, nothing is waited for."""
    if _madvise_fn is None:
        return
    for v in views:
        n = len(v)
        if not n:
            continue
        start = address(v)
        end = start + n
        head, last = start - start % _PAGE, (end - 1) - (end - 1) % _PAGE
        if _cached(last) and (last <= head + _PAGE or _cached(head + _PAGE)):
            continue
        for first in range(head, end, CHUNK):
            _madvise_fn(first, min(CHUNK, end - first), _MADV_WILLNEED)


def advise_random(path) -> int:
    """Advises ``MADV_RANDOM`` on this process's mappings of the file at ``path`` (found in
    ``/proc/self/maps``): the kernel then faults in a page alone, where it would read around it
    into a large folio (up to 2 MiB) that a write to any of its pages dirties, and a sync writes
    back, whole. Returns how many mappings were advised (0 where there is no ``/proc``).

    Advisory only: errors are ignored."""
    if _madvise_fn is None:
        return 0
    name = str(path)
    try:
        with open("/proc/self/maps") as f:
            spans = [line.split(None, 5) for line in f]
    except OSError:
        return 0
    n = 0
    for span in spans:
        if len(span) == 6 and span[5].rstrip("\n") == name:
            start, end = (int(x, 16) for x in span[0].split("-"))
            n += _madvise_fn(start, end - start, _MADV_RANDOM) == 0
    return n
