"""Readahead asks the kernel for a record's pages: after ``will_need`` on a view into a file
mapping whose pages were dropped from the page cache, those pages become resident without
being touched (checked with mincore), all of them however large the view; a view read whole
before is not asked for again, one whose second or last page was dropped is; and a disk load
asks for the records ahead of the one it decodes, not for all of them before the first."""

import contextlib
import ctypes
import mmap
import os
import time

import numpy as np
import pytest
import torch

from kvstore.tiers.disk import readahead, tier as disk_tier

from ..conftest import BLOCK_TOKENS as B, make_block

PAGE = mmap.PAGESIZE


def _resident(mm: mmap.mmap, addr: int, n: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * (-(-n // PAGE)))()
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(n), vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec)


def _dropped_mapping(path, n: int) -> tuple[int, mmap.mmap]:
    """A read-only mapping of a new ``n``-byte file whose pages are not in the page cache."""
    with open(path, "wb") as f:
        f.write(os.urandom(n))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return fd, mmap.mmap(fd, n, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def _dropped_view(path, n: int):
    """(fd, mapping, view of all of it, its address) of a new ``n``-byte file none of whose
    pages are cached; skips the test where the page cache keeps them."""
    fd, mm = _dropped_mapping(path, n)
    try:
        view = memoryview(mm)
        base = readahead.address(view)
        if _resident(mm, base, n) > 16:
            pytest.skip("the page cache kept the file (fadvise DONTNEED ignored here)")
        yield fd, mm, view, base
        view.release()
        mm.close()
    finally:
        os.close(fd)


def _wait_resident(mm: mmap.mmap, addr: int, n: int) -> int:
    deadline = time.monotonic() + 10
    while (got := _resident(mm, addr, n)) < -(-n // PAGE) and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


needs_madvise = pytest.mark.skipif(readahead._madvise_fn is None, reason="no madvise on this platform")


@needs_madvise
def test_will_need_reads_the_pages_of_a_view_into_the_page_cache(tmp_path):
    n = 256 * PAGE
    fd, mm = _dropped_mapping(tmp_path / "data", n)
    try:
        view = memoryview(mm)[64 * PAGE + 100:192 * PAGE]  # not page-aligned at its start
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
        assert readahead.address(view) == addr
        base = addr - (64 * PAGE + 100)
        if _resident(mm, base, n) > 16:
            pytest.skip("the page cache kept the file (fadvise DONTNEED ignored here)")
        readahead.will_need([view])
        assert _wait_resident(mm, base + 64 * PAGE, 128 * PAGE) == 128
        view.release()
        mm.close()
    finally:
        os.close(fd)


@needs_madvise
def test_will_need_reads_all_of_a_view_larger_than_the_devices_readahead(tmp_path):
    # One madvise call reads at most max(read_ahead_kb, max_sectors_kb) of the device (8 MiB on
    # the CI machines); a record of a large block is bigger than that.
    n = 32 << 20
    with _dropped_view(tmp_path / "data", n) as (_, mm, view, base):
        readahead.will_need([view])
        assert _wait_resident(mm, base, n) == n // PAGE


@needs_madvise
@pytest.mark.skipif(readahead._mincore_fn is None, reason="no mincore on this platform")
def test_will_need_skips_a_view_read_whole_before_and_asks_again_once_a_page_is_dropped(
        tmp_path, monkeypatch):
    n = 64 * PAGE
    calls = []
    real = readahead._madvise_fn
    monkeypatch.setattr(readahead, "_madvise_fn", lambda a, k, adv: calls.append(a) or real(a, k, adv))
    with _dropped_view(tmp_path / "data", n) as (fd, mm, view, base):
        readahead.will_need([view])
        assert calls and _wait_resident(mm, base, n) == n // PAGE
        calls.clear()
        readahead.will_need([view])
        assert calls == [], "a view whose pages are all cached was asked for again"
        for page in (1, 63):  # the second page (the first evicted) and the last
            os.posix_fadvise(fd, page * PAGE, PAGE, os.POSIX_FADV_DONTNEED)
            if _resident(mm, base + page * PAGE, PAGE):
                pytest.skip("the page cache kept the page (fadvise DONTNEED ignored here)")
            calls.clear()
            readahead.will_need([view])
            assert calls, f"page {page} of the view was dropped, and the view was not asked for"
            assert _wait_resident(mm, base, n) == n // PAGE


def test_a_disk_load_asks_for_records_ahead_of_the_decoder_and_decodes_before_asking_for_all(
        open_store, monkeypatch):
    s = open_store(host_bytes=0)
    n = 12
    blocks = [make_block(i) for i in range(n)]
    s.put(list(range(n * B)), blocks)
    s.flush()
    tier = s.tier("disk")
    keys = [k for k, _ in tier.entries()]
    events: list[tuple[str, int]] = []
    asked, decode = disk_tier.will_need, tier.codec.decode

    def ask(views):
        views = list(views)
        events.extend(("ask", readahead.address(v)) for v in views)
        asked(views)

    def decoding(rec, out=None):
        events.append(("decode", readahead.address(rec)))
        return decode(rec, out)

    record = len(tier.read_record(keys[0])[0])
    monkeypatch.setattr(disk_tier, "READ_AHEAD", 3 * record)  # about 3 records ahead
    monkeypatch.setattr(disk_tier, "will_need", ask)
    monkeypatch.setattr(tier.codec, "decode", decoding)
    outs = [torch.empty_like(blocks[0]) for _ in keys]
    assert tier.get_many(keys, outs) == [True] * n
    assert sorted(tuple(o.flatten().tolist()) for o in outs) == sorted(tuple(b.flatten().tolist()) for b in blocks)

    asks = [a for e, a in events if e == "ask"]
    decodes = [a for e, a in events if e == "decode"]
    assert len(set(asks)) == n and sorted(decodes) == sorted(asks)
    for at, (e, a) in enumerate(events):
        if e == "decode":
            done = events[:at]
            assert ("ask", a) in done, "a record was decoded before its pages were asked for"
            pending = sum(1 for x in done if x[0] == "ask") - sum(1 for x in done if x[0] == "decode")
            if len(asks) - sum(1 for x in done if x[0] == "ask"):  # lookups left to do
                assert 2 <= pending <= 6, f"{pending} records asked ahead of the decoder (wanted about 3)"
    first_decode = events.index(("decode", decodes[0]))
    assert first_decode < events.index(("ask", asks[-1])), "every record was asked for before the first decode"
