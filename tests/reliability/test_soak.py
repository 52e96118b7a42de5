"""Reliability: a long soak of prefix-cache traffic against one real store.

Run it with ``pytest -s -m slow tests/reliability/test_soak.py``. ``KVSTORE_SOAK_S`` sets the
duration in seconds (600 by default); ``KVSTORE_SOAK_REPORT`` names a file that receives the
summary as JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from kvstore import KVStore, StoreConfig
from kvstore.keys import make_namespace

SOAK_S = float(os.environ.get("KVSTORE_SOAK_S", "600"))
REPORT = os.environ.get("KVSTORE_SOAK_REPORT")
SEED = 20240607

BLOCK_TOKENS = 64
SHAPE = (2, 2, 4, BLOCK_TOKENS, 32)  # layers, k/v, kv heads, tokens, head_dim: 64 KiB of bf16
DTYPE = torch.bfloat16
BLOCK_BYTES = 2 * math.prod(SHAPE)
VOCAB = 32_000
TURN_LIMIT = 32  # blocks: a conversation that reaches this ends (it may be resumed once more)
OUT_BLOCKS = 64  # the preallocated output holds any prompt (a resumed one is < 50 blocks)
NAMESPACES = (
    make_namespace("soak-llama", "2x2x4x64x32", "bfloat16"),
    make_namespace("soak-qwen", "2x2x4x64x32", "bfloat16"),
    make_namespace("soak-llama", "2x2x4x64x32", "bfloat16", tenant_salt="tenant-x"),
)
TENANT = NAMESPACES[2]  # purged whole now and then, as when a tenant leaves

WINDOWS = 10  # latency windows: one minute each at the default duration
WARMUP_WINDOWS = 2  # the first 20% of the run
RSS_EVERY_S = 2.0
RSS_GROWTH = 1.10
LATENCY_RATIO, LATENCY_SLACK_S = 3.0, 0.5e-3


# -- blocks: a deterministic function of (namespace, prefix) ------------------------------------
def block_seeds(namespace: str, tokens: np.ndarray) -> list[int]:
    """One seed per full block, chained like the store's keys but with another hash
    (blake2b), so a fault in the store's hashing cannot hide behind the test's."""
    d = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
    seeds = []
    for i in range(len(tokens) // BLOCK_TOKENS):
        chunk = tokens[i * BLOCK_TOKENS:(i + 1) * BLOCK_TOKENS].astype("<u4").tobytes()
        d = hashlib.blake2b(d + chunk, digest_size=16).digest()
        seeds.append(int.from_bytes(d[:7], "little"))
    return seeds


_gen = torch.Generator()


def make_block(seed: int) -> torch.Tensor:
    """KV-like values (small normals) in bf16, as compressible as real KV."""
    _gen.manual_seed(seed)
    return (torch.randn(SHAPE, generator=_gen) * 0.5).to(DTYPE)


# -- latency: log-spaced histograms, allocated up front so recording never grows memory ---------
class LatencyWindows:
    """Per-window latency histograms of one operation (2% wide bins from 1 us to ~400 s)."""

    RATIO = 1.02
    BINS = 1000

    def __init__(self, windows: int):
        self.counts = np.zeros((windows, self.BINS), dtype=np.int64)
        self._log_ratio = math.log(self.RATIO)

    def record(self, window: int, seconds: float) -> None:
        b = int(math.log(max(seconds, 1e-6) / 1e-6) / self._log_ratio)
        self.counts[window, min(b, self.BINS - 1)] += 1

    def n(self, window: int) -> int:
        return int(self.counts[window].sum())

    def quantile(self, window: int, q: float) -> float | None:
        c = self.counts[window]
        total = int(c.sum())
        if not total:
            return None
        b = int(np.searchsorted(np.cumsum(c), q * total))
        return 1e-6 * self.RATIO ** (b + 0.5)


# -- traffic -----------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)  # identity: the token arrays do not compare
class Conversation:
    namespace: str
    tokens: np.ndarray  # uint32


class Traffic:
    """Prefix-cache traffic: a few system prompts per namespace, conversations that extend their
    earlier turns, one-off requests that share only a system prompt, and old conversations
    resumed later (their blocks have moved down to disk, or are gone)."""

    ACTIVE = 32
    ARCHIVE = 200

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.system = {ns: [self.tokens(self.rng.randint(4, 8) * BLOCK_TOKENS + self.rng.randint(0, 40))
                            for _ in range(3)] for ns in NAMESPACES}
        self.active: list[Conversation] = []
        self.archive: list[Conversation] = []

    def tokens(self, n: int) -> np.ndarray:
        return self.np_rng.integers(0, VOCAB, n, dtype=np.uint32)

    def pick_namespace(self) -> str:
        return self.rng.choices(NAMESPACES, weights=(6, 3, 1))[0]

    def retire(self, conv: Conversation) -> None:
        if len(self.archive) < self.ARCHIVE:
            self.archive.append(conv)
        else:
            self.archive[self.rng.randrange(self.ARCHIVE)] = conv

    def next_request(self) -> tuple[Conversation | None, str, np.ndarray]:
        """(conversation to extend or None for a one-off, namespace, prompt tokens)."""
        r = self.rng.random()
        question = self.tokens(self.rng.randint(20, 400))
        if r < 0.15:  # one-off: system prompt + question
            ns = self.pick_namespace()
            return None, ns, np.concatenate([self.rng.choice(self.system[ns]), question])
        if r < 0.30 or not self.active:  # a new conversation
            if len(self.active) >= self.ACTIVE:
                self.retire(self.active.pop(self.rng.randrange(len(self.active))))
            ns = self.pick_namespace()
            conv = Conversation(ns, self.rng.choice(self.system[ns]))
            self.active.append(conv)
        elif r < 0.38 and self.archive:  # an old conversation comes back
            conv = self.archive.pop(self.rng.randrange(len(self.archive)))
            if len(self.active) >= self.ACTIVE:
                self.retire(self.active.pop(self.rng.randrange(len(self.active))))
            self.active.append(conv)
        else:
            conv = self.rng.choice(self.active)
        return conv, conv.namespace, np.concatenate([conv.tokens, question])

    def answered(self, conv: Conversation | None, sequence: np.ndarray) -> None:
        if conv is None:
            return
        conv.tokens = sequence
        if len(sequence) // BLOCK_TOKENS >= TURN_LIMIT:
            self.active.remove(conv)
            self.retire(conv)


def rss() -> tuple[int, int]:
    """(RSS, its anonymous part): RSS also counts the pages of the LMDB map this process touched."""
    m = psutil.Process().memory_info()
    return m.rss, m.rss - m.shared


@pytest.mark.slow
def test_soak_mixed_prefix_cache_traffic(tmp_path):
    """KVSTORE_SOAK_S seconds (600 by default) of prefix-cache traffic against one store with
    small budgets (device slab 2 MiB on the CPU, host 4 MiB, disk 32 MiB: eviction runs all the time),
    64 KiB bf16 blocks, three namespaces, and now and then flush, expire, pin and purge (by
    idle time, by age within a namespace, and a whole namespace); a second thread scrapes
    ``stats()`` like a metrics exporter.

    Checked as it runs: every block ``get`` serves equals the block put for that prefix (a
    function of namespace and tokens), ``get`` never serves more than ``match`` found, a purged
    namespace matches nothing afterwards, every tier's bytes stay within its budget and the
    LMDB file within ``2 * disk_bytes + 64 MiB``, and no I/O error, corrupt record or prefetch
    error is counted.

    Memory: RSS is sampled every 2 s; warm-up is the first 20% of the run. The largest RSS
    sample after warm-up must be at most 1.10x the first sample taken at the end of warm-up.

    Latency: match, get and put are timed into 10 equal windows (one minute each at 600 s).
    For each, the lower of the medians of the last two windows must be at most 3x the higher
    of the medians of the first two windows after warm-up, plus 0.5 ms. Medians, and the
    better of two windows at each end, tolerate minutes of load from other processes on a
    shared 2-core machine (and the 5 ms GIL switch interval that background writer threads
    impose on the caller); a real degradation (a scan that grows with the store's history, a
    leak that slows lookups) persists and grows.
    """
    assert SOAK_S >= 10, "KVSTORE_SOAK_S: run the soak for at least 10 seconds"
    cfg = StoreConfig(
        path=tmp_path / "kv", block_tokens=BLOCK_TOKENS, device="cpu", device_bytes="2MiB",
        host_bytes="4MiB", disk_bytes="32MiB", write_queue_bytes="8MiB",
        # The traffic turns the disk tier over every 2-3 s, so TTLs are as short: expiry works
        # alongside eviction instead of never finding an idle block.
        device_ttl_s=1, host_ttl_s=2, disk_ttl_s=1.5, block_shape=SHAPE, dtype="bfloat16",
    )
    mdb_cap = 2 * cfg.disk_bytes + (64 << 20)
    window_s = SOAK_S / WINDOWS
    warmup_s = WARMUP_WINDOWS * window_s
    traffic = Traffic(SEED)
    ops = ("match", "prefetch", "get", "put")
    lat = {op: LatencyWindows(WINDOWS) for op in ops}
    maint: dict[str, list[float]] = {"flush": [], "expire": [], "purge": [], "pin": []}
    counts = dict.fromkeys(("requests", "one_offs", "served_blocks", "verified_blocks",
                            "put_blocks", "stored_blocks", "short_gets", "expired", "purged",
                            "pinned_blocks", "namespace_purges", "stats_scrapes"), 0)
    failures: list[str] = []
    out_buf = torch.empty((OUT_BLOCKS, *SHAPE), dtype=DTYPE)  # an engine's preallocated KV pages
    rss_samples: list[tuple[float, tuple[int, int]]] = []
    peak_usage = {"device": 0, "host": 0, "disk": 0, "mdb_file": 0}

    def check_budgets(st: dict) -> None:
        for name, t in st["tiers"].items():
            peak_usage[name] = max(peak_usage[name], t["bytes"])
            if t["bytes"] > t["budget"]:
                failures.append(f"{name} tier over budget: {t['bytes']} > {t['budget']} bytes")
        mdb = tmp_path / "kv" / "disk" / "data.mdb"
        size = mdb.stat().st_size if mdb.exists() else 0
        peak_usage["mdb_file"] = max(peak_usage["mdb_file"], size)
        if size > mdb_cap:
            failures.append(f"LMDB file {size} bytes > cap {mdb_cap}")

    with KVStore.open(cfg) as store:
        stop = threading.Event()

        def scrape() -> None:  # the exporter's view: stats() from another thread
            while not stop.wait(0.5):
                try:
                    check_budgets(store.stats())
                    counts["stats_scrapes"] += 1
                except Exception as e:  # reported as a failure below
                    failures.append(f"stats() raised {type(e).__name__}: {e}")

        scraper = threading.Thread(target=scrape, name="soak-scraper", daemon=True)
        scraper.start()
        t0 = time.monotonic()
        next_rss = t0
        next_due = {"flush": t0 + 7, "expire": t0 + 11, "purge": t0 + 13, "pin": t0 + 17}
        purge_kind = 0
        load1: list[float] = []
        try:
            while (now := time.monotonic()) - t0 < SOAK_S and not failures:
                w = min(int((now - t0) / window_s), WINDOWS - 1)
                if w >= len(load1):  # the machine's load as each window starts (others share it)
                    load1.append(round(os.getloadavg()[0], 2))
                if now >= next_rss:
                    rss_samples.append((now - t0, rss()))
                    next_rss += RSS_EVERY_S

                # -- one request: look up, load the hit, compute and store the rest ------------
                conv, ns, prompt = traffic.next_request()
                counts["requests"] += 1
                counts["one_offs"] += conv is None
                t = time.perf_counter()
                m = store.match(prompt, ns)
                lat["match"].record(w, time.perf_counter() - t)
                got: list[torch.Tensor] = []
                if m.num_blocks:
                    if traffic.rng.random() < 0.3:  # overlap the load with "scheduling"
                        t = time.perf_counter()
                        if not store.prefetch(m).wait(60):
                            failures.append("prefetch did not finish in 60 s")
                        lat["prefetch"].record(w, time.perf_counter() - t)
                    use_out = traffic.rng.random() < 0.5 and m.num_blocks <= OUT_BLOCKS
                    out = out_buf if use_out else None
                    t = time.perf_counter()
                    got = store.get(m, out=out)
                    lat["get"].record(w, time.perf_counter() - t)
                    if len(got) > m.num_blocks:
                        failures.append(f"get served {len(got)} blocks for a match of {m.num_blocks}")
                    counts["short_gets"] += len(got) < m.num_blocks
                answer = traffic.tokens(traffic.rng.randint(20, 300))
                sequence = np.concatenate([prompt, answer])
                seeds = block_seeds(ns, sequence)
                for i, b in enumerate(got):
                    counts["served_blocks"] += 1
                    if not torch.equal(b, make_block(seeds[i])):
                        failures.append(f"wrong block served: namespace {ns!r}, block {i} of a "
                                        f"{len(prompt)}-token prompt (request {counts['requests']})")
                        break
                    counts["verified_blocks"] += 1
                new = [make_block(s) for s in seeds[len(got):]]
                t = time.perf_counter()
                counts["stored_blocks"] += store.put(sequence, new, ns, start_block=len(got))
                lat["put"].record(w, time.perf_counter() - t)
                counts["put_blocks"] += len(new)
                traffic.answered(conv, sequence)

                # -- maintenance, as an operator or the engine's housekeeping would run it ----
                now = time.monotonic()
                if now >= next_due["flush"]:
                    t = time.perf_counter()
                    store.flush()
                    maint["flush"].append(time.perf_counter() - t)
                    next_due["flush"] = now + 7
                if now >= next_due["expire"]:
                    t = time.perf_counter()
                    counts["expired"] += store.expire()
                    maint["expire"].append(time.perf_counter() - t)
                    next_due["expire"] = now + 11
                if now >= next_due["pin"]:  # keep one system prompt warm for a while
                    pns = traffic.pick_namespace()
                    t = time.perf_counter()
                    counts["pinned_blocks"] += store.pin(traffic.rng.choice(traffic.system[pns]), 10, pns)
                    maint["pin"].append(time.perf_counter() - t)
                    next_due["pin"] = now + 17
                if now >= next_due["purge"]:
                    purge_kind += 1
                    t = time.perf_counter()
                    if purge_kind % 3 == 1:
                        counts["purged"] += store.purge(idle_longer_than_s=2)
                    elif purge_kind % 3 == 2:
                        counts["purged"] += store.purge(older_than_s=3, namespace=traffic.pick_namespace())
                    else:
                        counts["purged"] += store.purge(namespace=TENANT)
                        counts["namespace_purges"] += 1
                    maint["purge"].append(time.perf_counter() - t)
                    if purge_kind % 3 == 0:
                        left = [store.match(p, TENANT, touch=False).num_blocks for p in traffic.system[TENANT]]
                        if any(left):
                            failures.append(f"purge(namespace=tenant) left matches: {left} blocks")
                    next_due["purge"] = now + 13
            elapsed = time.monotonic() - t0
            rss_samples.append((elapsed, rss()))
        finally:
            stop.set()
            scraper.join(10)
        store.flush()
        st = store.stats()
        check_budgets(st)
        prefetch_errors = store.metrics.total("prefetch_errors")
        load_failed = store.metrics.total("load_failed_blocks")

    # -- summary ---------------------------------------------------------------------------------
    def ms(x: float | None) -> float | None:
        return None if x is None else round(1e3 * x, 3)

    warm, warm_anon = next(r for t, r in rss_samples if t >= warmup_s)
    after = [r[0] for t, r in rss_samples if t >= warmup_s]
    after_anon = [r[1] for t, r in rss_samples if t >= warmup_s]
    mib = 1 << 20
    windows = {op: [{"window": i, "n": h.n(i), "p50_ms": ms(h.quantile(i, 0.5)),
                     "p99_ms": ms(h.quantile(i, 0.99))} for i in range(WINDOWS)]
               for op, h in lat.items()}
    report = {
        "duration_s": round(elapsed, 1), "window_s": window_s, "warmup_s": warmup_s, "seed": SEED,
        "config": {"block_shape": list(SHAPE), "dtype": "bfloat16", "block_bytes": BLOCK_BYTES,
                   "device_bytes": cfg.device_bytes, "host_bytes": cfg.host_bytes,
                   "disk_bytes": cfg.disk_bytes, "write_queue_bytes": cfg.write_queue_bytes},
        "rss_mib": {"start": round(rss_samples[0][1][0] / mib, 1), "warmup_end": round(warm / mib, 1),
                    "end": round(rss_samples[-1][1][0] / mib, 1), "max_after_warmup": round(max(after) / mib, 1),
                    "growth_pct": round(100 * (max(after) / warm - 1), 2)},
        "anon_rss_mib": {"start": round(rss_samples[0][1][1] / mib, 1), "warmup_end": round(warm_anon / mib, 1),
                         "end": round(rss_samples[-1][1][1] / mib, 1),
                         "max_after_warmup": round(max(after_anon) / mib, 1),
                         "growth_pct": round(100 * (max(after_anon) / warm_anon - 1), 2)},
        "counts": {**counts, "prefetch_errors": prefetch_errors, "load_failed_blocks": load_failed},
        "hit_rate": round(st["hit_rate"], 4), "hit_tokens": st["hit_tokens"],
        "evictions": st["evictions"], "dropped_writes": st["dropped_writes"],
        "corrupt_records": st["corrupt_records"], "io_errors": st["io_errors"],
        "peak_bytes": peak_usage, "tiers_at_end": st["tiers"],
        "maintenance_ms": {k: {"n": len(v), "max": ms(max(v)) if v else None,
                               "p50": ms(float(np.median(v))) if v else None} for k, v in maint.items()},
        "latency": windows,
        "load1_per_window": load1,
        "failures": failures[:20],
    }
    lines = [f"soak: {report['duration_s']} s, {counts['requests']} requests "
             f"({counts['one_offs']} one-off), hit rate {report['hit_rate']:.1%}, "
             f"{counts['verified_blocks']} blocks served and verified, {counts['put_blocks']} put "
             f"({counts['stored_blocks']} stored)",
             "RSS MiB: start {start}, warm-up end {warmup_end}, end {end}, max after warm-up "
             "{max_after_warmup} ({growth_pct:+.2f}%)".format(**report["rss_mib"]),
             "anonymous RSS MiB: start {start}, warm-up end {warmup_end}, end {end}, max after "
             "warm-up {max_after_warmup} ({growth_pct:+.2f}%)".format(**report["anon_rss_mib"]),
             f"evictions {st['evictions']}, dropped writes {st['dropped_writes']}, expired "
             f"{counts['expired']}, purged {counts['purged']}, pinned {counts['pinned_blocks']}, "
             f"short gets {counts['short_gets']}",
             f"peak bytes {peak_usage}",
             f"load average as each window started: {load1}",
             "latency ms per window (n p50 p99):"]
    for op in ops:
        lines.append(f"  {op:8s} " + " | ".join(
            f"{x['n']} {x['p50_ms']} {x['p99_ms']}" for x in windows[op]))
    print("\n" + "\n".join(lines))
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(report, f, indent=2)

    # -- verdict ---------------------------------------------------------------------------------
    assert not failures, failures[:5]
    assert st["io_errors"] == 0 and st["corrupt_records"] == 0 and prefetch_errors == 0
    # The traffic did what a soak needs: hits from every tier, eviction everywhere, purges.
    assert all(st["hit_tokens"].get(t, 0) > 0 for t in ("device", "host", "disk")), st["hit_tokens"]
    assert all(any(f"tier={t}" in k for k in st["evictions"]) for t in ("device", "host", "disk")), \
        st["evictions"]
    assert counts["purged"] > 0 and counts["verified_blocks"] > 0
    assert max(after) <= RSS_GROWTH * warm, report["rss_mib"]
    for op in ("match", "get", "put"):
        base = max(lat[op].quantile(i, 0.5) for i in (WARMUP_WINDOWS, WARMUP_WINDOWS + 1))
        late = min(lat[op].quantile(i, 0.5) for i in (WINDOWS - 2, WINDOWS - 1))
        assert late <= LATENCY_RATIO * base + LATENCY_SLACK_S, (
            f"{op}: median {late * 1e3:.3f} ms late in the run vs {base * 1e3:.3f} ms after warm-up")
