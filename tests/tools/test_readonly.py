"""The inspecting commands open a store read-only: they write nothing, start no writer threads,
and work on a read-only mount; `kvstore stats` with no config shows the stored settings."""

from __future__ import annotations

import os
import subprocess

import pytest

from kvstore import KVStore, StoreConfig

from ..conftest import BLOCK_TOKENS as B, make_block


def _fill(path, n=3):
    with KVStore.open(StoreConfig(path=path, block_tokens=B, host_bytes=0, disk_bytes="4MiB",
                                  disk_ttl_s="7d")) as s:
        s.put(list(range(n * B)), [make_block(i) for i in range(n)])


def _snapshot(path):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def test_inspecting_writes_nothing_and_shows_the_stored_settings(tmp_path, kv):
    path = tmp_path / "store"
    _fill(path)
    before = _snapshot(path)
    code, out, _ = kv("stats", "--path", path, "--json")
    assert code == 0
    assert out["tiers"]["disk"]["entries"] == 3
    assert out["tiers"]["disk"]["budget"] == 4 << 20 and out["tiers"]["disk"]["ttl_s"] == 7 * 86400
    assert out["block_tokens"] == B and out["settings"]["block_shape"] is not None
    for argv in (("ls", "--path", path, "--json"), ("verify", "--path", path, "--json")):
        assert kv(*argv)[0] == 0
    after = _snapshot(path)
    # LMDB's lock file holds the reader table: the only file a reader may touch.
    assert {p: v for p, v in after.items() if p.name != "lock.mdb"} == \
        {p: v for p, v in before.items() if p.name != "lock.mdb"}


def test_a_directory_that_is_not_a_store_is_left_as_it_was(tmp_path, kv):
    (tmp_path / "x" / "disk").mkdir(parents=True)
    (tmp_path / "x" / "disk" / "data.mdb").write_bytes(b"")
    code, _, err = kv("stats", "--path", tmp_path / "x")
    assert code != 0 and "x" in err
    assert (tmp_path / "x" / "disk" / "data.mdb").stat().st_size == 0
    assert sorted(p.name for p in (tmp_path / "x" / "disk").iterdir()) == ["data.mdb"]


def test_stats_ls_and_verify_work_on_a_read_only_mount(tmp_path, kv):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "ro"
    mnt.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=700", "tmpfs", str(mnt)], check=True)
    try:
        _fill(mnt / "store")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(OSError):  # the mount really is read-only
            (mnt / "store" / "probe").write_bytes(b"")
        code, out, err = kv("stats", "--path", mnt / "store", "--json")
        assert code == 0, err
        assert out["tiers"]["disk"]["entries"] == 3
        code, out, err = kv("ls", "--path", mnt / "store", "--json")
        assert code == 0, err
        code, out, err = kv("verify", "--path", mnt / "store", "--json")
        assert code == 0 and out["ok"] == 3, err
        code, _, err = kv("purge", "--path", mnt / "store", "--all")
        assert code != 0 and err.strip()  # removing needs a writable store: one clear line
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
