"""Readahead for cold records: ask the kernel for a batch's pages before decoding them.

A record read straight from LMDB's memory map is otherwise faulted in by the decoding thread,
a small read-around at a time, each one a synchronous disk round trip. ``madvise(WILLNEED)``
on every record of a batch queues all of their reads at once (the kernel reads them
asynchronously into the page cache), and decoding in file order then meets pages that are
arriving in that order. Pages already cached cost a lookup. Where ``madvise`` is not available
the calls do nothing: reads are then only slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from collections.abc import Iterable

import numpy as np

_MADV_WILLNEED = 3  # the same value on Linux and the BSDs
_PAGE = mmap.PAGESIZE


def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_madvise_fn = _madvise()


def address(view) -> int:
    """The memory address of a buffer (an LMDB value read with ``buffers=True``)."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


def will_need(views: Iterable) -> None:
    """Starts reading the pages behind each buffer of ``views`` (views into a file mapping).

    Advisory only: errors are ignored, nothing is waited for."""
    if _madvise_fn is None:
        return
    for v in views:
        n = len(v)
        if not n:
            continue
        start = address(v)
        first = start - start % _PAGE
        _madvise_fn(first, start + n - first, _MADV_WILLNEED)
