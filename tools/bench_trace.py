"""``python -m tools.bench trace``: the shared conversation trace replayed against a full disk
tier through the store's public API, each figure beside its target and a limit measured in the
same run.

Replay (``/work/shared/traces/README.md``): requests in timestamp order; hash id ``h`` of pass
``p`` becomes the 512 pseudo tokens ``(p * H + h) * 512 + i`` (``H``: the largest id + 1, so a
pass is a fresh salt and shares no block with another), the last 512-token block of a prompt
holding ``input_length - 512 * (n - 1)`` of them. Each 64-token block's KV is a 64-byte bf16
tensor (32 values) whose bits encode its block id (``(p * H + h) * 8 + sub-block``), so every
``get`` is checked bit-exact. Per request, as an engine runs it: ``match`` the prompt, ``get``
the hit blocks into one preallocated tensor, ``put`` the missed full blocks, ``flush()``. Passes
repeat until past ``MIN_WRITES`` block writes (``--quick``: the first ``QUICK_REQUESTS`` requests,
once; ``--requests N``: the first N, once).

Capacity: the RAM tiers are off (``host_bytes=0``, ``device_bytes=0``), so the disk tier is what
is measured. Its budget holds ``C`` = 50% of one pass's unique 64-token blocks: every record of
a 64-byte block has the same length, so an entry costs the same against the budget; a probe store
holding one block says how much (``stats()``: the disk tier's bytes), the byte budget is ``C``
times that, and the tier holds exactly ``C`` blocks (its entry count is printed at the end).

Figures:
- match+get and write (put+flush) cost, ms per 1k prompt tokens (a window's summed cost over its
  summed prompt tokens), in the first and last 10% of requests: target end <= 1.5x start;
- small-block writes a second: blocks stored / summed put+flush time, target >= 20,000;
- hit rate (hit tokens / prompt tokens) beside an exact LRU of ``C`` blocks simulated in the same
  run over the same block sequence (every block of a prompt touched at once, parents newest,
  hits only as a leading run): ratio target >= 0.99;
- the raw limit: a raw LMDB environment with the store's flags (writemap, metasync off, and the
  small blocks' MADV_RANDOM) given the same number of records of the same length per request
  (random 16-byte keys, like the store's hashes), one transaction, commit, ``sync``; it only
  grows (no eviction, no metadata).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import lmdb
import numpy as np
import torch

from kvstore import KVStore, StoreConfig
from kvstore.codec import Codec

BLOCK = 64  # tokens a store block
HASH_BLOCK = 512  # tokens a trace hash id
SUB = HASH_BLOCK // BLOCK
KV_VALUES = 32  # bf16 values a block: 64 bytes
MIN_WRITES = 1_000_000
QUICK_REQUESTS = 300
WINDOW = 0.10  # first and last 10% of requests
TARGETS = {"cost_growth": 1.5, "writes_per_s": 20_000, "hit_rate_vs_lru": 0.99}
DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "conversation_trace.jsonl"
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Request:
    input_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: Path, limit: int | None = None) -> list[Request]:
    """The trace's requests in timestamp order (stable), the first ``limit`` of them.

    Raises:
        ValueError: the file is missing, or a line is not an object with an integer
            ``timestamp``, ``input_length`` and a list of integer ``hash_ids`` covering it.
    """
    if not path.is_file():
        raise ValueError(f"trace: {path} is not a file (expected a JSON-lines trace such as "
                         f"shared/traces/conversation_trace.jsonl; pass --trace PATH)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                ts, length, ids = r["timestamp"], r["input_length"], tuple(r["hash_ids"])
                ok = all(isinstance(v, int) and v >= 0 for v in (ts, length, *ids)) and \
                    len(ids) == -(-length // HASH_BLOCK)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise ValueError(f"trace: {path}:{n}: expected an object with integer timestamp and "
                                 f"input_length and ceil(input_length/512) integer hash_ids, got "
                                 f"{line.strip()[:120]!r}")
            rows.append((ts, n, Request(length, ids)))
    rows.sort(key=lambda r: r[:2])
    return [r for _, _, r in rows][:limit]


def tokens_of(req: Request, salt: int) -> np.ndarray:
    """The request's pseudo tokens: ``(salt + h) * 512 + i`` for each hash id ``h``."""
    ids = np.asarray(req.hash_ids, dtype=np.int64) + salt
    toks = (ids[:, None] * HASH_BLOCK + np.arange(HASH_BLOCK)).reshape(-1)[:req.input_length]
    return toks.astype(np.uint32)


def block_ids(req: Request, salt: int) -> np.ndarray:
    """One id per full 64-token block: ``(salt + h) * 8 + sub-block`` (equal ids, equal prefix)."""
    n = req.input_length // BLOCK
    j = np.arange(n)
    return (np.asarray(req.hash_ids, dtype=np.int64)[j // SUB] + salt) * SUB + j % SUB


def kv_of(ids: np.ndarray) -> torch.Tensor:
    """``(len(ids), 32)`` bf16 blocks whose bits spell each id (compare them as int16)."""
    ids = ids.astype(np.uint64)
    words = np.stack([ids & 0xFFFF, (ids >> 16) & 0xFFFF, (ids >> 32) & 0xFFFF,
                      np.full_like(ids, 0x3F80)], axis=1).astype(np.uint16)
    bits = np.tile(words, (1, KV_VALUES // 4)) ^ (np.arange(KV_VALUES, dtype=np.uint16) * 0x0101)
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


class ExactLRU:
    """The reference: an LRU of ``capacity`` blocks over block ids, prefix-only hits."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._order: OrderedDict[int, None] = OrderedDict()

    def request(self, ids: list[int]) -> int:
        """Hit blocks (the leading run held), then every block of the prompt is used at one
        instant: touched or inserted deepest first, so parents end up the most recent."""
        hit = 0
        while hit < len(ids) and ids[hit] in self._order:
            hit += 1
        order = self._order
        for i in reversed(ids):
            if i in order:
                order.move_to_end(i)
            else:
                order[i] = None
        while len(order) > self.capacity:
            order.popitem(last=False)
        return hit


def _windows(costs: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    """ms per 1k ``tokens`` over the first and the last ``WINDOW`` of requests (nan: none)."""
    w = max(1, int(len(costs) * WINDOW))
    per_1k = lambda s: float(costs[s].sum() / tokens[s].sum() * 1e6) if tokens[s].sum() else float("nan")  # noqa: E731
    return per_1k(slice(0, w)), per_1k(slice(len(costs) - w, None))


def raw_lmdb_writes(counts: list[int], record_len: int, d: Path) -> np.ndarray:
    """Seconds per request for ``counts[i]`` raw LMDB puts of ``record_len`` bytes, one
    transaction, commit (its data pages synced), then ``sync`` (its meta page): the store's flags,
    and its map advice for small blocks (``readahead=False``: LMDB advises MADV_RANDOM)."""
    d.mkdir()
    env = lmdb.open(str(d), map_size=max(64 * MiB, 4 * sum(counts) * (record_len + 64)),
                    writemap=True, metasync=False, sync=True, readahead=False)
    value = os.urandom(record_len)
    rng = np.random.default_rng(0)
    out = np.zeros(len(counts))
    try:
        for i, c in enumerate(counts):
            if not c:
                continue
            # Random 16-byte keys, as the store's hashes are: each lands on its own page.
            blob = rng.bytes(16 * c)
            keys = [blob[j:j + 16] for j in range(0, 16 * c, 16)]
            t = time.perf_counter()
            with env.begin(write=True) as txn:
                for k in keys:
                    txn.put(k, value)
            env.sync(True)
            out[i] = time.perf_counter() - t
    finally:
        env.close()
    return out


def replay(requests: list[Request], workdir: Path, min_writes: int, io_threads: int = 2) -> dict:
    """Replays ``requests`` (repeated with a fresh salt until past ``min_writes`` block writes)."""
    H = max(max(r.hash_ids) for r in requests) + 1
    unique = len({int(b) for r in requests for b in block_ids(r, 0)})
    capacity = unique // 2
    record_len = len(Codec("zstd-hi", 1, True, io_threads).encode(kv_of(np.arange(1))[0]))
    max_blocks = max(r.input_length // BLOCK for r in requests)

    def config(name: str, disk_bytes: int) -> StoreConfig:
        return StoreConfig(path=workdir / name, host_bytes=0, device_bytes=0, disk_bytes=disk_bytes,
                           io_threads=io_threads, block_shape=(KV_VALUES,), dtype="bfloat16",
                           write_queue_bytes=max(4 * max_blocks, 4096) * KV_VALUES * 2)

    with KVStore.open(config("probe", 64 * MiB)) as probe:  # what one entry costs the budget
        probe.put(np.arange(BLOCK), kv_of(np.arange(1)))
        probe.flush()
        entry_bytes = probe.stats()["tiers"]["disk"]["bytes"]
    cfg = config("store", capacity * entry_bytes)
    lru = ExactLRU(capacity)
    out = torch.zeros((max_blocks, KV_VALUES), dtype=torch.bfloat16)
    read_s, write_s, prompt, written, hit_blocks, lru_hits = [], [], [], [], [], 0
    passes = verified = 0
    t_run = time.perf_counter()
    with KVStore.open(cfg) as store:
        disk = store.tier("disk")
        while sum(written) < min_writes or not passes:
            salt = passes * H
            if (salt + H) * HASH_BLOCK > 1 << 32:
                raise ValueError(f"trace: {passes} passes of hash ids up to {H} exceed 32-bit tokens")
            for req in requests:
                toks, ids = tokens_of(req, salt), block_ids(req, salt)
                n = len(ids)
                kv = kv_of(ids)
                t0 = time.perf_counter()
                m = store.match(toks)
                got = store.get(m, out=out)
                t1 = time.perf_counter()
                k = len(got)
                if not torch.equal(out[:k].view(torch.int16), kv[:k].view(torch.int16)):
                    raise AssertionError(f"request {len(prompt)}: get served wrong KV")
                verified += k
                t2 = time.perf_counter()
                put = store.put(toks, kv[k:n], start_block=k) if k < n else 0
                store.flush()
                t3 = time.perf_counter()
                read_s.append(t1 - t0)
                write_s.append(t3 - t2)
                prompt.append(req.input_length)
                written.append(put)
                hit_blocks.append(k)
                lru_hits += lru.request(ids.tolist()) * BLOCK
                if len(prompt) % 1000 == 0:
                    print(f"  {len(prompt)} requests, {sum(written)} block writes", file=sys.stderr)
            passes += 1
        run_s = time.perf_counter() - t_run
        stats = store.stats()
        usage = disk.usage()
    raw_s = raw_lmdb_writes(written, record_len, workdir / "raw")
    read_s, write_s, prompt = np.array(read_s), np.array(write_s), np.array(prompt, dtype=np.float64)
    rg0, rg1 = _windows(read_s, prompt)
    w0, w1 = _windows(write_s, prompt)
    r0, r1 = _windows(raw_s, prompt)
    h0, h1 = _windows(read_s, np.array(hit_blocks, dtype=np.float64) * BLOCK)
    total_writes = sum(written)
    hit_rate, lru_rate = sum(hit_blocks) * BLOCK / prompt.sum(), lru_hits / prompt.sum()
    return {
        "machine": {"cores": os.cpu_count()}, "targets": TARGETS,
        "requests": len(prompt), "passes": passes, "prompt_tokens": int(prompt.sum()),
        "unique_blocks_per_pass": unique, "capacity_blocks": capacity, "record_bytes": record_len,
        "entry_bytes": entry_bytes,
        "disk_budget_bytes": cfg.disk_bytes, "disk_entries_at_end": usage.entries,
        "block_writes": total_writes, "blocks_verified": verified,
        "evictions": stats["evictions"], "dropped_writes": stats["dropped_writes"],
        "run_s": run_s,
        "match_get_ms_per_1k_start": rg0, "match_get_ms_per_1k_end": rg1, "match_get_growth": rg1 / rg0,
        "match_get_ms_per_1k_hit_start": h0, "match_get_ms_per_1k_hit_end": h1,
        "write_ms_per_1k_start": w0, "write_ms_per_1k_end": w1, "write_growth": w1 / w0,
        "raw_write_ms_per_1k_start": r0, "raw_write_ms_per_1k_end": r1,
        "writes_per_s": total_writes / write_s.sum(), "raw_writes_per_s": total_writes / raw_s.sum(),
        "hit_rate": hit_rate, "lru_hit_rate": lru_rate,
        "hit_rate_vs_lru": hit_rate / lru_rate if lru_rate else float("nan"),
    }


def run(args) -> dict:
    path = Path(args.trace) if args.trace else DEFAULT_TRACE
    if args.requests is not None and args.requests < 1:
        raise SystemExit(f"--requests: expected a number of requests >= 1, got {args.requests}")
    limit = args.requests or (QUICK_REQUESTS if args.quick else None)
    try:
        requests = load_trace(path, limit)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    base = Path(args.workdir or tempfile.mkdtemp(prefix="kvstore-bench-"))
    print(f"replaying {len(requests)} requests of {path.name}...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=base) as wd:
        r = replay(requests, Path(wd), 0 if limit else MIN_WRITES)
    r["trace"] = str(path)
    return r


def _line(what: str, fig: str, beside: str, ratio: float, target: float, higher: bool) -> str:
    met = ratio >= target if higher else ratio <= target
    return (f"  {what:30s} {fig:>24s}  {beside:>30s}  ratio {ratio:6.3f}  target "
            f"{'>=' if higher else '<='} {target:g}  {'met' if met else 'MISSED'}")


def show(r: dict) -> None:
    print(f"trace replay: {r['requests']} requests ({r['passes']} pass(es)), {r['prompt_tokens']:,} "
          f"prompt tokens, {r['block_writes']:,} block writes, {r['machine']['cores']} cores")
    print(f"  disk tier only: {r['capacity_blocks']:,} blocks = 50% of {r['unique_blocks_per_pass']:,} "
          f"unique a pass ({r['record_bytes']} B records, {r['entry_bytes']} B an entry, budget {r['disk_budget_bytes']:,} B; "
          f"{r['disk_entries_at_end']:,} held at the end); {r['blocks_verified']:,} blocks served, "
          f"each bit-exact; evictions {r['evictions']}; run {r['run_s']:.1f} s")
    ms = lambda a, b: f"{r[a]:.3f} -> {r[b]:.3f} ms/1k"  # noqa: E731
    print(_line("match+get, start -> end", ms("match_get_ms_per_1k_start", "match_get_ms_per_1k_end"),
                "", r["match_get_growth"], TARGETS["cost_growth"], False))
    print(f"  {'':30s} per 1k hit tokens {r['match_get_ms_per_1k_hit_start']:.3f} -> "
          f"{r['match_get_ms_per_1k_hit_end']:.3f} ms (later requests hit more: the cost per prompt "
          f"token grows with the hit rate)")
    print(_line("put+flush, start -> end", ms("write_ms_per_1k_start", "write_ms_per_1k_end"),
                "raw LMDB " + ms("raw_write_ms_per_1k_start", "raw_write_ms_per_1k_end"),
                r["write_growth"], TARGETS["cost_growth"], False))
    print(_line("small-block writes a second", f"{r['writes_per_s']:,.0f}/s",
                f"raw LMDB {r['raw_writes_per_s']:,.0f}/s", r["writes_per_s"] / TARGETS["writes_per_s"],
                1.0, True) + f" (of {TARGETS['writes_per_s']:,}/s; store/raw "
          f"{r['writes_per_s'] / r['raw_writes_per_s']:.3f})")
    print(_line("hit rate vs exact LRU", f"{r['hit_rate']:.4f}", f"exact LRU {r['lru_hit_rate']:.4f}",
                r["hit_rate_vs_lru"], TARGETS["hit_rate_vs_lru"], True))
