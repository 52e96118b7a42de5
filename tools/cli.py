"""The ``kvstore`` command: look at, clean, verify and explain a store, also while an engine holds
it open.

Every command takes ``--path`` (or ``KVSTORE_PATH``), ``--config`` (or ``KVSTORE_CONFIG`` and the
``KVSTORE_*`` settings the engine reads: the disk budget, TTL and block size shown come from
there) and ``--json``. Errors are one line on stderr and a non-zero exit code: 2 for bad
arguments, 1 for a store or input that cannot be used; ``verify`` exits 3 when it found corrupt
records it did not remove.

Commands read the disk tier through short LMDB read transactions, which never block an engine's
writes. A purge removes blocks from the disk tier and logs them there; running engines drop the
same blocks from their RAM tiers within a second.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from kvstore import KVStore, KVStoreError, StoreConfig
from kvstore.codec import Codec
from kvstore.config import ENV_PREFIX, parse_duration
from kvstore.errors import CorruptEntryError
from kvstore.eviction import EntryMeta
from kvstore.keys import block_keys, namespace_id

from . import explain as explainlib


class Output(NamedTuple):
    data: Any  # printed with --json
    text: str  # printed otherwise
    code: int = 0


# -- formatting -------------------------------------------------------------------------------
def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _span(seconds: float) -> str:
    """``90061`` -> ``1d1h``: the two leading units."""
    s = int(abs(seconds))
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return "".join(f"{v}{u}" for v, u in parts[:2] if v or u == parts[0][1])


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    return f"{_span(now - ts)} ago" if ts <= now else f"in {_span(ts - now)}"


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    return f"{dt.datetime.fromtimestamp(ts).isoformat(sep=' ', timespec='seconds')} ({_ago(ts, now)})"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(message: str) -> str:
    """``message`` with control characters written as escapes (``\\n``, ``\\x1b``): an error
    stays one line, whatever an argument, a file name or a library's message holds."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), message)


def _print(text: str) -> None:
    """Prints ``text`` on stdout. A file name that is not valid in the locale's encoding (held
    as surrogates, as Python decodes argv) is written as escapes where stdout is strict."""
    try:
        print(text, flush=True)
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "utf-8"
        print(text.encode(encoding, "backslashreplace").decode(encoding), flush=True)


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "duration")
    except KVStoreError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("duration: ")) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.t0 = self._last = time.monotonic()
        self.done = self.nbytes = 0

    def advance(self, nbytes: int) -> None:
        self.done += 1
        self.nbytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or self.done == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        secs = max(now - self.t0, 1e-9)
        eta = (self.total - self.done) * secs / self.done if self.done else 0
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {frac:4.0%} "
                         f"{_human_bytes(self.nbytes / secs)}/s eta {_span(eta)} ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            if self.done < self.total or not self.total:  # else advance() drew the final state
                self._draw(time.monotonic())
            sys.stderr.write("\n")


# -- the store --------------------------------------------------------------------------------
def _config(args: argparse.Namespace, path: str | None = None) -> StoreConfig:
    """The engine's settings for the store at ``path`` (default: --path, KVSTORE_PATH, or the
    path in the config file).

    Read as the engine reads them: --config (or KVSTORE_CONFIG) and the KVSTORE_* variables that
    StoreConfig knows; other KVSTORE_* variables belong to other components and are ignored.
    """
    known = {ENV_PREFIX + k.upper() for k in StoreConfig.keys()} | {ENV_PREFIX + "CONFIG"}
    env = {k: v for k, v in os.environ.items() if k in known and v}
    if args.config:
        env[ENV_PREFIX + "CONFIG"] = args.config
    path = path or args.path or env.get(ENV_PREFIX + "PATH")
    if not path and ENV_PREFIX + "CONFIG" not in env:
        raise KVStoreError("no store given: pass --path DIR (or --config FILE), or set KVSTORE_PATH")
    overrides = {"path": path} if path else {}  # else the config file names it
    # Tools never put: no RAM (or GPU) slab and no write-behind staging memory.
    return StoreConfig.from_env(env, host_bytes=0, device_bytes=0, write_queue_bytes=0, io_threads=1,
                                **overrides)


def _open(args: argparse.Namespace) -> KVStore:
    """Opens the store at --path without creating one.

    Raises:
        KVStoreError: no path, not a store, a newer format, or an unusable directory.
    """
    config = _config(args)
    if not os.path.isfile(os.path.join(config.path, "disk", "data.mdb")):
        raise KVStoreError(f"{config.path}: not a kvstore store (no disk/data.mdb inside)")
    store = KVStore.open(config)
    if store.disk is None:
        store.close()
        raise KVStoreError(f"{config.path}: the config disables the disk tier (disk_bytes = 0)")
    return store


def _ns_label(names: dict[int, str], ns_id: int) -> str:
    return names.get(ns_id, f"#{ns_id:016x}")


def _expires(meta: EntryMeta, ttl: float) -> float:
    return max(meta.last_access + ttl, meta.pinned_until)


def _tokens(m: EntryMeta, bt: int) -> str:
    return f"{m.depth * bt}-{(m.depth + 1) * bt - 1}"


def _entry_json(key: bytes, m: EntryMeta, names: dict[int, str], ttl: float, bt: int, now: float) -> dict:
    return {
        "key": key.hex(), "namespace": _ns_label(names, m.namespace_id),
        "depth": m.depth, "tokens": _tokens(m, bt), "parent": m.parent.hex() or None,
        "raw_bytes": m.raw_bytes, "stored_bytes": m.stored_bytes,
        "created": _iso(m.created), "last_access": _iso(m.last_access),
        "expires": _iso(_expires(m, ttl)),
        "pinned_until": _iso(m.pinned_until) if m.pinned_until > now else None,
    }


def _descendants(entries: Iterable[tuple[bytes, EntryMeta]], roots: set[bytes]) -> set[bytes]:
    """Every held block chained below one of ``roots`` (unreachable once its ancestor is gone)."""
    children: dict[bytes, list[bytes]] = {}
    for key, m in entries:
        if m.parent:
            children.setdefault(m.parent, []).append(key)
    out, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out - roots


# -- commands ---------------------------------------------------------------------------------
def _lifetime_counters(flat: dict[str, float]) -> dict:
    """The store's persisted counters (``name|label=value,...`` -> value), grouped for stats."""
    def series(name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in flat.items():
            n, _, labels = key.partition("|")
            if n == name:
                out[labels or "total"] = out.get(labels or "total", 0) + value
        return out

    hits = {k.removeprefix("tier="): v for k, v in series("hit_tokens").items()}
    hit, miss = sum(hits.values()), sum(series("miss_tokens").values())
    return {
        "requests": sum(series("requests").values()),
        "hit_tokens": hits, "hit_tokens_total": hit, "miss_tokens": miss,
        "hit_rate": hit / (hit + miss) if hit + miss else 0.0,
        "evictions": series("evictions"),
        "dropped_writes": sum(series("dropped_writes").values()),
        "corrupt_records": sum(series("corrupt_records").values()),
    }


def cmd_stats(args: argparse.Namespace) -> Output:
    with _open(args) as store:
        now = time.time()
        entries, names, u = store.disk.entries(), store.disk.namespaces(), store.disk.usage()
        ttl, bt = store.config.disk_ttl_s, store.config.block_tokens
        lifetime = _lifetime_counters(store.disk.counters())
    per_ns: dict[str, dict[str, int]] = {}
    for _, m in entries:
        ns = per_ns.setdefault(_ns_label(names, m.namespace_id),
                               {"entries": 0, "bytes": 0, "raw_bytes": 0, "longest_chain_tokens": 0})
        ns["entries"] += 1
        ns["bytes"] += m.stored_bytes
        ns["raw_bytes"] += m.raw_bytes
        ns["longest_chain_tokens"] = max(ns["longest_chain_tokens"], (m.depth + 1) * bt)
    pinned = sum(m.pinned_until > now for _, m in entries)
    expired = sum(now - m.last_access > ttl and m.pinned_until <= now for _, m in entries)
    created = [m.created for _, m in entries]
    access = [m.last_access for _, m in entries]
    data = {
        "path": str(store.config.path),
        "block_tokens": bt,
        "tiers": {"disk": {
            "entries": u.entries, "bytes": u.bytes, "raw_bytes": u.raw_bytes, "budget": u.budget,
            "used": u.bytes / u.budget if u.budget else None,
            "compression_ratio": u.raw_bytes / u.bytes if u.bytes else None,
            "ttl_s": ttl, "pinned": pinned, "expired": expired,
            "oldest_created": _iso(min(created, default=None)),
            "newest_created": _iso(max(created, default=None)),
            "least_recent_access": _iso(min(access, default=None)),
            "most_recent_access": _iso(max(access, default=None)),
        }},
        "namespaces": per_ns,
        # Summed over every process that used the store, as of each one's last flush (engines
        # persist theirs every few seconds while they write).
        "counters": lifetime,
    }
    ratio = f", ratio {u.raw_bytes / u.bytes:.2f}" if u.bytes else ""
    lines = [
        f"store        {data['path']}  (blocks of {bt} tokens)",
        f"disk tier    {u.entries} blocks, {_human_bytes(u.bytes)} stored ({_human_bytes(u.raw_bytes)} raw"
        f"{ratio}) of a {_human_bytes(u.budget)} budget ({100 * u.bytes / u.budget:.1f}% used)"
        if u.budget else f"disk tier    {u.entries} blocks",
        f"             idle TTL {_span(ttl)}; {pinned} pinned; {expired} expired (removed by the next write)",
        f"created      oldest {_when(min(created, default=None), now)}, newest {_when(max(created, default=None), now)}",
        f"last access  least recent {_when(min(access, default=None), now)}, most recent "
        f"{_when(max(access, default=None), now)}",
        f"requests     {lifetime['requests']:.0f}; hit tokens {lifetime['hit_tokens_total']:.0f} "
        f"({', '.join(f'{t} {v:.0f}' for t, v in sorted(lifetime['hit_tokens'].items())) or 'none'}), "
        f"miss tokens {lifetime['miss_tokens']:.0f}; hit rate {100 * lifetime['hit_rate']:.1f}%",
        "evictions    " + (", ".join(f"{k} {v:.0f}" for k, v in sorted(lifetime["evictions"].items())) or "none")
        + f"; dropped writes {lifetime['dropped_writes']:.0f}; corrupt records {lifetime['corrupt_records']:.0f}",
    ]
    if per_ns:
        lines.append("namespaces")
        for name, v in sorted(per_ns.items(), key=lambda kv: -kv[1]["bytes"]):
            lines.append(f"  {v['entries']:>8} blocks  {_human_bytes(v['bytes']):>10}  longest "
                         f"{v['longest_chain_tokens']:>7} tokens  {name}")
    return Output(data, "\n".join(lines))


SORTS = {
    "last-access": lambda km: -km[1].last_access,
    "created": lambda km: -km[1].created,
    "size": lambda km: -km[1].stored_bytes,
    "depth": lambda km: -km[1].depth,
    "key": lambda km: km[0],
}


def _namespace_filter(names: dict[int, str], text: str) -> int:
    """The id of the namespace named ``text`` (a name, or ``#`` and its 16 hex digits)."""
    if text.startswith("#"):
        try:
            return int(text[1:], 16)
        except ValueError:
            raise KVStoreError(f"--namespace {text}: expected '#' and 16 hex digits") from None
    return namespace_id(text)


def cmd_ls(args: argparse.Namespace) -> Output:
    with _open(args) as store:
        now = time.time()
        entries, names = store.disk.entries(), store.disk.namespaces()
        ttl, bt = store.config.disk_ttl_s, store.config.block_tokens
    ns_id = _namespace_filter(names, args.namespace) if args.namespace else None
    key_prefix = args.key.lower() if args.key else None
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
    items = [_entry_json(k, m, names, ttl, bt, now) for k, m in page]
    data = {"total": len(rows), "offset": args.offset, "count": len(items), "entries": items}
    head = (f"{'KEY':<12}  {'BLOCK':>5}  {'RAW':>9}  {'STORED':>9}  {'CREATED':>10}  {'LAST USE':>10}  "
            f"{'EXPIRES':>10}  {'PINNED':>10}  NAMESPACE")
    lines = [head]
    for k, m in page:
        pin = _ago(m.pinned_until, now).removeprefix("in ") if m.pinned_until > now else "-"
        lines.append(f"{k.hex()[:12]:<12}  {m.depth:>5}  {_human_bytes(m.raw_bytes):>9}  "
                     f"{_human_bytes(m.stored_bytes):>9}  {_ago(m.created, now):>10}  "
                     f"{_ago(m.last_access, now):>10}  {_ago(_expires(m, ttl), now):>10}  {pin:>10}  "
                     f"{_ns_label(names, m.namespace_id)}")
    shown = f"{args.offset + 1}-{args.offset + len(page)}" if page else "none"
    more = (f"; next page: --offset {args.offset + len(page)}"
            if args.offset + len(page) < len(rows) else "")
    lines.append(f"({shown} of {len(rows)} matching blocks{more})")
    return Output(data, "\n".join(lines))


def _find_key(entries: list[tuple[bytes, EntryMeta]], text: str) -> bytes:
    """The one key starting with hex ``text``.

    Raises:
        KVStoreError: not hex, no such key, or more than one.
    """
    prefix = text.lower().removeprefix("0x")
    if len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix):
        raise KVStoreError(f"{text!r}: expected a key or a key prefix of at least 4 hex digits")
    found = [k for k, _ in entries if k.hex().startswith(prefix)]
    if not found:
        raise KVStoreError(f"no block with key {prefix}… in this store")
    if len(found) > 1:
        raise KVStoreError(f"key prefix {prefix} is ambiguous: {len(found)} blocks match; give more digits")
    return found[0]


def cmd_inspect(args: argparse.Namespace) -> Output:
    with _open(args) as store:
        now = time.time()
        entries, names = store.disk.entries(), store.disk.namespaces()
        ttl, bt = store.config.disk_ttl_s, store.config.block_tokens
        key = _find_key(entries, args.key)
        found = store.disk.read_record(key)
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
    data = _entry_json(key, m, names, ttl, bt, now)
    data.update({
        "record_bytes": len(record), "header": header, "checksum": verdict,
        "ancestors": chain, "complete_chain": all(c["held"] for c in chain),
        "children": children,
    })
    lines = [
        f"key          {key.hex()}",
        f"namespace    {_ns_label(names, m.namespace_id)}",
        f"position     block {m.depth} of its chain: tokens {data['tokens']}",
    ]
    if m.depth:
        held = sum(c["held"] for c in chain)
        state = "all held" if data["complete_chain"] else f"{held} held, then {chain[-1]['key'][:12]} is missing: unreachable"
        lines.append(f"parent       {m.parent.hex()}  ({len(chain)} ancestor(s) walked: {state})")
    lines.append(f"children     {len(children)} held" + (f": {', '.join(c[:12] for c in children[:4])}"
                                                         + (" …" if len(children) > 4 else "") if children else ""))
    if header is not None:
        planes = f", {header['planes']} byte planes" if header["planes"] > 1 else ""
        level = f" level {header['level']}" if header["codec"] == "zstd" else ""
        lines += [
            f"record       format {header['v']}, {header['dtype']} {tuple(header['shape'])}, "
            f"{header['codec']}{level}{planes}",
            f"size         {_human_bytes(header['n'])} raw, {_human_bytes(len(record))} record "
            f"(ratio {header['n'] / len(record):.2f}), {_human_bytes(m.stored_bytes)} against the budget",
            f"checksums    data xxh3-64 {header['xxh']}, payload xxh3-64 {header['pxh']}",
        ]
    lines += [
        f"verdict      {verdict}",
        f"created      {_when(m.created, now)}",
        f"last access  {_when(m.last_access, now)}",
        f"expires      {_when(_expires(m, ttl), now)}  (idle TTL {_span(ttl)})",
        f"pinned       {'until ' + _when(m.pinned_until, now) if m.pinned_until > now else 'no'}",
    ]
    return Output(data, "\n".join(lines), 0 if verdict == "ok" else 3)


def _prompt_tokenizer(args: argparse.Namespace):
    """A loader that fetches the tokenizer once, on first use."""
    cache: list[Any] = []

    def get():
        if not cache:
            cache.append(explainlib.default_tokenizer(args.tokenizer))
        return cache[0]
    return get


def _chat_template(args: argparse.Namespace) -> str | None:
    if not args.chat_template:
        return None
    try:
        with open(args.chat_template, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise KVStoreError(f"{args.chat_template}: cannot read: {e.strerror or e}") from None


def cmd_purge(args: argparse.Namespace) -> Output:
    criteria = (args.all, args.older_than is not None, args.idle_longer_than is not None,
                args.namespace is not None, args.prefix_of is not None)
    if not any(criteria):
        raise KVStoreError("say what to remove: --all, --older-than, --idle-longer-than, "
                           "--namespace or --prefix-of")
    if args.all and any(criteria[1:]):
        raise KVStoreError("--all removes everything: it combines with no other criterion")
    prompt = None
    if args.prefix_of:
        prompt = explainlib.load_prompt(args.prefix_of, _prompt_tokenizer(args), args.format,
                                        _chat_template(args))
    with _open(args) as store:
        now = time.time()
        entries, names = store.disk.entries(), store.disk.namespaces()
        bt = args.block_tokens or store.config.block_tokens
        ns_id = _namespace_filter(names, args.namespace) if args.namespace else None
        prompt_keys: set[bytes] | None = None
        if prompt is not None:
            # A prompt's keys depend on the namespace: with none given, take it out of every one.
            spaces = [names.get(ns_id, args.namespace)] if ns_id is not None else list(names.values())
            prompt_keys = {k for ns in spaces for k in block_keys(ns, prompt.ids, bt)[args.from_block:]}
        chosen = {
            k for k, m in entries
            if (ns_id is None or m.namespace_id == ns_id)
            and (prompt_keys is None or k in prompt_keys)
            and (args.older_than is None or now - m.created > args.older_than)
            and (args.idle_longer_than is None or now - m.last_access > args.idle_longer_than)
        }
        # Blocks chained below a removed block can never be reached again: they go too.
        below = _descendants(entries, chosen)
        metas = dict(entries)
        removed = 0
        if args.all and not args.dry_run:
            removed = store.purge(all=True)
        elif chosen and not args.dry_run:
            removed = store.purge(keys=sorted(chosen | below))
    gone = chosen | below if not args.all else set(metas)
    by_ns: dict[str, int] = {}
    for k in gone:
        label = _ns_label(names, metas[k].namespace_id)
        by_ns[label] = by_ns.get(label, 0) + 1
    nbytes = sum(metas[k].stored_bytes for k in gone)
    data = {"dry_run": args.dry_run, "matched": len(gone), "removed": 0 if args.dry_run else removed,
            "selected": len(chosen) if not args.all else len(gone), "chained_below": len(below),
            "stored_bytes": nbytes, "namespaces": by_ns}
    if prompt is not None:
        data["prompt"] = {"source": prompt.source, "tokens": len(prompt.ids),
                          "full_blocks": len(prompt.ids) // bt, "blocks_held": len(chosen)}
    verb = "would remove" if args.dry_run else "removed"
    n = len(gone) if args.dry_run else removed
    text = [f"{verb} {n} block(s), {_human_bytes(nbytes)} stored"]
    if prompt is not None:
        spaces = len({metas[k].namespace_id for k in chosen})
        text.append(f"  prompt {prompt.source}: {len(prompt.ids)} tokens, {len(prompt.ids) // bt} full "
                    f"block(s); {len(chosen)} held from block {args.from_block} (in {spaces} namespace(s)), "
                    f"{len(below)} more chained below them")
    elif below:
        text.append(f"  including {len(below)} block(s) chained below the selected ones (unreachable without them)")
    text += [f"  {c:>8}  {name}" for name, c in sorted(by_ns.items(), key=lambda kv: -kv[1])]
    if n and not args.dry_run:
        text.append("running engines drop these blocks from their RAM tiers within a second")
    return Output(data, "\n".join(text))


def cmd_verify(args: argparse.Namespace) -> Output:
    bad: dict[bytes, str] = {}
    codec = Codec()
    with _open(args) as store:
        entries = store.disk.entries()
        progress = Progress("verify", len(entries),
                            sys.stderr.isatty() if args.progress is None else args.progress)
        ok = vanished = 0
        t0 = time.monotonic()
        for key, _ in entries:
            found = store.disk.read_record(key)  # one short read transaction per record
            if found is None:
                vanished += 1  # evicted or purged since the listing: not an error
                progress.advance(0)
                continue
            record, m = found
            try:
                codec.decode(record)
                ok += 1
            except CorruptEntryError as e:
                bad[key] = str(e)
            progress.advance(m.raw_bytes)
        progress.finish()
        seconds = time.monotonic() - t0
        repaired: list[bytes] = []
        below: set[bytes] = set()
        if args.repair and bad:
            # Check again right before deleting: the engine may have replaced a bad record.
            still = set()
            for key in bad:
                found = store.disk.read_record(key)
                try:
                    if found is not None:
                        codec.decode(found[0])
                except CorruptEntryError:
                    still.add(key)
            below = _descendants(store.disk.entries(), still)
            store.purge(keys=sorted(still | below))
            repaired = sorted(still)
    data = {"checked": len(entries), "ok": ok, "corrupt": len(bad), "vanished": vanished,
            "seconds": round(seconds, 3),
            "bad": [{"key": k.hex(), "error": e, "removed": k in repaired} for k, e in sorted(bad.items())],
            "repaired": len(repaired), "chained_below_removed": len(below)}
    lines = [f"checked {len(entries)} record(s) in {seconds:.1f} s: {ok} ok, {len(bad)} corrupt"
             + (f", {vanished} removed meanwhile" if vanished else "")]
    for k, e in sorted(bad.items()):
        lines.append(f"  {k.hex()}  {e}" + ("  (removed)" if k in repaired else ""))
    if repaired:
        lines.append(f"repaired: removed {len(repaired)} corrupt record(s) and {len(below)} block(s) "
                     f"chained below them")
    elif bad:
        lines.append("run again with --repair to remove them (each is already served as a miss)")
    return Output(data, "\n".join(lines), 3 if bad and not repaired else 0)


def cmd_explain(args: argparse.Namespace) -> Output:
    tokenizer = _prompt_tokenizer(args)
    template = _chat_template(args)
    a = explainlib.load_prompt(args.a, tokenizer, args.format, template)
    b = explainlib.load_prompt(args.b, tokenizer, args.format, template)
    decode = None
    if args.tokenizer or a.kind != "ids" or b.kind != "ids":  # ids alone are shown undecoded
        tok = tokenizer()
        decode = lambda t: tok.decode([t])  # noqa: E731
    held = None
    namespace = args.namespace
    if args.path or args.config or os.environ.get("KVSTORE_PATH") or os.environ.get("KVSTORE_CONFIG"):
        with _open(args) as store:
            bt = args.block_tokens or store.config.block_tokens
            now = time.time()
            others: list[str] = []
            if namespace is None:
                namespace, others = _pick_namespace(store, [a.ids, b.ids], bt, now)
            keys = list(dict.fromkeys(block_keys(namespace, a.ids, bt) + block_keys(namespace, b.ids, bt)))
            present = dict(zip(keys, store.disk.contains_many(keys, now)))
            held = lambda ks: [present[k] for k in ks]  # noqa: E731
    else:
        # No store: the block size still comes from the configuration (KVSTORE_*, --config).
        bt = args.block_tokens or _config(args, path=".").block_tokens
        namespace = namespace or "default"
    report = explainlib.compare(a, b, bt, namespace, context=args.context, decode=decode, held=held)
    if held is not None:
        report["store"]["other_namespaces"] = others
    return Output(report, explainlib.render(report))


def _pick_namespace(store: KVStore, prompts: list[list[int]], bt: int, now: float) -> tuple[str, list[str]]:
    """The store's namespace holding most blocks of ``prompts`` (else its only one, else the
    config's), and the other namespaces that hold some of them."""
    names = sorted(store.disk.namespaces().values())
    held = {}
    for ns in names:
        keys = [k for p in prompts for k in block_keys(ns, p, bt)]
        held[ns] = sum(store.disk.contains_many(keys, now))
    best = max(names, key=lambda ns: held[ns], default=None)
    if best is None or not held[best]:
        return (names[0] if len(names) == 1 else store.config.namespace), []
    return best, [ns for ns in names if ns != best and held[ns]]


def cmd_serve_metrics(args: argparse.Namespace) -> Output:
    from .exporter import start_metrics_server  # prometheus_client: only this command needs it

    with _open(args) as store:
        server = start_metrics_server(store, args.host, args.port, process_counters=False,
                                      interval_s=args.interval)
        with server:
            info = {"url": server.url, "metrics": server.url + "metrics", "dashboard": server.url}
            _print(json.dumps(info) if args.json else
                   f"serving {info['metrics']} and the dashboard at {info['dashboard']} "
                   f"(disk-tier figures of {store.config.path}; Ctrl-C stops)")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(1):
                    pass
            except KeyboardInterrupt:
                pass
    return Output(None, "")


COMMANDS = {"stats": cmd_stats, "ls": cmd_ls, "inspect": cmd_inspect, "purge": cmd_purge,
            "verify": cmd_verify, "explain": cmd_explain, "serve-metrics": cmd_serve_metrics}


def _prompt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=explainlib.FORMATS, default="auto",
                   help="how to read prompt files (default: detect text, token ids or chat JSON)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the default model's)")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template replacing the tokenizer's")
    p.add_argument("--block-tokens", type=_positive_int, metavar="N",
                   help="tokens per block (default: the store's configured block size)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--path", help="store directory (default: $KVSTORE_PATH)")
    common.add_argument("--config", metavar="FILE",
                        help="the engine's TOML config, for budget, TTL and block size (default: $KVSTORE_CONFIG)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = _Parser(prog="kvstore", description="Inspect, clean, verify and explain a kvstore KV-cache store.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("stats", parents=[common], help="entries, bytes, budget, ages and namespaces",
                   description="Entries, bytes (stored and raw), budget, TTL, pins, ages and namespaces of the disk tier.")

    ls = sub.add_parser("ls", parents=[common], help="list blocks with filters, sorting and paging")
    ls.add_argument("--namespace", help="only this namespace (its name, or '#' and its id)")
    ls.add_argument("--key", metavar="HEX", help="only keys starting with HEX")
    ls.add_argument("--older-than", type=_duration, metavar="AGE", help="created more than AGE ago (e.g. 6h)")
    ls.add_argument("--newer-than", type=_duration, metavar="AGE", help="created less than AGE ago")
    ls.add_argument("--idle-longer-than", type=_duration, metavar="AGE", help="unused for more than AGE (e.g. 2d)")
    ls.add_argument("--pinned", action="store_true", help="only pinned blocks")
    ls.add_argument("--sort", choices=SORTS, default="last-access", help="order (default: most recently used first)")
    ls.add_argument("--reverse", action="store_true", help="reverse the order")
    ls.add_argument("--limit", type=int, default=50, metavar="N", help="at most N rows (0: all; default 50)")
    ls.add_argument("--offset", type=int, default=0, metavar="N", help="skip the first N rows")

    ins = sub.add_parser("inspect", parents=[common], help="one block: header, checksum verdict, chain position")
    ins.add_argument("key", metavar="KEY", help="the block's key, or a unique prefix of 4+ hex digits")

    pp = sub.add_parser("purge", parents=[common], help="remove blocks (and those chained below them)")
    pp.add_argument("--all", action="store_true", help="remove everything")
    pp.add_argument("--older-than", type=_duration, metavar="AGE", help="created more than AGE ago (e.g. 6h)")
    pp.add_argument("--idle-longer-than", type=_duration, metavar="AGE", help="unused for more than AGE (e.g. 2d)")
    pp.add_argument("--namespace", help="only this namespace (its name, or '#' and its id)")
    pp.add_argument("--prefix-of", metavar="PROMPT",
                    help="a prompt file: its blocks and every block chained below them")
    pp.add_argument("--from-block", type=int, default=0, metavar="I",
                    help="with --prefix-of: keep the prompt's blocks before block I (e.g. a shared system prompt)")
    _prompt_options(pp)
    pp.add_argument("--dry-run", action="store_true", help="report what would go, remove nothing")

    vp = sub.add_parser("verify", parents=[common], help="check every record's checksum")
    vp.add_argument("--repair", action="store_true", help="remove corrupt records (and blocks chained below them)")
    vp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")

    ep = sub.add_parser("explain", parents=[common], help="why prompt B does or does not hit after prompt A",
                        description="Compare two prompts' block chains: where they part, the tokens there, "
                                    "and how much of B hits after A. With --path, also what the store holds.")
    ep.add_argument("a", metavar="A", help="prompt file: text, JSON token ids, or JSON chat messages")
    ep.add_argument("b", metavar="B", help="prompt file, same kinds")
    ep.add_argument("--namespace", help="namespace of the keys (default: the store's that holds the prompts)")
    ep.add_argument("--context", type=int, default=8, metavar="N", help="tokens shown around the split (default 8)")
    _prompt_options(ep)

    sp = sub.add_parser("serve-metrics", parents=[common], help="serve the disk tier's metrics and the dashboard",
                        description="Serve Prometheus metrics (/metrics) and the dashboard (/) for a store, "
                                    "from outside the engine: disk-tier figures only.")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=9477, help="port (default 9477; 0 picks a free one)")
    sp.add_argument("--interval", type=float, default=5.0, metavar="S", help="dashboard sampling interval (default 5 s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = COMMANDS[args.command](args)
    except (KVStoreError, OSError, ValueError) as e:
        # Bad input and unusable stores are reported, not traced: one line naming the problem.
        print(f"kvstore {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kvstore {args.command}: interrupted", file=sys.stderr)
        return 130
    try:
        if out.text or out.data is not None:
            _print(json.dumps(out.data, indent=2) if args.json else out.text)
    except BrokenPipeError:  # `kvstore ls | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return out.code


if __name__ == "__main__":
    sys.exit(main())
