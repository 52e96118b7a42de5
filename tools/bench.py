"""Benchmarks: ``python -m tools.bench {tiers,datapath,trace,pipeline,ttft,vllm,remote} [--json] [--quick]``.

Every figure is printed beside the machine's own limit measured in the same run (numpy copies
into touched memory, raw LMDB puts/gets of the same bytes), as a ratio, so results carry over
between machines. Nothing here is a test: targets are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np
import torch

from kvstore import KVStore, StoreConfig, keys
from kvstore.codec import Codec, aligned_empty, byte_view
from kvstore.eviction import EntryMeta
from kvstore.metrics import Metrics
from kvstore.tiers.base import BlockEntry
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.slab import SlabTier

from . import bench_datapath, bench_remote, bench_trace, bench_vllm  # imports vLLM only inside run(): vLLM reads its env at import
from .timing import best

MiB = 1 << 20


def drop_page_cache(path: Path) -> str:
    """Evicts ``path``'s files from the page cache; returns how ('drop_caches' or 'fadvise')."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        for f in path.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


# -- real KV ----------------------------------------------------------------------------------
def real_kv(dtype: torch.dtype, num_blocks: int, block_tokens: int = 64) -> list[torch.Tensor]:
    """KV blocks of SmolLM2-135M-Instruct computed on a real document, in ``dtype``."""
    from engine_adapter import generation, kv_blocks, model_files
    from engine_adapter.scenarios import DOCUMENT

    model, tok = model_files.load_model(dtype=torch.float32)
    layout = kv_blocks.KVLayout.of(model)
    ids = tok(DOCUMENT * 4)["input_ids"][: num_blocks * block_tokens]
    res = generation.greedy_generate(model, ids + [ids[-1]], max_new_tokens=1)
    blocks = kv_blocks.blocks_from_cache(res.cache, layout, 0, len(ids) // block_tokens, block_tokens)
    return [b.to(dtype) for b in blocks]  # the model's KV rounded as an engine in dtype holds it


def big_blocks(blocks: list[torch.Tensor], nbytes: int, count: int) -> list[torch.Tensor]:
    """``count`` blocks of ``nbytes`` each, filled with the real KV values (tiled)."""
    flat = torch.cat([b.reshape(-1) for b in blocks])
    n = nbytes // flat.element_size()
    reps = -(-n * count // flat.numel())
    data = flat.repeat(reps)
    # Offset each block so no two are byte-identical (zstd would otherwise see repeats).
    return [data[i * (n // 7) % (data.numel() - n):][:n].clone().reshape(32, 2, 8, -1, 128)
            for i in range(count)]


# -- measurements -----------------------------------------------------------------------------
def bench_host(blocks: list[torch.Tensor]) -> dict:
    n, nbytes = len(blocks), blocks[0].numel() * blocks[0].element_size()
    tier = SlabTier("host", n * nbytes, 3600.0)
    tier.configure(tuple(blocks[0].shape), blocks[0].dtype)
    metas = [EntryMeta(1, i, b"", 0.0, 0.0, nbytes) for i in range(n)]
    keys_ = [i.to_bytes(16, "little") for i in range(n)]
    entries = [BlockEntry(k, b, m) for k, b, m in zip(keys_, blocks, metas)]

    outs = [torch.empty_like(b) for b in blocks]
    for o in outs:
        o.zero_()
    put_s = best(lambda: tier.put_many(entries, 1.0), setup=lambda: tier.delete_many(keys_))
    get_s = best(lambda: tier.get_many(keys_, outs))
    assert all(torch.equal(o, b) for o, b in zip(outs, blocks))
    dst = aligned_empty(n * nbytes)
    dst[:] = 0
    srcs = [byte_view(b) for b in blocks]

    def copyto():
        for i, s in enumerate(srcs):
            np.copyto(dst[i * nbytes:(i + 1) * nbytes], s)

    ref_s = best(copyto)
    total = n * nbytes
    return {"put_GBps": total / put_s / 1e9, "get_GBps": total / get_s / 1e9,
            "copyto_GBps": total / ref_s / 1e9, "put_ratio": ref_s / put_s, "get_ratio": ref_s / get_s}


def bench_disk(blocks: list[torch.Tensor], workdir: Path, level: int = 1) -> dict:
    n, nbytes = len(blocks), blocks[0].numel() * blocks[0].element_size()
    total = n * nbytes
    codec = Codec("zstd-hi", level, True)  # what a new store writes
    keys_ = [i.to_bytes(16, "little") for i in range(n)]
    # kvstore disk tier: encode + durable LMDB commit, 64 blocks a transaction
    tdir = workdir / "tier"
    tdir.mkdir()
    tier = DiskTier(tdir, 4 * total + 64 * MiB, 86400.0, codec, Metrics())
    t = time.perf_counter()
    for i in range(0, n, 64):
        entries = [BlockEntry(keys_[j], blocks[j], EntryMeta(1, j, b"", 1.0, 1.0, nbytes))
                   for j in range(i, min(n, i + 64))]
        assert all(tier.put_many(entries, 1.0))
    put_s = time.perf_counter() - t
    stored = tier.usage().bytes
    tier.close()
    how = drop_page_cache(tdir)
    tier = DiskTier(tdir, 4 * total + 64 * MiB, 86400.0, codec, Metrics())
    outs = [torch.empty_like(b).zero_() for b in blocks]
    t = time.perf_counter()
    ok = tier.get_many(keys_, outs)
    get_s = time.perf_counter() - t
    assert all(ok) and all(torch.equal(o, b) for o, b in zip(outs, blocks))
    tier.close()

    # raw LMDB: the same bytes, uncompressed, same flags, 64 puts a transaction
    rdir = workdir / "raw"
    rdir.mkdir()
    env = lmdb.open(str(rdir), map_size=4 * total + 64 * MiB, writemap=True, metasync=True, sync=True)
    raws = [byte_view(b) for b in blocks]
    t = time.perf_counter()
    for i in range(0, n, 64):
        with env.begin(write=True) as txn:
            for j in range(i, min(n, i + 64)):
                txn.put(keys_[j], raws[j])
    raw_put_s = time.perf_counter() - t
    env.close()
    drop_page_cache(rdir)
    env = lmdb.open(str(rdir), map_size=4 * total + 64 * MiB, writemap=True, readonly=False)
    dst = aligned_empty(nbytes)
    t = time.perf_counter()
    with env.begin(buffers=True) as txn:
        for k in keys_:
            np.copyto(dst, np.frombuffer(txn.get(k), dtype=np.uint8))
    raw_get_s = time.perf_counter() - t
    env.close()
    return {
        "store_GBps": total / put_s / 1e9, "raw_lmdb_put_GBps": total / raw_put_s / 1e9,
        "store_ratio": raw_put_s / put_s,
        "cold_load_GBps": total / get_s / 1e9, "raw_lmdb_cold_get_GBps": total / raw_get_s / 1e9,
        "cold_load_ratio": raw_get_s / get_s, "stored_MiB": stored / MiB, "cache_drop": how,
    }


def bench_codec(blocks: list[torch.Tensor]) -> dict:
    codec = Codec("zstd", 1, True)
    total = sum(b.numel() * b.element_size() for b in blocks)
    recs = [codec.encode(b) for b in blocks]
    enc_s = best(lambda: [codec.encode(b) for b in blocks], 3)
    outs = [torch.empty_like(b) for b in blocks]
    dec_s = best(lambda: [codec.decode(r, o) for r, o in zip(recs, outs)], 3)
    plain = sum(len(Codec("zstd", 1, False).encode(b)) for b in blocks)
    return {"ratio": total / sum(map(len, recs)), "ratio_without_split": total / plain,
            "compress_MBps": total / enc_s / 1e6, "decompress_MBps": total / dec_s / 1e6}


def bench_match(workdir: Path, prompt_tokens: int = 131072, block_tokens: int = 64) -> dict:
    """Median ``match`` time of a prompt whose every block is on disk (host tier off).

    Block contents do not enter ``match`` (it reads keys and metadata only), so small blocks
    stand in for full-size ones here.
    """
    cfg = StoreConfig(path=workdir / "match", host_bytes=0, disk_bytes="1GiB", block_tokens=block_tokens)
    toks = np.random.default_rng(0).integers(0, 50_000, prompt_tokens).tolist()
    blk = torch.zeros((1, 2, 1, block_tokens, 4), dtype=torch.bfloat16)
    n = prompt_tokens // block_tokens
    with KVStore.open(cfg) as s:
        for i in range(0, n, 256):  # one put per 256 blocks, each extending the chain
            s.put(toks[:(i + 256) * block_tokens], [blk] * min(256, n - i), start_block=i)
        s.flush()
        assert s.match(toks).num_blocks == n
        times = []
        for _ in range(30):
            t = time.perf_counter()
            m = s.match(toks)
            times.append(time.perf_counter() - t)
        assert m.blocks_by_tier == {"disk": n}
        hash_s = min(best(lambda: keys.block_keys("ns", toks, block_tokens), 10) for _ in range(1))
    return {"blocks": n, "match_ms_median": statistics.median(times) * 1e3,
            "match_ms_best": min(times) * 1e3, "hash_ms": hash_s * 1e3}


def bench_ttft(workdir: Path, lengths: tuple[int, ...], repeat: int) -> dict:
    """Time to first token with all but the last block cached, against recompute, same run."""
    from engine_adapter import model_files
    from engine_adapter.hf import CachedLM
    from engine_adapter.scenarios import DOCUMENT

    model, tok = model_files.load_default_model()
    ids_all = tok(DOCUMENT * 2)["input_ids"]
    out = {}
    for n in lengths:
        ids = ids_all[:n]
        cfg = StoreConfig(path=workdir / f"ttft{n}", host_bytes="1GiB", disk_bytes="4GiB")
        with KVStore.open(cfg) as store:
            lm = CachedLM(model, tok, store)
            lm.generate(ids, max_new_tokens=1)  # warms the store
            host = min(lm.generate(ids, max_new_tokens=1).ttft_s for _ in range(repeat))
            hit = lm.generate(ids, max_new_tokens=1).usage["prompt_cache_hit_tokens"]
        with KVStore.open(StoreConfig(path=workdir / f"ttft{n}", host_bytes=0, disk_bytes="4GiB")) as store:
            disk = min(CachedLM(model, tok, store).generate(ids, max_new_tokens=1).ttft_s for _ in range(repeat))
        plain = min(CachedLM(model, tok, None).generate(ids, max_new_tokens=1).ttft_s for _ in range(repeat))
        one_pass = min(CachedLM(model, tok, None, prefill_chunk=None).generate(ids, max_new_tokens=1).ttft_s
                       for _ in range(repeat))
        out[n] = {"hit_tokens": hit, "cached_host_s": host, "cached_disk_s": disk, "recompute_s": plain,
                  "recompute_one_pass_s": one_pass, "ratio_host": host / plain, "ratio_disk": disk / plain,
                  "ratio_vs_one_pass": disk / one_pass}
    return out


def raw_read_GBps(path: Path) -> float:
    """Cold sequential read speed of ``path`` (page cache dropped first), 8 MiB reads."""
    drop_page_cache(path.parent)
    buf = bytearray(8 * MiB)
    n = 0
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n / (time.perf_counter() - t) / 1e9


def bench_pipeline(blocks: list[torch.Tensor], workdir: Path) -> dict:
    """put caller time vs a synchronous store; cold loads with and without prefetch."""
    nbytes = blocks[0].numel() * blocks[0].element_size()
    total = len(blocks) * nbytes
    toks = list(range(len(blocks) * 64))

    def fresh(name: str, **kw) -> KVStore:
        return KVStore.open(StoreConfig(path=workdir / name, disk_bytes=4 * total + 64 * MiB,
                                        host_bytes=kw.pop("host_bytes", 2 * total), **kw))

    # Synchronous: put, then wait for compression and the durable commit.
    with fresh("sync") as s:
        s.put(toks[:64], blocks[:1])  # fixes the layout and starts the threads
        s.flush()
        t = time.perf_counter()
        s.put(toks, blocks)
        s.flush()
        sync_s = time.perf_counter() - t
    # Write-behind: what the engine waits for.
    with fresh("async") as s:
        s.put(toks[:64], blocks[:1])
        s.flush()
        t = time.perf_counter()
        s.put(toks, blocks)
        put_s = time.perf_counter() - t
        s.flush()

    def cold(name: str):
        # As an engine runs it: the layout is known at open (the RAM slab is allocated and
        # touched then, not inside the timed load) and loads go into a preallocated buffer.
        s = fresh(name, host_bytes=2 * total, block_shape=tuple(blocks[0].shape), dtype="bfloat16")
        drop_page_cache(workdir / name / "disk")
        return s

    out = torch.zeros((len(blocks), *blocks[0].shape), dtype=blocks[0].dtype)
    with cold("async") as s:  # get straight from cold disk
        m = s.match(toks)
        t = time.perf_counter()
        got = s.get(m, out=out)
        get_cold_s = time.perf_counter() - t
        assert len(got) == len(blocks) and all(torch.equal(a, b) for a, b in zip(got, blocks))
    with cold("async") as s:  # prefetch, then get
        m = s.match(toks)
        t = time.perf_counter()
        s.prefetch(m).wait()
        prefetch_s = time.perf_counter() - t
        t = time.perf_counter()
        got = s.get(m, out=out)
        get_after_s = time.perf_counter() - t
        assert len(got) == len(blocks)
    raw = raw_read_GBps(workdir / "async" / "disk" / "data.mdb")
    return {
        "blocks": len(blocks), "block_MiB": nbytes / MiB,
        "put_caller_ms": put_s * 1e3, "sync_store_ms": sync_s * 1e3, "put_ratio": put_s / sync_s,
        "cold_get_GBps": total / get_cold_s / 1e9, "prefetch_GBps": total / prefetch_s / 1e9,
        "get_after_prefetch_GBps": total / get_after_s / 1e9, "raw_disk_read_GBps": raw,
        "cold_get_vs_raw_disk": total / get_cold_s / 1e9 / raw,
    }


# -- commands ---------------------------------------------------------------------------------
def _block_sets(n_small: int, n_big: int) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Real SmolLM2 KV (float32, ``n_small`` blocks) and the two bf16 sets the disk benchmarks
    measure: its 1.4 MiB blocks, and ``n_big`` 8 MiB blocks built from them."""
    print(f"computing real KV of SmolLM2-135M ({n_small} blocks of 64 tokens)...", file=sys.stderr)
    kv = real_kv(torch.float32, n_small)
    bf16 = [b.to(torch.bfloat16) for b in kv]
    return kv, {"smollm2_bf16_1.4MiB": bf16, "bf16_8MiB": big_blocks(bf16, 8 * MiB, n_big)}


def cmd_tiers(args) -> dict:
    kv, sets = _block_sets(16 if args.quick else 64, 4 if args.quick else 24)
    bf16 = sets["smollm2_bf16_1.4MiB"]
    fp16 = [b.to(torch.float16) for b in kv]
    results: dict = {"machine": {"cores": os.cpu_count()}}
    base = Path(args.workdir or tempfile.mkdtemp(prefix="kvstore-bench-"))
    with tempfile.TemporaryDirectory(dir=base) as wd:
        wd = Path(wd)
        for name, blocks in sets.items():
            print(f"[{name}] host tier...", file=sys.stderr)
            results.setdefault("host", {})[name] = bench_host(blocks)
            print(f"[{name}] disk tier...", file=sys.stderr)
            d = wd / name
            d.mkdir()
            results.setdefault("disk", {})[name] = bench_disk(blocks, d)
        print("codec...", file=sys.stderr)
        results["codec"] = {"bf16": bench_codec(bf16), "fp16": bench_codec(fp16)}
        print("match of a 128k-token prompt...", file=sys.stderr)
        results["match"] = bench_match(wd, 16384 if args.quick else 131072)
    return results


def print_tiers(r: dict) -> None:
    print("host tier (put/get vs numpy.copyto into touched memory; target ratio >= 0.8)")
    for name, h in r["host"].items():
        print(f"  {name:22s} put {h['put_GBps']:6.2f} GB/s  get {h['get_GBps']:6.2f} GB/s  "
              f"copyto {h['copyto_GBps']:6.2f} GB/s  ratios put {h['put_ratio']:.2f} get {h['get_ratio']:.2f}")
    print("disk tier (raw KV GB/s vs raw LMDB of the same bytes, same run)")
    for name, d in r["disk"].items():
        print(f"  {name:22s} store {d['store_GBps']:5.2f} vs raw put {d['raw_lmdb_put_GBps']:5.2f} "
              f"(ratio {d['store_ratio']:.2f});  cold load {d['cold_load_GBps']:5.2f} vs raw get "
              f"{d['raw_lmdb_cold_get_GBps']:5.2f} (ratio {d['cold_load_ratio']:.2f}); cache drop: {d['cache_drop']}")
    print("codec (zstd level 1, byte-plane split; targets bf16 >= 1.4, fp16 >= 1.12)")
    for name, c in r["codec"].items():
        print(f"  {name:5s} ratio {c['ratio']:.3f} (without split {c['ratio_without_split']:.3f})  "
              f"compress {c['compress_MBps']:.0f} MB/s  decompress {c['decompress_MBps']:.0f} MB/s")
    m = r["match"]
    print(f"match, {m['blocks']} blocks all on disk: median {m['match_ms_median']:.2f} ms "
          f"(best {m['match_ms_best']:.2f}; hashing {m['hash_ms']:.2f}); target <= 5 ms")


def cmd_ttft(args) -> dict:
    lengths = (1024,) if args.quick else (1024, 2048, 4096)
    print(f"time to first token for prompts of {lengths} tokens (SmolLM2-135M, float32)...", file=sys.stderr)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="kvstore-bench-"))
    with tempfile.TemporaryDirectory(dir=base) as wd:
        return {"ttft": bench_ttft(Path(wd), lengths, 1 if args.quick else 2)}


def print_ttft(r: dict) -> None:
    print("time to first token, all but the last block cached, vs recompute in the same run "
          "(target ratio <= 0.2 at 4k)")
    print(f"  {'tokens':>6s} {'hit':>5s} {'cached RAM':>10s} {'cached disk':>11s} {'recompute':>9s} "
          f"{'ratio RAM':>9s} {'ratio disk':>10s}   {'recompute 1-pass':>16s} {'ratio disk vs 1-pass':>20s}")
    for n, t in r["ttft"].items():
        print(f"  {n:>6} {t['hit_tokens']:5d} {t['cached_host_s']:9.3f}s {t['cached_disk_s']:10.3f}s "
              f"{t['recompute_s']:8.2f}s {t['ratio_host']:9.3f} {t['ratio_disk']:10.3f}   "
              f"{t['recompute_one_pass_s']:15.2f}s {t['ratio_vs_one_pass']:20.3f}")
    print("  recompute: block-aligned prefill passes (what the adapter runs, for bit-exact reuse);"
          " 1-pass: one prefill pass")


def cmd_pipeline(args) -> dict:
    n = 16 if args.quick else 64
    print(f"computing real KV of SmolLM2-135M ({n} blocks of 64 tokens)...", file=sys.stderr)
    bf16 = [b.to(torch.bfloat16) for b in real_kv(torch.float32, n)]
    base = Path(args.workdir or tempfile.mkdtemp(prefix="kvstore-bench-"))
    with tempfile.TemporaryDirectory(dir=base) as wd:
        return {"pipeline": bench_pipeline(bf16, Path(wd))}


def print_pipeline(r: dict) -> None:
    p = r["pipeline"]
    print(f"write-behind, {p['blocks']} real bf16 blocks of {p['block_MiB']:.1f} MiB")
    print(f"  put (caller waits) {p['put_caller_ms']:.1f} ms vs synchronous store {p['sync_store_ms']:.1f} ms:"
          f" ratio {p['put_ratio']:.3f} (target <= 0.1)")
    print(f"loads of {p['blocks']} blocks from cold disk (raw KV GB/s)")
    print(f"  get without prefetch {p['cold_get_GBps']:.2f} GB/s; raw disk read {p['raw_disk_read_GBps']:.2f} GB/s"
          f" (ratio {p['cold_get_vs_raw_disk']:.2f})")
    print(f"  prefetch {p['prefetch_GBps']:.2f} GB/s, then get {p['get_after_prefetch_GBps']:.2f} GB/s (RAM copies only)")


def cmd_remote(args) -> dict:
    n = 16 if args.quick else 64
    print(f"computing real KV of SmolLM2-135M ({n} blocks of 64 tokens)...", file=sys.stderr)
    blocks = [b.to(torch.bfloat16) for b in real_kv(torch.float32, n)]
    return bench_remote.run(blocks, 64, requests=50 if args.quick else 200, rounds=3 if args.quick else 9)


def cmd_vllm(args) -> dict:
    import importlib.util
    if importlib.util.find_spec("vllm") is None:  # not imported here: vLLM reads env at import
        raise SystemExit(bench_vllm.NEEDS_VLLM)
    return bench_vllm.run(args)


def print_vllm(r: dict) -> None:
    bench_vllm.show(r)


def cmd_datapath(args) -> dict:
    kv, sets = _block_sets(8 if args.quick else 128, 3 if args.quick else 32)
    return bench_datapath.run(sets, [b.to(torch.float16) for b in kv], args.workdir,
                              drop_page_cache)


COMMANDS = {"tiers": (cmd_tiers, print_tiers), "datapath": (cmd_datapath, bench_datapath.show),
            "trace": (bench_trace.run, bench_trace.show), "ttft": (cmd_ttft, print_ttft),
            "pipeline": (cmd_pipeline, print_pipeline), "vllm": (cmd_vllm, print_vllm),
            "remote": (cmd_remote, bench_remote.show)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quick", action="store_true", help="fewer blocks: a smoke run, not figures")
    p.add_argument("--trace", help="the trace command's JSON-lines trace (default: "
                   "../shared/traces/conversation_trace.jsonl beside the checkout)")
    p.add_argument("--requests", type=int, help="trace: replay only the first N requests, once")
    p.add_argument("--workdir", help="directory for temporary stores (default: the system temp dir)")
    args = p.parse_args(argv)
    run, show = COMMANDS[args.command]
    torch.set_grad_enabled(False)
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        show(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
