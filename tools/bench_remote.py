"""``python -m tools.bench remote``: the remote tier against a local valkey-server started here.

The limit is measured in the same run with the same client library (redis-py + hiredis, same
socket settings, ``SOCKET_READ_SIZE`` reads): pipelined SETs and GETs of the same blocks'
uncompressed bytes, in rounds that alternate each figure with its limit (store, load and limits
are the rounds' medians, each ratio the median of the rounds' ratios). Figures:

- store: ``put(copy=False)`` + ``flush`` of a prompt's blocks into a store whose only tier is
  the remote one (the blocks handed over as the transformers adapter hands over its own; encode,
  pipelined SET), as a ratio to the raw SET; target >= 0.9. Beside it the same with put's
  default copy (a memcpy of every block on the caller's thread before any write starts).
- load: ``match`` + ``get`` of them from another store into a preallocated tensor (the engine's
  KV cache; pipelined GETs read straight into it and verified, on the io threads), as a ratio
  to the raw GET; target >= 1.0.
- the same store and load with ``remote_compression="zstd-hi"``, beside the default ("none"),
  and the bytes the server holds for each.
- match round trips: pipelines a ``match`` sends to the server; target 1.
- breaker open: a ``match`` with the server dead, minus one with no remote tier; target <= 1 ms.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvstore import KVStore, StoreConfig
from kvstore.codec import byte_view
from kvstore.tiers.remote import SOCKET_READ_SIZE

from .valkey_server import ValkeyServer

TARGETS = {"store_ratio": 0.9, "load_ratio": 1.0, "match_round_trips": 1, "breaker_added_ms": 1.0}


def _store(path: Path, url: str, bt: int, blocks: list[torch.Tensor], **kw) -> KVStore:
    cfg = StoreConfig(path=path, block_tokens=bt, host_bytes=0, disk_bytes=0, remote_url=url,
                      remote_timeout_s=2.0, block_shape=tuple(blocks[0].shape),
                      dtype=str(blocks[0].dtype).removeprefix("torch."),
                      write_queue_bytes=(len(blocks) + 1) * blocks[0].nbytes, **kw)
    return KVStore.open(cfg)


def run(blocks: list[torch.Tensor], block_tokens: int, requests: int = 200, rounds: int = 5) -> dict:
    n = len(blocks)
    total = sum(b.nbytes for b in blocks)
    tokens = list(range(n * block_tokens))
    raws = [byte_view(b.contiguous()).tobytes() for b in blocks]
    with ValkeyServer() as server, tempfile.TemporaryDirectory(prefix="kvstore-bench-remote-") as wd:
        wd = Path(wd)
        client = redis.Redis(port=server.port, socket_timeout=2.0, retry=Retry(NoBackoff(), 0),
                             socket_read_size=SOCKET_READ_SIZE)

        def raw_set():
            p = client.pipeline(transaction=False)
            for i, r in enumerate(raws):
                p.set(f"raw:{i}", r)
            p.execute()

        def raw_get():
            p = client.pipeline(transaction=False)
            for i in range(n):
                p.get(f"raw:{i}")
            p.execute()

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        runs = iter(range(1000))

        def put_into(s: KVStore, copy: bool = False) -> float:
            """Seconds of one put + flush of every block into ``s`` (the server lacks them);
            the blocks handed over, as the transformers adapter hands over its own, unless
            ``copy``."""
            t = time.perf_counter()
            assert s.put(tokens, blocks, copy=copy) == n
            assert s.flush()
            return time.perf_counter() - t

        def put(**kw):
            with _store(wd / f"w{next(runs)}", server.url, block_tokens, blocks, **kw) as s:
                return put_into(s)

        # The engine's KV cache: preallocated and touched, as in the datapath benchmark.
        dest = torch.zeros((n, *blocks[0].shape), dtype=blocks[0].dtype)

        def load_from(s: KVStore) -> tuple[float, int]:
            """Seconds of one match + get from ``s``, and the match's round trips."""
            rt = s.metrics.snapshot()["histograms"].get("remote_round_trip_seconds", {})
            before = sum(h["count"] for k, h in rt.items() if dict(k)["op"] == "contains")
            t = time.perf_counter()
            m = s.match(tokens, touch=False)
            got = s.get(m, out=dest)
            dt = time.perf_counter() - t
            assert len(got) == n, (len(got), n)
            rt = s.metrics.snapshot()["histograms"]["remote_round_trip_seconds"]
            return dt, sum(h["count"] for k, h in rt.items() if dict(k)["op"] == "contains") - before

        def load(**kw):
            with _store(wd / f"r{next(runs)}", server.url, block_tokens, blocks, **kw) as s:
                return load_from(s)

        # Each machine's store is open for the whole run, as an engine's is, so its connections
        # are as warm as the raw client's (no local tiers: every put goes to the server, every
        # load comes from it). A store just opened is measured apart: its new connections
        # loaded 20% slower here.
        writer = _store(wd / "writer", server.url, block_tokens, blocks)
        reader = _store(wd / "reader", server.url, block_tokens, blocks)

        # Rounds that alternate each figure with its limit, medians of each: this machine's
        # loopback speed drifts 2x within minutes, so a limit measured once is not the limit
        # the store met.
        rows = []
        for _ in range(rounds):
            # Each write into a server just emptied (its freed memory reused alike; a held
            # block is not sent again); both reads from a server that holds both copies.
            client.flushall()
            set_s = timed(raw_set)
            client.flushall()
            store_s = put_into(writer)
            client.flushall()
            copied_s = put_into(writer, copy=True)
            raw_set()
            get_s = timed(raw_get)
            load_s, trips = load_from(reader)
            first_s = load()[0]
            rows.append((set_s, store_s, get_s, load_s, first_s, copied_s))
        stored = sum(int(server.command("MEMORY", "USAGE", k) or 0)
                     for k in server.command("KEYS", "kvstore:*"))
        # The other codec a machine may choose, for the trade-off (bytes on the server vs time).
        zs = statistics.median(put(remote_compression="zstd-hi") for _ in range(3)
                               if not client.flushall() or True)
        zl = statistics.median(load(remote_compression="zstd-hi")[0] for _ in range(3))
        zstored = sum(int(server.command("MEMORY", "USAGE", k) or 0)
                      for k in server.command("KEYS", "kvstore:*"))
        writer.close()
        reader.close()
        set_s, store_s, get_s, load_s, first_s, copied_s = (statistics.median(c) for c in zip(*rows))

        # Breaker open: a match with the server dead vs with no remote tier at all.
        def per_match(store) -> float:
            store.match(tokens)
            t = time.perf_counter()
            for _ in range(requests):
                store.match(tokens)
            return (time.perf_counter() - t) / requests
        local = KVStore.open(StoreConfig(path=wd / "local", block_tokens=block_tokens, disk_bytes=0))
        base_s = per_match(local)
        local.close()
        dead = _store(wd / "dead", server.url, block_tokens, blocks)
        server.kill()
        dead.match(tokens)  # the failure that opens the breaker
        dead_s = per_match(dead)
        dead.close()
    r = {
        "blocks": n, "block_bytes": blocks[0].nbytes, "stored_bytes_on_server": stored,
        "raw_set_GBps": total / set_s / 1e9, "raw_get_GBps": total / get_s / 1e9,
        "store_GBps": total / store_s / 1e9, "load_GBps": total / load_s / 1e9,
        "first_load_GBps": total / first_s / 1e9, "store_copied_GBps": total / copied_s / 1e9,
        "match_round_trips": trips,
        "zstd_hi": {"store_GBps": total / zs / 1e9, "load_GBps": total / zl / 1e9,
                    "stored_bytes_on_server": zstored},
        "match_ms_no_remote": base_s * 1e3, "match_ms_breaker_open": dead_s * 1e3,
    }
    # Each round's GB/s: store and its limit, load and its limit (the ratios are of a round's own).
    r["rounds"] = [{"raw_set_GBps": total / a / 1e9, "store_GBps": total / b / 1e9,
                    "raw_get_GBps": total / c / 1e9, "load_GBps": total / d / 1e9,
                    "first_load_GBps": total / e / 1e9, "store_copied_GBps": total / f / 1e9}
                   for a, b, c, d, e, f in rows]
    r["store_ratio"] = statistics.median(x["store_GBps"] / x["raw_set_GBps"] for x in r["rounds"])
    r["store_copied_ratio"] = statistics.median(x["store_copied_GBps"] / x["raw_set_GBps"]
                                                for x in r["rounds"])
    r["load_ratio"] = statistics.median(x["load_GBps"] / x["raw_get_GBps"] for x in r["rounds"])
    r["breaker_added_ms"] = r["match_ms_breaker_open"] - r["match_ms_no_remote"]
    r["targets"] = TARGETS
    return r


def show(r: dict) -> None:
    t = r["targets"]
    print(f"remote tier, {r['blocks']} blocks of {r['block_bytes'] / 2**20:.2f} MiB "
          f"(server holds {r['stored_bytes_on_server'] / 2**20:.1f} MiB), medians of "
          f"{len(r['rounds'])} rounds")
    print(f"  store {r['store_GBps']:.3f} GB/s vs raw pipelined SET {r['raw_set_GBps']:.3f} GB/s: "
          f"ratio {r['store_ratio']:.2f} (target >= {t['store_ratio']})")
    print(f"        {r['store_copied_GBps']:.3f} GB/s with put's default copy (the caller keeps its "
          f"buffers): ratio {r['store_copied_ratio']:.2f}")
    print(f"  load  {r['load_GBps']:.3f} GB/s vs raw pipelined GET {r['raw_get_GBps']:.3f} GB/s: "
          f"ratio {r['load_ratio']:.2f} (target >= {t['load_ratio']})")
    print(f"  first load of a store just opened (its connections new) {r['first_load_GBps']:.3f} GB/s")
    z = r["zstd_hi"]
    print(f"  with remote_compression=zstd-hi: store {z['store_GBps']:.3f} GB/s, load "
          f"{z['load_GBps']:.3f} GB/s, server holds {z['stored_bytes_on_server'] / 2**20:.1f} MiB")
    print(f"  match round trips {r['match_round_trips']} (target {t['match_round_trips']})")
    print(f"  match with the server dead (breaker open) {r['match_ms_breaker_open']:.3f} ms vs "
          f"no remote tier {r['match_ms_no_remote']:.3f} ms: added {r['breaker_added_ms']:.3f} ms "
          f"(target <= {t['breaker_added_ms']})")
