"""Fixtures for the tools: a store held open by another process (the CLI run in-process, ``kv``,
is in tests/conftest.py).

The CLI runs in the test process (fast: no interpreter start per call) while the store is held
by a stand-in engine process (engine_proc.py), so every command is tested against a store
another process has open. The test process itself never keeps that store open: LMDB allows one
environment per path per process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import BLOCK_TOKENS

ROOT = Path(__file__).resolve().parents[2]


class Engine:
    """A running engine_proc: ``path`` and ``config`` of its store, ``ask(op, **args)``."""

    def __init__(self, tmp: Path):
        self.path = tmp / "store"
        self.config = tmp / "kvstore.toml"
        # The engine and the CLI read one config file: budget, TTL and block size agree.
        self.config.write_text(f'path = "{self.path}"\nblock_tokens = {BLOCK_TOKENS}\n'
                               f'host_bytes = "1MiB"\ndisk_bytes = "4MiB"\ndisk_ttl_s = "7d"\n')
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.tools.engine_proc", str(self.config)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"engine process did not start: {line!r}")

    def ask(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def shared_engine(tmp_path_factory):
    """An engine for tests that only read the store."""
    e = Engine(tmp_path_factory.mktemp("engine"))
    yield e
    e.close()


@pytest.fixture
def engine(tmp_path):
    """A fresh engine for a test that changes the store."""
    e = Engine(tmp_path)
    yield e
    e.close()
