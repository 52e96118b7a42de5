"""``kvstore ls``: the disk tier's blocks, filtered, sorted and paged."""

from __future__ import annotations

import argparse
import time

from kvstore import KVStoreError

from .blocks import entry_json, namespace_filter, ns_label
from .options import count, duration, hex_prefix
from .reading import open_view
from .render import Result

NAME = "ls"
SORTS = {
    "last-access": lambda km: -km[1].last_access,
    "created": lambda km: -km[1].created,
    "size": lambda km: -km[1].stored_bytes,
    "depth": lambda km: -km[1].depth,
    "key": lambda km: km[0],
}


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    ls = sub.add_parser(NAME, parents=[common], help="list blocks with filters, sorting and paging")
    ls.add_argument("--namespace", help="only this namespace (its name, or '#' and its id)")
    ls.add_argument("--key", type=hex_prefix, metavar="HEX", help="only keys starting with HEX")
    ls.add_argument("--older-than", type=duration, metavar="AGE", help="created more than AGE ago (e.g. 6h)")
    ls.add_argument("--newer-than", type=duration, metavar="AGE", help="created less than AGE ago")
    ls.add_argument("--idle-longer-than", type=duration, metavar="AGE", help="unused for more than AGE (e.g. 2d)")
    ls.add_argument("--pinned", action="store_true", help="only pinned blocks")
    ls.add_argument("--sort", choices=SORTS, default="last-access", help="order (default: most recently used first)")
    ls.add_argument("--reverse", action="store_true", help="reverse the order")
    ls.add_argument("--limit", type=count, default=50, metavar="N", help="at most N rows (0: all; default 50)")
    ls.add_argument("--offset", type=count, default=0, metavar="N", help="skip the first N rows")


def run(args: argparse.Namespace) -> Result:
    with open_view(args) as view:
        now = time.time()
        entries, names = view.entries(), view.namespaces()
        ttl, bt = view.ttl_s, view.block_tokens
    known = {**{m.namespace_id: ns_label(names, m.namespace_id) for _, m in entries}, **names}
    ns_id = namespace_filter(args.namespace, known) if args.namespace else None
    key_prefix = args.key
    if key_prefix is not None and not any(k.hex().startswith(key_prefix) for k, _ in entries):
        # A key that is not there is most often a typo or another store: say so, not "0 rows".
        raise KVStoreError(f"--key {key_prefix}: no block of this store has a key starting so")
    rows = [
        (k, m) for k, m in entries
        if (ns_id is None or m.namespace_id == ns_id)
        and (key_prefix is None or k.hex().startswith(key_prefix))
        and (args.older_than is None or now - m.created > args.older_than)
        and (args.newer_than is None or now - m.created <= args.newer_than)
        and (args.idle_longer_than is None or now - m.last_access > args.idle_longer_than)
        and (not args.pinned or m.pinned_until > now)
    ]
    rows.sort(key=SORTS[args.sort], reverse=args.reverse)
    page = rows[args.offset:args.offset + args.limit] if args.limit else rows[args.offset:]
    items = [entry_json(k, m, names, ttl, bt, now) for k, m in page]
    return Result({"total": len(rows), "offset": args.offset, "count": len(items), "entries": items})
