"""``kvstore ls``: the disk tier's blocks, filtered, sorted and paged; ``--tree``: their chains
and forks."""

from __future__ import annotations

import argparse
import time

from kvstore import KVStoreError

from .blocks import entry_json, namespace_filter, ns_label, short_id
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
    ls.add_argument("--tree", action="store_true",
                    help="chains and their forks as a tree (rows: chains; with --key: the tree holding that block, "
                         "from its chain's first block)")


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
    if args.tree:
        return Result(tree(entries, rows, names, key_prefix is not None, args))
    rows.sort(key=SORTS[args.sort], reverse=args.reverse)
    page = rows[args.offset:args.offset + args.limit] if args.limit else rows[args.offset:]
    items = [entry_json(k, m, names, ttl, bt, now) for k, m in page]
    return Result({"total": len(rows), "offset": args.offset, "count": len(items), "entries": items})


def tree(entries, rows, names: dict[int, str], to_root: bool, args: argparse.Namespace) -> dict:
    """The chains through ``rows`` as trees of runs: a run is a stretch of blocks each with one
    child held, so a tree has a node per fork, not per block (chains are thousands deep).

    Roots are the rows with no parent among them, or with ``to_root`` (a ``--key``) the first
    block of each row's chain, walked up through the parents held. Paged by root."""
    meta = dict(entries)
    children: dict[bytes, list[bytes]] = {}
    for k, m in entries:
        if m.parent in meta:
            children.setdefault(m.parent, []).append(k)
    for kids in children.values():
        kids.sort(key=lambda k: (meta[k].created, k))
    selected = {k for k, _ in rows}
    if to_root:
        roots = set()
        for k in selected:
            while meta[k].parent in meta:
                k = meta[k].parent
            roots.add(k)
    else:
        roots = {k for k in selected if meta[k].parent not in selected}
    order = sorted(roots, key=lambda k: (ns_label(names, meta[k].namespace_id), meta[k].depth, meta[k].created, k))

    def run(key: bytes) -> dict:
        keys = [key]
        while len(children.get(keys[-1], ())) == 1:
            keys.append(children[keys[-1]][0])
        first = meta[key]
        return {"first": key.hex(), "last": keys[-1].hex(), "namespace": ns_label(names, first.namespace_id),
                "namespace_id": short_id(first.namespace_id), "depth": first.depth, "blocks": len(keys),
                "stored_bytes": sum(meta[k].stored_bytes for k in keys),
                "selected": sum(k in selected for k in keys),
                "children": [run(c) for c in children.get(keys[-1], ())]}
    page = order[args.offset:args.offset + args.limit] if args.limit else order[args.offset:]
    return {"tree": True, "total": len(order), "offset": args.offset, "count": len(page),
            "chains": [run(k) for k in page]}
