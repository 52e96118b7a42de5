"""``python -m tools.bench datapath``: the disk data path through the store's public API, each
figure beside the raw limit of the same uncompressed bytes measured in the same run.

- durable store: ``put`` every block, ``flush`` (committed and synced) into a new store vs a raw
  fsync'd file per block and a raw LMDB put (same flags as the store, 64 puts a transaction,
  then a sync): medians of ``ROUNDS`` rounds that alternate the three;
- cold load: page cache dropped (``/proc/sys/vm/drop_caches`` as root, else
  ``posix_fadvise(DONTNEED)`` on the files after a sync), store reopened, ``match`` + ``get``
  into a preallocated tensor vs a raw cold sequential read of the file-per-block files, each
  into its block's place in the same tensor (the job the store does): medians of ``ROUNDS``
  rounds that alternate the two;
- warm load: RAM tiers off, page cache hot, vs a raw warm read of the same files into the same
  places: medians of ``ROUNDS`` rounds that alternate the two. The read of every file into
  one reused buffer (it stays in the CPU's cache and never writes memory) is printed beside it;
  the earlier figures in docs/benchmarks.md used it as the limit;
- bytes on disk: the disk tier's stored bytes over the raw bytes (bf16 and fp16).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import lmdb
import numpy as np
import torch

from kvstore import KVStore, StoreConfig
from kvstore.codec import aligned_empty, byte_view

MiB = 1 << 20
TARGETS = {"store_vs_files": 1.0, "store_vs_lmdb": 1.0, "cold_load": 1.2, "warm_load": 0.5,
           "bytes_bf16": 0.75, "bytes_fp16": 0.90}
ROUNDS = 3  # store, cold and warm figures are medians of this many alternating rounds


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_files_write(raws: list[np.ndarray], d: Path) -> float:
    """Seconds to write each block to its own file, fsync each file and then the directory."""
    d.mkdir()
    t = time.perf_counter()
    for i, r in enumerate(raws):
        fd = os.open(d / f"{i}.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, r)
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(d)
    return time.perf_counter() - t


def raw_files_read(d: Path, dsts: Sequence[np.ndarray]) -> float:
    """Seconds to read the block files of ``d`` in order, file ``i`` into the preallocated
    ``dsts[i]`` (one buffer may stand for every file)."""
    t = time.perf_counter()
    for i, dst in enumerate(dsts):
        with open(d / f"{i}.bin", "rb", buffering=0) as f:
            f.readinto(memoryview(dst))
    return time.perf_counter() - t


def raw_lmdb_put(raws: list[np.ndarray], d: Path) -> float:
    """Seconds for raw LMDB puts of the same bytes with the store's flags, then a sync."""
    d.mkdir()
    total = sum(r.nbytes for r in raws)
    env = lmdb.open(str(d), map_size=2 * total + 64 * MiB, writemap=True, metasync=False, sync=True)
    keys_ = [i.to_bytes(16, "little") for i in range(len(raws))]
    t = time.perf_counter()
    for i in range(0, len(raws), 64):
        with env.begin(write=True) as txn:
            for j in range(i, min(len(raws), i + 64)):
                txn.put(keys_[j], raws[j])
    env.sync(True)
    s = time.perf_counter() - t
    env.close()
    return s


def bench_blocks(blocks: list[torch.Tensor], wd: Path, drop_page_cache) -> dict:
    n, nbytes = len(blocks), blocks[0].numel() * blocks[0].element_size()
    total = n * nbytes
    raws = [byte_view(b.contiguous()) for b in blocks]
    toks = list(range(n * 64))
    shape, dtype = tuple(blocks[0].shape), str(blocks[0].dtype).removeprefix("torch.")

    def config(path: Path, **kw) -> StoreConfig:
        return StoreConfig(path=path, disk_bytes=4 * total + 64 * MiB, io_threads=2, **kw)

    # Durable store, default config (host tier on), layout declared so no first put fixes it.
    # Medians of ROUNDS rounds that alternate it with both limits, each into a fresh directory
    # (this disk's write speed swung 0.3-1.4 GB/s from one minute to the next); the last
    # round's store and files stay for the loads.
    stores, files, lmdbs = [], [], []
    for _ in range(ROUNDS):
        for d in ("store", "files", "lmdb"):
            shutil.rmtree(wd / d, ignore_errors=True)
        with KVStore.open(config(wd / "store", block_shape=shape, dtype=dtype)) as s:
            t = time.perf_counter()
            s.put(toks, blocks)
            assert s.flush()
            stores.append(time.perf_counter() - t)
            stored = s.tier("disk").usage().bytes
        files.append(raw_files_write(raws, wd / "files"))
        lmdbs.append(raw_lmdb_put(raws, wd / "lmdb"))
    shutil.rmtree(wd / "lmdb")
    store_s, files_s, lmdb_s = (statistics.median(x) for x in (stores, files, lmdbs))

    # Cold: medians of ROUNDS rounds that alternate the store's load with the raw read (one
    # cold read of either swung 0.8-1.6 GB/s on these machines from one minute to the next).
    out = torch.zeros((n, *shape), dtype=blocks[0].dtype)
    places = list(byte_view(out).reshape(n, nbytes))
    cold, raw_cold = [], []
    for _ in range(ROUNDS):
        how = drop_page_cache(wd / "store" / "disk")
        with KVStore.open(config(wd / "store", block_shape=shape, dtype=dtype)) as s:
            t = time.perf_counter()
            m = s.match(toks)
            got = s.get(m, out=out)
            cold.append(time.perf_counter() - t)
        assert len(got) == n and all(torch.equal(a, b) for a, b in zip(got, blocks)), "cold load"
        # The raw read writes the same bytes into the same places as the store's get: out stays right.
        drop_page_cache(wd / "files")
        raw_cold.append(raw_files_read(wd / "files", places))
    cold_s, raw_cold_s = statistics.median(cold), statistics.median(raw_cold)

    # Warm: RAM tiers off, so every get decodes from the (hot) page cache.
    warm, raw_warm = [], []
    with KVStore.open(config(wd / "store", host_bytes=0, block_shape=shape, dtype=dtype)) as s:
        s.get(s.match(toks), out=out)  # pages hot
        raw_files_read(wd / "files", places)
        for _ in range(ROUNDS):
            t = time.perf_counter()
            got = s.get(s.match(toks), out=out)
            warm.append(time.perf_counter() - t)
            assert len(got) == n, "warm load"
            raw_warm.append(raw_files_read(wd / "files", places))
    warm_s, raw_warm_s = statistics.median(warm), statistics.median(raw_warm)
    one = [aligned_empty(nbytes)] * n
    raw_files_read(wd / "files", one)
    one_buffer_s = raw_files_read(wd / "files", one)
    assert all(torch.equal(a, b) for a, b in zip(out, blocks)), "the raw reads changed the loaded blocks"

    gbps = lambda s: total / s / 1e9  # noqa: E731
    return {
        "blocks": n, "block_MiB": nbytes / MiB, "cache_drop": how,
        "store_GBps": gbps(store_s), "raw_files_write_GBps": gbps(files_s),
        "raw_lmdb_put_GBps": gbps(lmdb_s),
        "store_vs_files": files_s / store_s, "store_vs_lmdb": lmdb_s / store_s,
        "store_rounds_GBps": [gbps(x) for x in stores],
        "raw_files_write_rounds_GBps": [gbps(x) for x in files],
        "raw_lmdb_put_rounds_GBps": [gbps(x) for x in lmdbs],
        "cold_load_GBps": gbps(cold_s), "raw_cold_read_GBps": gbps(raw_cold_s),
        "cold_load": raw_cold_s / cold_s, "cold_rounds_GBps": [gbps(x) for x in cold],
        "raw_cold_rounds_GBps": [gbps(x) for x in raw_cold],
        "warm_load_GBps": gbps(warm_s), "raw_warm_read_GBps": gbps(raw_warm_s),
        "warm_load": raw_warm_s / warm_s, "raw_warm_read_one_buffer_GBps": gbps(one_buffer_s),
        "bytes_ratio": stored / total,
    }


def run(sets: dict[str, list[torch.Tensor]], fp16: list[torch.Tensor], workdir: str | None,
        drop_page_cache) -> dict:
    base = Path(workdir or tempfile.mkdtemp(prefix="kvstore-bench-"))
    results: dict = {"machine": {"cores": os.cpu_count()}, "sets": {}, "targets": TARGETS}
    with tempfile.TemporaryDirectory(dir=base) as wd:
        for name, blocks in sets.items():
            print(f"[{name}] datapath...", file=sys.stderr)
            d = Path(wd) / name
            d.mkdir()
            results["sets"][name] = bench_blocks(blocks, d, drop_page_cache)
        d = Path(wd) / "fp16"
        d.mkdir()
        print("[fp16] bytes on disk...", file=sys.stderr)
        results["fp16_bytes_ratio"] = bench_blocks(fp16, d, drop_page_cache)["bytes_ratio"]
    return results


def _line(what: str, fig: str, limit: str, ratio: float, target: float, higher: bool = True) -> str:
    met = ratio >= target if higher else ratio <= target
    op = ">=" if higher else "<="
    return (f"  {what:34s} {fig:>12s}  limit {limit:>12s}  ratio {ratio:5.2f}  "
            f"target {op} {target:.2f}  {'met' if met else 'MISSED'}")


def _rounds(gbps: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in gbps)


def show(r: dict) -> None:
    print(f"disk data path through the public API, 2 io threads, {r['machine']['cores']} cores")
    for name, d in r["sets"].items():
        print(f"[{name}] {d['blocks']} blocks of {d['block_MiB']:.2f} MiB; cache drop: {d['cache_drop']}")
        g = lambda k: f"{d[k]:.2f} GB/s"  # noqa: E731
        print(_line("durable store vs fsync'd files", g("store_GBps"), g("raw_files_write_GBps"),
                    d["store_vs_files"], TARGETS["store_vs_files"])
              + f"  (medians of {ROUNDS}: store {_rounds(d['store_rounds_GBps'])}, files "
                f"{_rounds(d['raw_files_write_rounds_GBps'])})")
        print(_line("durable store vs raw LMDB put", g("store_GBps"), g("raw_lmdb_put_GBps"),
                    d["store_vs_lmdb"], TARGETS["store_vs_lmdb"])
              + f"  (medians of {ROUNDS}: raw LMDB {_rounds(d['raw_lmdb_put_rounds_GBps'])})")
        print(_line("cold load vs raw cold read", g("cold_load_GBps"), g("raw_cold_read_GBps"),
                    d["cold_load"], TARGETS["cold_load"])
              + f"  (medians of {ROUNDS}: store {_rounds(d['cold_rounds_GBps'])}, raw {_rounds(d['raw_cold_rounds_GBps'])})")
        print(_line("warm load (RAM tiers off) vs warm read", g("warm_load_GBps"),
                    g("raw_warm_read_GBps"), d["warm_load"], TARGETS["warm_load"])
              + f"  (medians of {ROUNDS}; into one reused buffer {g('raw_warm_read_one_buffer_GBps')})")
        print(_line("bytes on disk, bf16", f"{d['bytes_ratio']:.3f}x", "raw 1.000x",
                    d["bytes_ratio"], TARGETS["bytes_bf16"], higher=False))
    print(_line("bytes on disk, fp16 (1.4 MiB blocks)", f"{r['fp16_bytes_ratio']:.3f}x", "raw 1.000x",
                r["fp16_bytes_ratio"], TARGETS["bytes_fp16"], higher=False))
