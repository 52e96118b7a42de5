"""`kvstore compact`: the data file shrinks to the pages in use, the blocks, settings and
lifetime counters survive bit-exact, and a store other processes have open is refused (naming
them) or, for a process that opens it meanwhile, waited for."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from kvstore.tiers.disk import LMDBEnv

from ..conftest import BLOCK_TOKENS as B, make_block
from .conftest import ROOT

SHAPE = (2, 2, 2, B, 256)  # 32 KiB a block: enough blocks to see the file shrink
KEEP, DROP = list(range(40 * B)), list(range(10_000, 10_000 + 200 * B))


def fill(open_store):
    store = open_store(disk_bytes=64 << 20, host_bytes=0)
    store.put(KEEP, [make_block(i, SHAPE) for i in range(40)], namespace="keep")
    store.put(DROP, [make_block(1000 + i, SHAPE) for i in range(200)], namespace="drop")
    assert store.match(KEEP, namespace="keep").num_blocks == 40  # a request: a counter to keep
    store.flush()
    store.close()


def test_compact_shrinks_a_purged_store_which_then_serves_the_same_blocks(open_store, tmp_path, kv):
    fill(open_store)
    path = ("--path", tmp_path / "store")
    assert kv("purge", *path, "--namespace", "drop")[0] == 0
    before = kv("stats", *path, "--json")[1]
    code, out, err = kv("compact", tmp_path / "store", "--json")
    assert code == 0, err
    after = kv("stats", *path, "--json")[1]
    f0, f1 = before["tiers"]["disk"]["file"], after["tiers"]["disk"]["file"]
    assert f1["file_bytes"] == (tmp_path / "store" / "disk" / "data.mdb").stat().st_size
    assert f1["file_bytes"] < f0["file_bytes"] - f0["free_bytes"] // 2  # the free pages went back
    assert f1["free_bytes"] == 0 and f1["data_bytes"] <= f0["data_bytes"]
    assert out["before"]["file_bytes"] == f0["file_bytes"] and out["after"]["file_bytes"] == f1["file_bytes"]
    assert out["reclaimed_bytes"] == f0["file_bytes"] - f1["file_bytes"] > 0
    # Settings and lifetime counters live in the same environment: the copy keeps them.
    assert after["settings"] == before["settings"] and after["counters"] == before["counters"]
    assert after["tiers"]["disk"]["entries"] == before["tiers"]["disk"]["entries"] == 40
    store = open_store(disk_bytes=64 << 20, host_bytes=0)
    got = store.get(store.match(KEEP, namespace="keep"))
    assert len(got) == 40 and all(torch.equal(g, make_block(i, SHAPE)) for i, g in enumerate(got))
    # The compacted file is exactly full: the next writes grow its map again.
    store.put(DROP, [make_block(1000 + i, SHAPE) for i in range(200)], namespace="drop")
    store.flush()
    assert store.match(DROP, namespace="drop").num_blocks == 200


def test_compact_is_refused_while_an_engine_has_the_store_open(engine, kv):
    size = (engine.path / "disk" / "data.mdb").stat().st_size
    code, out, err = kv("compact", "--path", engine.path)
    assert code == 1 and not out
    assert err.count("\n") == 1 and f"pid {engine.proc.pid}" in err and "in use by" in err, err
    assert (engine.path / "disk" / "data.mdb").stat().st_size == size
    ns, ids, _ = engine_dataset()["main"]
    assert engine.ask("match", ns=ns, ids=ids)["blocks"] == len(ids) // B  # the engine goes on


def engine_dataset():
    from .engine_proc import DATASET
    return DATASET


def waits_for_a_lock(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` comes to wait for a file lock (``/proc/locks`` lists the waiter with
    ``->``) before it exits."""
    while proc.poll() is None:
        with open("/proc/locks") as f:
            if any(line.split()[1] == "->" and str(proc.pid) in line.split() for line in f):
                return True
        time.sleep(0.02)
    return False


def test_a_reader_is_refused_and_one_opening_meanwhile_waits_for_the_copy(open_store, tmp_path, kv):
    fill(open_store)
    store_dir = tmp_path / "store"
    assert kv("purge", "--path", store_dir, "--namespace", "drop")[0] == 0
    # A reader holding the store open (a second `kvstore` process, as `top` would).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from kvstore.tiers.disk import LMDBEnv; "
         f"e = LMDBEnv({str(store_dir / 'disk')!r}, 0, readonly=True); print('open', flush=True); "
         "sys.stdin.readline(); e.close()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        code, _, err = kv("compact", store_dir)
        assert code == 1 and f"pid {holder.pid}" in err, err
    finally:
        holder.communicate("\n", timeout=20)
    # Compacting in this process: a reader started meanwhile waits, then reads the new file.
    env = LMDBEnv(store_dir / "disk", 0, exclusive=True)
    try:
        reader = subprocess.Popen([sys.executable, "-m", "tools.cli", "stats", "--path", str(store_dir), "--json"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert waits_for_a_lock(reader)  # the open waits: it would map the file being swapped
        usage = env.compact()
    finally:
        env.close()
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    disk = json.loads(out)["tiers"]["disk"]
    assert disk["entries"] == 40 and disk["file"]["file_bytes"] == usage["after"]["file_bytes"]
    assert usage["after"]["file_bytes"] < usage["before"]["file_bytes"]
