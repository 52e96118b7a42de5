"""One "machine" of the remote tier tests: its own store directory, only Valkey shared. It
names the block layout, as an engine does: a fresh disk has none stored yet.

    python -m tests.tiers.remote_machine STORE_DIR URL put|get NAMESPACE SEED BLOCKS

``put`` stores BLOCKS deterministic blocks (seeded) for a deterministic prompt and flushes;
``get`` matches the same prompt and prints JSON: the tiers of each matched block, the sha256
of each loaded block's bytes, and the tiers of a second match (after promotion).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from kvstore import KVStore, StoreConfig
from tests.conftest import BLOCK_TOKENS, SHAPE, block_nbytes, make_block


def prompt(seed: int, blocks: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(blocks * BLOCK_TOKENS + 3)]


def digest(t) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()


def main(argv: list[str]) -> None:
    path, url, mode, ns, seed, n = argv[0], argv[1], argv[2], argv[3], int(argv[4]), int(argv[5])
    cfg = StoreConfig(path=Path(path), block_tokens=BLOCK_TOKENS, host_bytes=64 * block_nbytes(),
                      disk_bytes=1 << 22, remote_url=url, block_shape=SHAPE, dtype="bfloat16", remote_timeout_s=1.0, namespace=ns)
    with KVStore.open(cfg) as store:
        tokens = prompt(seed, n)
        if mode == "put":
            blocks = [make_block(seed * 1000 + i) for i in range(n)]
            print(json.dumps({"stored": store.put(tokens, blocks), "flushed": store.flush(),
                              "digests": [digest(b) for b in blocks]}))
        else:
            m = store.match(tokens)
            got = store.get(m)
            again = store.match(tokens)
            print(json.dumps({"tiers": list(m.tiers), "digests": [digest(b) for b in got],
                              "again": list(again.tiers)}))


if __name__ == "__main__":
    main(sys.argv[1:])
