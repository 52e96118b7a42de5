"""Readahead asks the kernel for a record's pages: after ``will_need`` on a view into a file
mapping whose pages were dropped from the page cache, those pages become resident without
being touched (checked with mincore)."""

import ctypes
import mmap
import os
import time

import numpy as np
import pytest

from kvstore.tiers.disk import readahead

PAGE = mmap.PAGESIZE


def _resident(mm: mmap.mmap, addr: int, n: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * (-(-n // PAGE)))()
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(n), vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec)


@pytest.mark.skipif(readahead._madvise_fn is None, reason="no madvise on this platform")
def test_will_need_reads_the_pages_of_a_view_into_the_page_cache(tmp_path):
    path = tmp_path / "data"
    n = 256 * PAGE
    with open(path, "wb") as f:
        f.write(os.urandom(n))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        mm = mmap.mmap(fd, n, prot=mmap.PROT_READ)
        view = memoryview(mm)[64 * PAGE + 100:192 * PAGE]  # not page-aligned at its start
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
        assert readahead.address(view) == addr
        base = addr - (64 * PAGE + 100)
        if _resident(mm, base, n) > 16:
            pytest.skip("the page cache kept the file (fadvise DONTNEED ignored here)")
        readahead.will_need([view])
        deadline = time.monotonic() + 10
        while _resident(mm, base + 64 * PAGE, 128 * PAGE) < 128 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _resident(mm, base + 64 * PAGE, 128 * PAGE) == 128
        view.release()
        mm.close()
    finally:
        os.close(fd)
