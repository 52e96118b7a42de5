"""Shared fixtures: a fake clock, both byte-plane loops, a factory of real stores in temp
directories, KV blocks, and the `kvstore` command line run in-process."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from kvstore import KVStore, StoreConfig, byteplanes
from tools import cli

# `make test` runs the property tests with a fifth of their examples; `make test-all` (which sets
# KVSTORE_TEST_FULL=1) runs them at full size.
FULL = os.environ.get("KVSTORE_TEST_FULL") == "1"


def examples(n: int) -> int:
    """Hypothesis examples for a property test whose full size is ``n``."""
    return n if FULL else max(10, n // 5)


# The engine suite runs only where vLLM is installed (.venv-vllm: `make test-vllm`). There it
# imports vllm at module level, so a broken install fails instead of skipping; where vLLM is
# absent, `make test-vllm` collects nothing and pytest's exit status 5 fails the target.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm"]

BLOCK_TOKENS = 8
SHAPE = (2, 2, 2, BLOCK_TOKENS, 4)  # layers, k/v, heads, tokens, head_dim


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["native", "numpy"])
def plane_loops(request, monkeypatch):
    """Runs a test with the C byte-plane loops and again with the numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(byteplanes, "_native", None)
    elif not byteplanes.NATIVE:
        pytest.fail("kvstore._byteplanes was not built (see tests/test_byteplanes.py)")
    return request.param


def make_block(seed: int, shape=SHAPE, dtype=torch.bfloat16) -> torch.Tensor:
    """A deterministic block that looks like KV (small normal values)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.5).to(dtype)


def block_nbytes(shape=SHAPE, dtype=torch.bfloat16) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


@pytest.fixture
def open_store(tmp_path, clock):
    """``open_store(**config)`` opens a real store (real LMDB, real zstd) under tmp_path."""
    opened = []

    def _open(name: str = "store", **kw) -> KVStore:
        kw.setdefault("block_tokens", BLOCK_TOKENS)
        kw.setdefault("host_bytes", 64 * block_nbytes())
        kw.setdefault("disk_bytes", 1 << 20)
        store = KVStore.open(StoreConfig(path=tmp_path / name, **kw), clock=clock)
        opened.append(store)
        return store

    yield _open
    for s in opened:
        s.close()


@pytest.fixture
def kv(capsys, monkeypatch):
    """``kv(*argv)`` runs the CLI in-process: ``(exit code, stdout, stderr)``; JSON is parsed
    when ``--json`` was given."""
    monkeypatch.delenv("KVSTORE_PATH", raising=False)
    monkeypatch.delenv("KVSTORE_CONFIG", raising=False)

    def run(*argv: str):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            code = e.code
        out, err = capsys.readouterr()
        if "--json" in argv and code in (0, 3) and out:
            out = json.loads(out)
        return code, out, err
    return run
