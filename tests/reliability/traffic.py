"""Traffic for the concurrency test: engine-like writers and readers over shared prefixes.

``python -m tests.reliability.traffic ROLE STORE SEED SECONDS`` (ROLE: writer or reader) runs
for SECONDS against the store at STORE and prints one JSON line of counts and errors at the end;
it exits 1 if any operation raised or served a block that was not the one put for its prefix.

Prompts: conversation c is GROUP_BLOCKS blocks shared by its group (a system prompt), then
blocks of its own. A block's values are a function of the tokens up to its end, so any process
can check what it is served.
"""

from __future__ import annotations

import json
import random
import sys
import time
import traceback
import zlib

import numpy as np
import torch

from kvstore import KVStore, StoreConfig
from tools.cli.counters import lifetime_counters

SHAPE = (4, 2, 2, 64, 32)  # 64 KiB of float16 per block
BLOCK = 64
GROUPS, CONVERSATIONS, GROUP_BLOCKS, MAX_BLOCKS = 4, 64, 3, 10
NAMESPACES = ("tenant-a", "tenant-b")


def tokens(conv: int) -> np.ndarray:
    shared = np.random.default_rng(conv % GROUPS).integers(0, 50_000, GROUP_BLOCKS * BLOCK)
    own = np.random.default_rng(1000 + conv).integers(0, 50_000, (MAX_BLOCKS - GROUP_BLOCKS) * BLOCK)
    return np.concatenate([shared, own])


def expected(ids: np.ndarray, i: int) -> torch.Tensor:
    """Block i of a prompt starting with ``ids``: a function of its prefix alone."""
    seed = zlib.crc32(np.ascontiguousarray(ids[:(i + 1) * BLOCK], dtype=np.int64).tobytes())
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.float16)


def config(path: str, role: str) -> StoreConfig:
    return StoreConfig(path=path, host_bytes="4MiB" if role == "writer" else "2MiB",
                       disk_bytes="8MiB", block_tokens=BLOCK)


def main() -> int:
    role, path, seed, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    rng = random.Random(seed)
    counts = {"ops": 0, "hit_blocks": 0, "stored": 0, "errors": 0, "wrong_blocks": 0}
    errors: list[str] = []
    with KVStore.open(config(path, role)) as s:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conv = rng.randrange(CONVERSATIONS)
            ns = NAMESPACES[conv % 2]
            ids = tokens(conv)[:rng.randint(1, MAX_BLOCKS) * BLOCK + rng.randrange(BLOCK)]
            try:
                m = s.match(ids, namespace=ns)
                got = s.get(m)
                counts["hit_blocks"] += len(got)
                counts["wrong_blocks"] += sum(not torch.equal(b, expected(ids, i)) for i, b in enumerate(got))
                if role == "writer":  # an engine computes the rest and stores it
                    rest = [expected(ids, i) for i in range(len(got), len(ids) // BLOCK)]
                    counts["stored"] += s.put(ids, rest, namespace=ns, start_block=len(got))
                    if rng.random() < 0.1:
                        s.flush()
            except Exception:
                counts["errors"] += 1
                errors.append(traceback.format_exc())
            counts["ops"] += 1
        stats = s.stats()
        # This process's counters, nested as `kvstore stats --json` shows them: {tier: {reason: n}}.
        nested = lifetime_counters(s.metrics.flat())
    counts["dropped_writes"] = nested["dropped_writes"]
    counts["io_errors"] = stats["io_errors"]
    counts["evictions"] = nested["evictions"]
    print(json.dumps({"role": role, **counts, "first_errors": errors[:3]}), flush=True)
    return 1 if counts["errors"] or counts["wrong_blocks"] else 0


if __name__ == "__main__":
    sys.exit(main())
