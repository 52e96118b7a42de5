"""The ``kvstore`` command: look at and clean a store, also while an engine holds it open.

Every command takes ``--path`` (or ``KVSTORE_PATH``) and ``--json``. Errors are one line on
stderr and a non-zero exit code: 2 for bad arguments, 1 for a store that cannot be used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Any

from kvstore import KVStore, KVStoreError, StoreConfig
from kvstore.config import parse_duration


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "duration")
    except KVStoreError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("duration: ")) from None


def _open(args: argparse.Namespace) -> KVStore:
    path = args.path or os.environ.get("KVSTORE_PATH")
    if not path:
        raise KVStoreError("no store given: pass --path DIR or set KVSTORE_PATH")
    if not os.path.isdir(os.path.join(path, "disk")):
        raise KVStoreError(f"{path}: not a kvstore store (no disk/ directory inside)")
    # Tools need no host slab; the disk budget only matters to writers.
    return KVStore.open(StoreConfig(path=path, host_bytes=0))


def cmd_stats(store: KVStore, args: argparse.Namespace) -> tuple[dict, str]:
    disk = store.disk
    entries = disk.entries()
    names = disk.namespaces()
    per_ns: dict[str, dict[str, int]] = {}
    for _, m in entries:
        ns = per_ns.setdefault(names.get(m.namespace_id, f"#{m.namespace_id:016x}"),
                               {"entries": 0, "bytes": 0})
        ns["entries"] += 1
        ns["bytes"] += m.stored_bytes
    u = disk.usage()
    out = {
        "path": str(store.config.path),
        "disk": {"entries": u.entries, "bytes": u.bytes, "raw_bytes": u.raw_bytes, "budget": u.budget,
                 "compression_ratio": (u.raw_bytes / u.bytes) if u.bytes else None},
        "oldest_created": min((m.created for _, m in entries), default=None),
        "newest_access": max((m.last_access for _, m in entries), default=None),
        "pinned": sum(m.pinned_until > store._clock() for _, m in entries),
        "namespaces": per_ns,
    }

    def when(ts: float | None) -> str:
        return "-" if ts is None else dt.datetime.fromtimestamp(ts).isoformat(timespec="seconds")

    lines = [
        f"store       {out['path']}",
        f"disk        {u.entries} blocks, {_human_bytes(u.bytes)} stored "
        f"({_human_bytes(u.raw_bytes)} raw) of a {_human_bytes(store.config.disk_bytes)} budget",
        f"oldest      {when(out['oldest_created'])}   newest access {when(out['newest_access'])}",
        f"pinned      {out['pinned']}",
    ] + [f"namespace   {name}: {v['entries']} blocks, {_human_bytes(v['bytes'])}" for name, v in per_ns.items()]
    return out, "\n".join(lines)


def cmd_purge(store: KVStore, args: argparse.Namespace) -> tuple[dict, str]:
    if not (args.all or args.older_than is not None or args.idle_longer_than is not None or args.namespace):
        raise KVStoreError("purge: say what to remove: --all, --older-than, --idle-longer-than or --namespace")
    n = store.purge(older_than_s=args.older_than, idle_longer_than_s=args.idle_longer_than,
                    namespace=args.namespace, all=args.all, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    return {"removed": 0 if args.dry_run else n, "matched": n, "dry_run": args.dry_run}, f"{verb} {n} block(s)"


COMMANDS = {"stats": cmd_stats, "purge": cmd_purge}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--path", help="store directory (default: $KVSTORE_PATH)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = argparse.ArgumentParser(prog="kvstore", description="Inspect and clean a kvstore KV-cache store.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", parents=[common], help="entries, bytes and budget of the disk tier")
    pp = sub.add_parser("purge", parents=[common], help="remove blocks (every tier the store holds)")
    pp.add_argument("--all", action="store_true", help="remove everything")
    pp.add_argument("--older-than", type=_duration, metavar="AGE", help="created before AGE ago (e.g. 6h)")
    pp.add_argument("--idle-longer-than", type=_duration, metavar="AGE", help="unused for AGE (e.g. 2d)")
    pp.add_argument("--namespace", help="only this namespace")
    pp.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _open(args) as store:
            data, text = COMMANDS[args.command](store, args)
    except (KVStoreError, OSError) as e:
        print(f"kvstore {args.command}: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
