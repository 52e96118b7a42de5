"""How command results look: text for a terminal, or JSON with ``--json``.

A command computes plain data (dicts, lists, numbers, strings: what ``--json`` prints) and
returns it in a ``Result``; this module alone turns that data into text. The text of a command is
a function of its data only, so the two outputs never disagree.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from .. import explain as explainlib


class Result(NamedTuple):
    """What a command returns: its data (None: nothing to print) and the exit code."""

    data: Any
    code: int = 0


def render(command: str, result: Result, as_json: bool) -> str:
    """The text to print for ``result`` of ``command`` ("" for nothing)."""
    if result.data is None:
        return ""
    if as_json:
        return json.dumps(result.data, indent=2)
    return TEXT[command](result.data)


# -- pieces -----------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def span(seconds: float) -> str:
    """``90061`` -> ``1d1h``: the two leading units."""
    s = int(abs(seconds))
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return "".join(f"{v}{u}" for v, u in parts[:2] if v or u == parts[0][1])


def _ts(iso: str | None) -> float | None:
    return None if iso is None else dt.datetime.fromisoformat(iso).timestamp()


def ago(iso: str | None, now: float) -> str:
    ts = _ts(iso)
    if ts is None:
        return "-"
    return f"{span(now - ts)} ago" if ts <= now else f"in {span(ts - now)}"


def when(iso: str | None, now: float) -> str:
    ts = _ts(iso)
    if ts is None:
        return "-"
    return f"{dt.datetime.fromtimestamp(ts).isoformat(sep=' ', timespec='seconds')} ({ago(iso, now)})"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(message: str) -> str:
    """``message`` with control characters written as escapes (``\\n``, ``\\x1b``): an error
    stays one line, whatever an argument, a file name or a library's message holds."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), message)


def print_text(text: str) -> None:
    """Prints ``text`` on stdout. A file name that is not valid in the locale's encoding (held
    as surrogates, as Python decodes argv) is written as escapes where stdout is strict."""
    try:
        print(text, flush=True)
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "utf-8"
        print(text.encode(encoding, "backslashreplace").decode(encoding), flush=True)


def _per_tier_reason(nested: dict[str, dict[str, float]]) -> str:
    """``{"disk": {"purge": 2, "ttl": 1}}`` -> ``disk: purge 2, ttl 1``."""
    return "; ".join(f"{tier}: " + ", ".join(f"{r} {v:.0f}" for r, v in sorted(reasons.items()))
                     for tier, reasons in sorted(nested.items()) if reasons) or "none"


# -- one text view a command ------------------------------------------------------------------
def stats_text(data: dict) -> str:
    now = time.time()
    d, bt, lifetime = data["tiers"]["disk"], data["block_tokens"], data["counters"]
    ratio = f", ratio {d['raw_bytes'] / d['bytes']:.2f}" if d["bytes"] else ""
    lines = [
        f"store        {data['path']}  (blocks of {bt} tokens)",
        f"disk tier    {d['entries']} blocks, {human_bytes(d['bytes'])} stored ({human_bytes(d['raw_bytes'])} raw"
        f"{ratio}) of a {human_bytes(d['budget'])} budget ({100 * d['bytes'] / d['budget']:.1f}% used)"
        if d["budget"] else f"disk tier    {d['entries']} blocks",
        f"data file    {human_bytes(d['file']['file_bytes'])} (disk/data.mdb): {human_bytes(d['file']['data_bytes'])} "
        f"in use, {human_bytes(d['file']['free_bytes'])} free for reuse, "
        f"{human_bytes(max(d['file']['file_bytes'] - d['file']['written_bytes'], 0))} never written",
        f"             idle TTL {span(d['ttl_s'])}; {d['pinned']} pinned; {d['expired']} expired "
        f"(removed by the next write)",
        f"created      oldest {when(d['oldest_created'], now)}, newest {when(d['newest_created'], now)}",
        f"last access  least recent {when(d['least_recent_access'], now)}, most recent "
        f"{when(d['most_recent_access'], now)}",
        f"requests     {lifetime['requests']:.0f}; hit tokens {lifetime['hit_tokens_total']:.0f} "
        f"({', '.join(f'{t} {v:.0f}' for t, v in sorted(lifetime['hit_tokens'].items())) or 'none'}), "
        f"miss tokens {lifetime['miss_tokens']:.0f}; hit rate {100 * lifetime['hit_rate']:.1f}%",
        f"evictions    {lifetime['evictions_total']:.0f} ({_per_tier_reason(lifetime['evictions'])})",
        f"dropped      {lifetime['dropped_writes_total']:.0f} writes ({_per_tier_reason(lifetime['dropped_writes'])}); "
        f"corrupt records {lifetime['corrupt_records_total']:.0f}"
        + (f" ({', '.join(f'{t} {v:.0f}' for t, v in sorted(lifetime['corrupt_records'].items()))})"
           if lifetime["corrupt_records_total"] else ""),
    ]
    r = data["tiers"].get("remote")
    if r is not None:
        rc = lifetime["remote"]
        errs = ", ".join(f"{k} {v:.0f}" for k, v in sorted(rc["errors"].items())) or "none"
        lines += [
            f"remote tier  {r['server']}  {'reachable' if r['reachable'] else 'UNREACHABLE (' + r['last_error'] + ')'}"
            + (f"; remote_compression {r['compression']}" if "compression" in r else ""),
            f"             {r['entries']} blocks, {human_bytes(r['bytes'])} stored under this prefix; "
            f"hits {rc['hits']:.0f}, misses {rc['misses']:.0f}, errors {errs}",
        ]
    if data["namespaces"]:
        lines.append("namespaces")
        for name, v in sorted(data["namespaces"].items(), key=lambda kv: -kv[1]["bytes"]):
            lines.append(f"  {v['id']}  {v['entries']:>8} blocks  {human_bytes(v['bytes']):>10}  longest "
                         f"{v['longest_chain_tokens']:>7} tokens  {name}")
    return "\n".join(lines)


def ls_tree_text(data: dict) -> str:
    """One line a run of blocks (a stretch without forks), indented under the run it forks from."""
    lines: list[str] = []

    def draw(node: dict, lead: str, branch: str) -> None:
        last = node["depth"] + node["blocks"] - 1
        span_ = f"block {last}" if node["blocks"] == 1 else f"blocks {node['depth']}-{last}"
        keys = node["first"][:12] + ("" if node["blocks"] == 1 else ".." + node["last"][:12])
        lines.append(f"{lead}{branch}{keys}  {span_} ({node['blocks']}, {human_bytes(node['stored_bytes'])})"
                     + (f"  {len(node['children'])} forks" if len(node["children"]) > 1 else ""))
        inner = lead + ("   " if branch in ("", "└─ ") else "│  ")
        for i, child in enumerate(node["children"]):
            draw(child, inner, "└─ " if i == len(node["children"]) - 1 else "├─ ")
    ns = None
    for chain in data["chains"]:
        if chain["namespace"] != ns:
            ns = chain["namespace"]
            lines.append(f"{ns} ({chain['namespace_id']})")
        draw(chain, "", "└─ ")
    offset, count, total = data["offset"], data["count"], data["total"]
    shown = f"{offset + 1}-{offset + count}" if count else "none"
    more = f"; next page: --offset {offset + count}" if offset + count < total else ""
    lines.append(f"({shown} of {total} chain(s){more})")
    return "\n".join(lines)


def ls_text(data: dict) -> str:
    if data.get("tree"):
        return ls_tree_text(data)
    now = time.time()
    lines = [f"{'KEY':<12}  {'NS':<9}  {'BLOCK':>5}  {'RAW':>9}  {'STORED':>9}  {'CREATED':>10}  {'LAST USE':>10}  "
             f"{'EXPIRES':>10}  {'PINNED':>10}  NAMESPACE"]
    for e in data["entries"]:
        pin = ago(e["pinned_until"], now).removeprefix("in ") if e["pinned_until"] else "-"
        lines.append(f"{e['key'][:12]:<12}  {e['namespace_id']:<9}  {e['depth']:>5}  {human_bytes(e['raw_bytes']):>9}  "
                     f"{human_bytes(e['stored_bytes']):>9}  {ago(e['created'], now):>10}  "
                     f"{ago(e['last_access'], now):>10}  {ago(e['expires'], now):>10}  {pin:>10}  "
                     f"{e['namespace']}")
    offset, count, total = data["offset"], data["count"], data["total"]
    shown = f"{offset + 1}-{offset + count}" if count else "none"
    more = f"; next page: --offset {offset + count}" if offset + count < total else ""
    lines.append(f"({shown} of {total} matching blocks{more})")
    return "\n".join(lines)


def inspect_text(data: dict) -> str:
    now = time.time()
    chain, children, header = data["ancestors"], data["children"], data["header"]
    lines = [
        f"key          {data['key']}",
        f"namespace    {data['namespace']}",
        f"position     block {data['depth']} of its chain: tokens {data['tokens']}",
    ]
    if data["depth"]:
        held = sum(c["held"] for c in chain)
        state = ("all held" if data["complete_chain"]
                 else f"{held} held, then {chain[-1]['key'][:12]} is missing: unreachable")
        lines.append(f"parent       {data['parent']}  ({len(chain)} ancestor(s) walked: {state})")
    lines.append(f"children     {len(children)} held" + (f": {', '.join(c[:12] for c in children[:4])}"
                                                         + (" …" if len(children) > 4 else "") if children else ""))
    if header is not None:
        planes = f", {header['planes']} byte planes" if header["planes"] > 1 else ""
        level = f" level {header['level']}" if header["codec"] == "zstd" else ""
        n = data["record_bytes"]
        lines += [
            f"record       format {header['v']}, {header['dtype']} {tuple(header['shape'])}, "
            f"{header['codec']}{level}{planes}",
            f"size         {human_bytes(header['n'])} raw, {human_bytes(n)} record "
            f"(ratio {header['n'] / n:.2f}), {human_bytes(data['stored_bytes'])} against the budget",
            f"checksums    data xxh3-64 {header['xxh']}, payload xxh3-64 {header['pxh']}",
        ]
    lines += [
        f"verdict      {data['checksum']}",
        f"created      {when(data['created'], now)}",
        f"last access  {when(data['last_access'], now)}",
        f"expires      {when(data['expires'], now)}  (idle TTL {span(data['ttl_s'])})",
        f"pinned       {'until ' + when(data['pinned_until'], now) if data['pinned_until'] else 'no'}",
    ]
    return "\n".join(lines)


def purge_text(data: dict) -> str:
    dry = data["dry_run"]
    n = data["matched"] if dry else data["removed"]
    text = [f"{'would remove' if dry else 'removed'} {n} block(s), {human_bytes(data['stored_bytes'])} stored"]
    below, prompt = data["chained_below"], data.get("prompt")
    if prompt is not None:
        text.append(f"  prompt {prompt['source']}: {prompt['tokens']} tokens, {prompt['full_blocks']} full "
                    f"block(s); {prompt['blocks_held']} held from block {prompt['from_block']} (in "
                    f"{prompt['namespaces']} namespace(s)), {below} more chained below them")
    elif below:
        text.append(f"  including {below} block(s) chained below the selected ones (unreachable without them)")
    text += [f"  {c:>8}  {name}" for name, c in sorted(data["namespaces"].items(), key=lambda kv: -kv[1])]
    if n and not dry:
        text.append("running engines drop these blocks from their RAM tiers within a second")
    return "\n".join(text)


def verify_text(data: dict) -> str:
    bad, vanished = data["bad"], data["vanished"]
    lines = [f"checked {data['checked']} record(s) in {data['seconds']:.1f} s: {data['ok']} ok, "
             f"{data['corrupt']} corrupt" + (f", {vanished} removed meanwhile" if vanished else "")]
    for b in bad:
        lines.append(f"  {b['key']}  {b['error']}" + ("  (removed)" if b["removed"] else ""))
    if data["repaired"]:
        lines.append(f"repaired: removed {data['repaired']} corrupt record(s) and "
                     f"{data['chained_below_removed']} block(s) chained below them")
    elif bad:
        lines.append("run again with --repair to remove them (each is already served as a miss)")
    return "\n".join(lines)


def compact_text(data: dict) -> str:
    b, a = data["before"], data["after"]
    return (f"compacted {data['path']}: data file {human_bytes(b['file_bytes'])} -> "
            f"{human_bytes(a['file_bytes'])} ({human_bytes(data['reclaimed_bytes'])} given back); "
            f"data {human_bytes(b['data_bytes'])} -> {human_bytes(a['data_bytes'])}, free for reuse "
            f"{human_bytes(b['free_bytes'])} -> {human_bytes(a['free_bytes'])}")


def top_header() -> str:
    return (f"{'time':<8}  {'req/s':>8}  {'hit':>6}  {'hit tok/s':>10}  {'miss tok/s':>10}  "
            f"{'stored/s':>9}  {'load B/s':>10}  {'store B/s':>10}  {'evict/s':>8}  {'drop/s':>7}  "
            f"{'disk':>9}  {'used':>6}")


def top_line(r: dict) -> str:
    """One interval of ``kvstore top``: totals over the tiers here, per tier in --json."""
    d = r["disk"]
    evict = sum(v for reasons in r["evictions_per_s"].values() for v in reasons.values())
    used = f"{100 * d['bytes'] / d['budget']:.1f}%" if d["budget"] else "-"
    return (f"{time.strftime('%H:%M:%S'):<8}  {r['requests_per_s']:>8.1f}  {100 * r['hit_rate']:>5.1f}%  "
            f"{sum(r['hit_tokens_per_s'].values()):>10.0f}  {r['miss_tokens_per_s']:>10.0f}  "
            f"{sum(r['stored_blocks_per_s'].values()):>9.1f}  "
            f"{human_bytes(sum(r['loaded_bytes_per_s'].values())):>10}  "
            f"{human_bytes(sum(r['stored_bytes_per_s'].values())):>10}  "
            f"{evict:>8.1f}  {r['dropped_writes_per_s']:>7.1f}  "
            f"{human_bytes(d['bytes']):>9}  {used:>6}")


TEXT: dict[str, Callable[[Any], str]] = {
    "stats": stats_text, "ls": ls_text, "inspect": inspect_text, "purge": purge_text,
    "verify": verify_text, "explain": explainlib.render, "compact": compact_text,
}
