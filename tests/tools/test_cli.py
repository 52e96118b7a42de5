import json
import os
import subprocess
import sys

import pytest

from tools import cli

from ..conftest import BLOCK_TOKENS as B, make_block


@pytest.fixture
def filled(open_store, clock, tmp_path):
    import time
    clock.now = time.time()
    s = open_store(host_bytes=0)  # RAM tiers of another process do not see a CLI purge yet
    s.put(list(range(3 * B)), [make_block(i) for i in range(3)], namespace="tenant-a")
    s.put(list(range(500, 500 + 2 * B)), [make_block(9), make_block(8)], namespace="tenant-b")
    s.flush()
    return s, str(tmp_path / "store")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_stats_json_while_the_store_is_open_elsewhere(filled):
    store, path = filled
    out = run_cli("stats", "--path", path, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["disk"]["entries"] == 5
    assert data["namespaces"]["tenant-a"]["entries"] == 3 and data["namespaces"]["tenant-b"]["entries"] == 2
    text = run_cli("stats", env={"KVSTORE_PATH": path})
    assert "5 blocks" in text.stdout


def test_purge_namespace_with_dry_run_then_for_real(filled):
    store, path = filled
    dry = json.loads(run_cli("purge", "--path", path, "--namespace", "tenant-b", "--dry-run", "--json").stdout)
    assert dry == {"removed": 0, "matched": 2, "dry_run": True}
    assert store.match(list(range(500, 500 + 2 * B)), namespace="tenant-b").num_blocks == 2
    out = run_cli("purge", "--path", path, "--namespace", "tenant-b")
    assert out.returncode == 0 and "removed 2 block(s)" in out.stdout
    assert store.match(list(range(500, 500 + 2 * B)), namespace="tenant-b").num_blocks == 0
    assert store.match(list(range(3 * B)), namespace="tenant-a").num_blocks == 3


@pytest.mark.parametrize("args, code, fragment", [
    (["stats", "--path", "/nonexistent/kv"], 1, "not a kvstore store"),
    (["stats"], 1, "no store given"),
    (["purge", "--path", "X"], 1, "not a kvstore store"),
    (["purge", "--path", "X", "--older-than", "soon"], 2, "expected a duration"),
])
def test_bad_input_is_one_line_without_traceback(args, code, fragment, tmp_path):
    out = run_cli(*args, env={"KVSTORE_PATH": ""})
    assert out.returncode == code
    assert fragment in out.stderr and "Traceback" not in out.stderr


def test_purge_requires_a_criterion(filled, capsys):
    store, path = filled
    store.close()  # one LMDB environment per process: close it before running the CLI in-process
    assert cli.main(["purge", "--path", path]) == 1
    assert "say what to remove" in capsys.readouterr().err
