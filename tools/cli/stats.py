"""``kvstore stats``: entries, bytes, budget, ages and namespaces of the disk tier, and the
lifetime counters every process that used the store persisted."""

from __future__ import annotations

import argparse
import time

from .blocks import iso, ns_label, short_id
from .counters import lifetime_counters
from .reading import open_view
from .render import Result

NAME = "stats"


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    sub.add_parser(NAME, parents=[common], help="entries, bytes, budget, ages and namespaces",
                   description="Entries, bytes (stored and raw), budget, TTL, pins, ages and namespaces of the disk tier.")


def run(args: argparse.Namespace) -> Result:
    with open_view(args) as view:
        now = time.time()
        entries, names, u = view.entries(), view.namespaces(), view.usage()
        ttl, bt, path = view.ttl_s, view.block_tokens, view.path
        lifetime = lifetime_counters(view.counters())
        stored = view.settings()
        remote = view.remote()
        file = view.file_usage()
    per_ns: dict[str, dict[str, int]] = {}
    for _, m in entries:
        ns = per_ns.setdefault(ns_label(names, m.namespace_id),
                               {"id": short_id(m.namespace_id), "entries": 0, "bytes": 0, "raw_bytes": 0,
                                "longest_chain_tokens": 0})
        ns["entries"] += 1
        ns["bytes"] += m.stored_bytes
        ns["raw_bytes"] += m.raw_bytes
        ns["longest_chain_tokens"] = max(ns["longest_chain_tokens"], (m.depth + 1) * bt)
    pinned = sum(m.pinned_until > now for _, m in entries)
    expired = sum(now - m.last_access > ttl and m.pinned_until <= now for _, m in entries)
    created = [m.created for _, m in entries]
    access = [m.last_access for _, m in entries]
    return Result({
        "path": path,
        "block_tokens": bt,
        "settings": stored,  # as stored with the data: what every process runs with
        "tiers": {"disk": {
            "entries": u.entries, "bytes": u.bytes, "raw_bytes": u.raw_bytes, "budget": u.budget,
            "used": u.bytes / u.budget if u.budget else None,
            "compression_ratio": u.raw_bytes / u.bytes if u.bytes else None,
            "ttl_s": ttl, "pinned": pinned, "expired": expired,
            # The bytes above are the records' sizes; the file holds them in LMDB pages, keeps
            # freed pages for reuse and never shrinks.
            "file": file,
            "oldest_created": iso(min(created, default=None)),
            "newest_created": iso(max(created, default=None)),
            "least_recent_access": iso(min(access, default=None)),
            "most_recent_access": iso(max(access, default=None)),
        }, **({"remote": remote} if remote is not None else {})},
        "namespaces": per_ns,
        # Summed over every process that used the store, as of each one's last flush (engines
        # persist theirs every few seconds while they write).
        "counters": lifetime,
    })
