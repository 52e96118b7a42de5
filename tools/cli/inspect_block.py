"""``kvstore inspect KEY``: one block: its record header, checksum verdict and place in its chain."""

from __future__ import annotations

import argparse
import time

from kvstore import KVStoreError
from kvstore.codec import Codec
from kvstore.errors import CorruptEntryError

from .blocks import entry_json, find_key
from .reading import open_view
from .render import Result

NAME = "inspect"


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    ins = sub.add_parser(NAME, parents=[common], help="one block: header, checksum verdict, chain position")
    ins.add_argument("key", metavar="KEY", help="the block's key, or a unique prefix of 4+ hex digits")


def run(args: argparse.Namespace) -> Result:
    """Exit code 3 when the record is corrupt."""
    with open_view(args) as view:
        now = time.time()
        entries, names = view.entries(), view.namespaces()
        ttl, bt = view.ttl_s, view.block_tokens
        key = find_key(entries, args.key)
        found = view.read_record(key)
        if found is None:
            raise KVStoreError(f"block {key.hex()} was removed while being inspected")
        record, m = found
    metas = dict(entries)
    chain, parent = [], m.parent
    while parent:  # ancestors, nearest first, until one is missing
        pm = metas.get(parent)
        chain.append({"key": parent.hex(), "held": pm is not None})
        if pm is None:
            break
        parent = pm.parent
    children = sorted(k.hex() for k, cm in entries if cm.parent == key)
    codec, header = Codec(), None
    try:
        h = codec.read_header(record)
        header = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in h.items()
                  if k not in ("torch_dtype", "offset")}
        header["shape"] = list(h["shape"])
        codec.decode(record)
        verdict = "ok"
    except CorruptEntryError as e:
        verdict = f"corrupt: {e}"
    data = entry_json(key, m, names, ttl, bt, now)
    data.update({
        "record_bytes": len(record), "header": header, "checksum": verdict,
        "ancestors": chain, "complete_chain": all(c["held"] for c in chain),
        "children": children, "ttl_s": ttl,
    })
    return Result(data, 0 if verdict == "ok" else 3)
