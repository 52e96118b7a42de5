"""A stand-in engine: holds a real store open in its own process while tests run the CLI.

``python -m tests.tools.engine_proc CONFIG.toml`` opens the store (host and disk tiers), fills it
with DATASET, prints ``ready`` and then answers one JSON command per stdin line with one JSON
line: ``{"op": "disk_held", "ns": ..., "ids": [...]}`` (per block: does this process's disk tier
hold it), ``{"op": "match", ...}``, ``{"op": "load", ...}`` (match and get), ``{"op": "put", ...}``
(stores the missing blocks, flushed), ``{"op": "flush"}``, ``{"op": "exit"}``.
"""

from __future__ import annotations

import json
import sys
import time

from kvstore import KVStore, StoreConfig
from kvstore.keys import block_keys

from ..conftest import BLOCK_TOKENS as B, make_block

DAY = 86400.0
# name -> (namespace, token ids, age in seconds at creation); put parent first, in this order.
DATASET = {
    "old": ("tenant-a", [1000 + i for i in range(4 * B)], 3 * DAY),
    "main": ("tenant-a", list(range(5 * B)), 0.0),
    "branch": ("tenant-a", list(range(2 * B)) + [5] * (2 * B), 0.0),
    "other": ("tenant-b", list(range(500, 500 + 3 * B)), 0.0),
}
PINNED = "other"  # pinned for an hour
TOTAL_BLOCKS = 4 + 5 + 2 + 3


def main(config_file: str) -> None:
    offset = [0.0]
    store = KVStore.open(StoreConfig.from_file(config_file), clock=lambda: time.time() + offset[0])
    seed = 0
    for name, (ns, ids, age) in DATASET.items():
        offset[0] = -age  # the store's clock never goes back, so the oldest data comes first
        m = store.match(ids, namespace=ns)
        n = len(ids) // B - m.num_blocks
        store.put(ids, [make_block(seed + i) for i in range(n)], namespace=ns, start_block=m.num_blocks)
        seed += n
    offset[0] = 0.0
    ns, ids, _ = DATASET[PINNED]
    store.pin(ids, 3600, namespace=ns)
    store.flush()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            break
        if op == "flush":
            store.flush()
            out = {}
        elif op == "disk_held":
            keys = block_keys(cmd["ns"], cmd["ids"], B)
            out = {"held": store.tier("disk").contains_many(keys, time.time())}
        elif op == "load":  # a hit an engine uses: match, then get
            out = {"blocks": len(store.get(store.match(cmd["ids"], namespace=cmd["ns"])))}
        elif op == "put":  # blocks an engine computed, stored (and written to disk by flush)
            m = store.match(cmd["ids"], namespace=cmd["ns"])
            n = len(cmd["ids"]) // B - m.num_blocks
            stored = store.put(cmd["ids"], [make_block(10_000 + i) for i in range(n)], namespace=cmd["ns"],
                               start_block=m.num_blocks)
            store.flush()
            out = {"stored": stored}
        elif op == "match":
            m = store.match(cmd["ids"], namespace=cmd["ns"])
            out = {"blocks": m.num_blocks, "tiers": list(m.tiers)}
        else:
            out = {"error": f"unknown op {op}"}
        print(json.dumps(out), flush=True)
    store.close()


if __name__ == "__main__":
    main(sys.argv[1])
