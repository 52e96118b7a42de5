"""Reliability: the disk tier on a small filesystem that fills up.

The filesystem is a size-limited tmpfs the test mounts (root only). With LMDB's writemap a write
into a page the disk never allocated is SIGBUS, not an error: a regression here kills the test
process (pytest's faulthandler prints where).
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from kvstore import KVStore, StoreConfig
from kvstore.errors import StoreOpenError

from .crash_writer import block, prompt

FS_MIB = 48
FILLER_MIB = 16


@pytest.fixture
def small_fs(tmp_path):
    """A FS_MIB MiB tmpfs mounted for this test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_MIB}m,mode=700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(path: Path, mib: int) -> None:
    """Writes up to ``mib`` MiB into ``path``, stopping quietly when the disk is full."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb", buffering=0) as f:
        for _ in range(mib):
            try:
                f.write(chunk)
            except OSError:
                return


def config(path: Path) -> StoreConfig:
    # A disk budget far above the filesystem's size: the disk fills before the budget does.
    return StoreConfig(path=path, host_bytes="1MiB", disk_bytes="1GiB", block_tokens=64)


def served(s: KVStore, i: int) -> bool:
    """Whether block i is served, checking it is the block that was put."""
    got = s.get(s.match(prompt(i)))
    if got:
        assert torch.equal(got[0], block(i)), f"block {i} served wrong"
    return bool(got)


def drops(s: KVStore) -> float:
    return s.stats()["dropped_writes"].get("reason=no_space,tier=disk", 0)


@pytest.mark.heavy
def test_a_full_disk_drops_writes_keeps_serving_and_recovers(small_fs):
    filler = small_fs / "filler"
    fill(filler, FILLER_MIB)  # someone else's file, deleted later to free space
    kv = small_fs / "kv"

    # 1. Fill the disk: puts never raise; what does not fit is dropped and counted.
    with KVStore.open(config(kv)) as s:
        n = 0
        while drops(s) < 64:
            for i in range(n, n + 8):
                s.put(prompt(i), [block(i)])
            s.flush()
            n += 8
            assert n < 2000, "the disk never filled up"
        stats = s.stats()
        assert stats["io_errors"] > 0
        on_disk, drops_full = stats["tiers"]["disk"]["entries"], drops(s)
        assert on_disk > 100  # ~30 MiB of 64 KiB blocks went in before the disk was full

        # 2. Reads keep being served, bit-exact; every block on disk is found.
        hits = [i for i in range(n) if served(s, i)]
        assert len(hits) >= on_disk
        for op in (s.expire, s.flush, lambda: s.pin(prompt(0), 60)):  # no exception either
            op()

    # 3. A restart on the full disk opens the store and serves the same blocks.
    with KVStore.open(config(kv)) as s:
        after = [i for i in range(n) if served(s, i)]
        assert len(after) == on_disk and set(after) <= set(hits)
        before = drops(s)
        s.put(prompt(n), [block(n)])
        s.flush()
        assert drops(s) == before + 1  # still full: dropped and counted

        # 4. Space frees: new writes are stored again, and readable.
        filler.unlink()
        for i in range(n, n + 64):
            s.put(prompt(i), [block(i)])
        s.flush()
        assert drops(s) == before + 1
        assert all(served(s, i) for i in range(n, n + 64))
        assert s.stats()["tiers"]["disk"]["entries"] == on_disk + 64
    print(f"fs {FS_MIB} MiB with a {FILLER_MIB} MiB file: {on_disk} of {n} blocks put are on "
          f"disk ({stats['tiers']['disk']['bytes'] / 2**20:.1f} MiB), {drops_full:.0f} disk writes "
          f"dropped as no_space")  # figures for docs/reliability.md


def test_a_new_store_on_a_full_disk_is_refused_with_a_clear_message(small_fs):
    fill(small_fs / "filler", FS_MIB + 1)
    with pytest.raises(StoreOpenError, match="No space left on device"):
        KVStore.open(config(small_fs / "kv"))
