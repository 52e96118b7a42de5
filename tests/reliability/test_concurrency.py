"""Reliability: 2 writer and 2 reader processes, and `kvstore purge` runs, on one store for 60 s."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .traffic import NAMESPACES, config

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 60
PURGES = (["--all"], ["--older-than", "2s"], ["--idle-longer-than", "1s"],
          ["--namespace", NAMESPACES[0]], ["--namespace", NAMESPACES[1], "--older-than", "1s"])


@pytest.mark.heavy
def test_two_writers_two_readers_and_purges_for_a_minute(tmp_path, kv, capsys):
    def kvstore_json(*args: str) -> dict:
        # In this process (`kv`): a subprocess would spend seconds importing torch per call.
        code, out, err = kv(*args, "--json")
        assert code == 0, err
        return out

    path = str(tmp_path / "kv")
    budget = config(path, "writer").disk_bytes
    workers = [subprocess.Popen([sys.executable, "-m", "tests.reliability.traffic", role, path,
                                 str(seed), str(SECONDS)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
               for seed, role in enumerate(["writer", "writer", "reader", "reader"])]
    data = Path(path, "disk", "data.mdb")
    deadline = time.monotonic() + 120
    while not data.exists():  # the workers are starting (importing torch)
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.2)
    # `purge --namespace` refuses a namespace the store has not named yet (writers persist names
    # every few seconds): start purging once both are known.
    def named() -> set:
        code, out, err = kv("stats", "--path", path, "--json")
        if code != 0:  # data.mdb exists, but the first writer has not yet marked it a store
            assert "not a kvstore disk tier" in err, err
            return set()
        return set(out["namespaces"])

    while not set(NAMESPACES) <= named():
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.2)
    purges, usage = [], []
    while any(w.poll() is None for w in workers):  # purge until the traffic ends
        opts = PURGES[len(purges) % len(PURGES)]
        purges.append(kvstore_json("purge", "--path", path, *opts)["removed"])
        usage.append(kvstore_json("stats", "--path", path)["tiers"]["disk"]["bytes"])
        time.sleep(1)
    reports = []
    for w in workers:
        out, _ = w.communicate(timeout=120)
        reports.append(json.loads(out.strip().splitlines()[-1]))
        assert w.returncode == 0, reports[-1]
    writers, readers = reports[:2], reports[2:]
    with capsys.disabled():  # figures for docs/reliability.md, shown with -s
        print(json.dumps({"purges": len(purges), "removed": sum(purges), "max_disk_bytes": max(usage),
                          "budget": budget, "workers": reports}))

    # No errors, and every block any process was served was the one put for its prefix.
    assert all(r["errors"] == 0 and r["wrong_blocks"] == 0 and r["io_errors"] == 0 for r in reports)
    # The traffic ran (how much is a figure for docs/reliability.md, not a floor: the machine is
    # shared).
    assert all(r["stored"] > 0 for r in writers), writers
    assert all(r["hit_blocks"] > 0 for r in readers), readers
    # The purges ran and removed blocks; the disk budget held at every look.
    assert len(purges) >= 10 and sum(purges) > 0, purges
    assert max(usage) <= budget, (max(usage), budget)
    assert all(r["evictions"].get("disk", {}).get("capacity", 0) > 0 for r in writers), writers
    # (Stale reader slots are not checked here: with every process gone LMDB resets its reader
    # table by itself at the next open. tests/test_pipeline.py keeps a process holding the
    # environment while it kills a reader, so only reader_check() can clear the slot.)
