"""Benchmark: vLLM with KVStoreConnector: time to first token (store hit against recompute), and
what a loading hit costs the requests already decoding.

One vLLM engine (CPU, in-process, SmolLM2-135M-Instruct in float32, block_size 64) runs with
KVStoreConnector on a fresh store whose host tier is off, so hits are served from the disk tier
(LMDB, warm page cache) as after an engine restart. vLLM's own prefix cache is off, so a hit can
only come from the store. For each prompt length, in the same run and alternating:

- miss: a new random prompt; prefill computes everything; the connector saves its blocks on its
  own thread (``store_s``, off the step: the benchmark waits for it before the hit);
- hit: the prompt of the previous miss again; all its full blocks but the last come from the store.

Decode under a load: request B decodes while request A's long prefix loads from a cold store
(page cache dropped); B's inter-token gaps from A's arrival to A's first token (p50, p99, max)
beside B's gaps in the same run without A. Then the same bytes: the connector's load GB/s
(its threads: disk read, decode, copy into vLLM's blocks) with A alone from a cold store, and
while B decodes, each beside the store's own cold ``match`` + ``get`` into a preallocated buffer
in the same run (target ratio >= 0.8 for A alone; while B decodes, B's forward takes one of the
2 cores the store's get had).

Needs .venv-vllm (``make test-vllm`` builds it). Run: ``python -m tools.bench_vllm [--quick]``.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

BLOCK_TOKENS = 64
NEEDS_VLLM = ("bench vllm needs vLLM: run it with .venv-vllm/bin/python "
              "(make test-vllm builds that environment)")


def _model_dir() -> Path:
    """The plain-checkpoint copy of SmolLM2-135M-Instruct, converted from its GGUF once."""
    import torch

    from engine_adapter import model_files
    path = model_files.default_convert_dir(torch.float32)
    if not (path / "config.json").is_file():
        model_files.load_default_model(torch.float32)  # converts into default_convert_dir
    return path


def run(args) -> dict:
    """Runs the benchmark; ``args`` may carry ``quick`` (bool) and ``workdir`` (str or None)."""
    quick = bool(getattr(args, "quick", False))
    lengths = (1024,) if quick else (1024, 2048, 4096)
    repeats = 1 if quick else 3
    # vLLM reads these when it is imported.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from engine_adapter.vllm_connector import open_stores, wait_for_transfers

    model = _model_dir()
    base = Path(getattr(args, "workdir", None) or tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-vllm-", dir=base) as wd:
        store_path = str(Path(wd) / "kv")
        print(f"vLLM TTFT, prompts of {lengths} tokens, SmolLM2-135M float32, store {store_path}",
              file=sys.stderr)
        llm = LLM(
            model=str(model), enforce_eager=True, dtype="float32", block_size=BLOCK_TOKENS,
            max_model_len=max(lengths) + 64, enable_prefix_caching=False, seed=0,
            kv_transfer_config=KVTransferConfig(
                kv_connector="KVStoreConnector",
                kv_connector_module_path="engine_adapter.vllm_connector", kv_role="kv_both",
                kv_connector_extra_config={"path": store_path, "host_bytes": 0,
                                           "disk_bytes": "4GiB"}),
        )
        store = open_stores()[os.path.realpath(store_path)]
        params = SamplingParams(max_tokens=1, temperature=0)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        rng = random.Random(0)

        def ttft(prompt: list[int]) -> tuple[float, int]:
            t = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
            return time.perf_counter() - t, out.num_cached_tokens

        def seconds(name: str) -> float:
            h = store.metrics.snapshot()["histograms"].get(name, {})
            return sum(v["sum"] for v in h.values())

        ttft([rng.randrange(vocab) for _ in range(256)])  # warm-up: first-call overheads
        results = {}
        for n in lengths:
            miss, hit, stored, loaded, hits = [], [], [], [], set()
            for _ in range(repeats):
                prompt = [rng.randrange(vocab) for _ in range(n)]
                s0 = seconds("vllm_store_seconds")
                t, cached = ttft(prompt)
                miss.append(t)
                wait_for_transfers()  # the save runs off the step; the hit needs it stored
                stored.append(seconds("vllm_store_seconds") - s0)
                assert cached == 0, cached
                s0 = seconds("vllm_load_seconds")
                t, cached = ttft(prompt)
                hit.append(t)
                loaded.append(seconds("vllm_load_seconds") - s0)
                hits.add(cached)
            results[str(n)] = {
                "hit_tokens": max(hits),
                "ttft_hit_s": statistics.median(hit),
                "ttft_miss_s": statistics.median(miss),
                "store_s": statistics.median(stored),
                "load_s": statistics.median(loaded),
                "recompute_s": statistics.median(miss),
            }
            r = results[str(n)]
            r["ratio"] = r["ttft_hit_s"] / r["recompute_s"]
        decode = _decode_under_load(llm, store, store_path, rng, vocab, max(lengths) - 64,
                                    wait_for_transfers, seconds, repeats)
        del llm
    return {"vllm_ttft": results, "repeats": repeats, "decode_under_load": decode}


def _drop_page_cache(store_path: str) -> None:
    fd = os.open(os.path.join(store_path, "disk", "data.mdb"), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _stream(llm, schedule: list) -> list[list[float]]:
    """Steps the engine by hand, adding ``(step, prompt, max_tokens)`` at its step; returns each
    request's token arrival times, preceded by the time it was added."""
    from vllm import SamplingParams
    engine = llm.llm_engine
    pending = sorted(enumerate(schedule), key=lambda e: e[1][0])
    times: list[list[float]] = [[] for _ in schedule]
    seen = [0] * len(schedule)
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, n) = pending.pop(0)
            engine.add_request(f"decode-{i}", {"prompt_token_ids": prompt},
                               SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            times[i].append(time.perf_counter())
        for o in engine.step():
            i = int(o.request_id.removeprefix("decode-"))
            n = len(o.outputs[0].token_ids)
            times[i].extend([time.perf_counter()] * (n - seen[i]))
            seen[i] = n
        step += 1
    return times


def _gaps(ts: list[float]) -> dict:
    g = sorted(b - a for a, b in zip(ts, ts[1:]))
    if not g:
        return {"n": 0, "p50_s": 0.0, "p99_s": 0.0, "max_s": 0.0}
    return {"n": len(g), "p50_s": g[len(g) // 2], "p99_s": g[min(len(g) - 1, int(len(g) * 0.99))],
            "max_s": g[-1]}


def _decode_under_load(llm, store, store_path, rng, vocab, n_tokens, wait_for_transfers,
                       seconds, repeats: int) -> dict:
    """B's inter-token gaps while A's cold hit loads, against B alone; connector vs store GB/s."""
    import torch

    long = [rng.randrange(vocab) for _ in range(n_tokens)]
    short = [rng.randrange(vocab) for _ in range(64)]
    _stream(llm, [(0, long, 1)])  # stores A's prefix
    wait_for_transfers()
    store.flush()
    b_tokens = 120
    (alone,) = _stream(llm, [(0, short, b_tokens)])

    def cold_load(schedule: list) -> tuple[list[list[float]], int, float]:
        """``_stream(schedule)`` from a cold store, with the connector's loaded bytes and load
        seconds meanwhile."""
        _drop_page_cache(store_path)
        l0, b0 = seconds("vllm_load_seconds"), _loaded_bytes(store)
        out = _stream(llm, schedule)
        return out, _loaded_bytes(store) - b0, seconds("vllm_load_seconds") - l0

    (b, a), load_bytes, load_s = cold_load([(0, short, b_tokens), (3, long, 2)])
    window = [t for t in b[1:] if a[0] < t <= a[1]]
    # A alone, then the store alone: the same bytes from a cold store, alternating, at least 3 times; medians.
    a_alone, store_runs = [], []
    ns = next(iter(store.namespaces().values()))
    for _ in range(max(3, repeats)):
        _, nbytes, s = cold_load([(0, long, 2)])
        a_alone.append(_gbps(nbytes, s))
        _drop_page_cache(store_path)
        t0 = time.perf_counter()
        m = store.match(long[:len(long) - 1], ns, touch=False)
        out = torch.empty((m.num_blocks, *store.block_shape), dtype=store.dtype)
        got = store.get(m, out=out)
        store_s = time.perf_counter() - t0
        store_runs.append(_gbps(sum(x.numel() * x.element_size() for x in got), store_s))
    return {
        "prompt_tokens": n_tokens, "loaded_bytes": load_bytes, "load_s": load_s,
        "a_wait_s": a[1] - a[0], "b_tokens_during_load": len(window),
        "during_load": _gaps([a[0], *window]), "alone": _gaps(alone[1:]),
        "connector_gbps": _gbps(load_bytes, load_s),
        "connector_alone_gbps": statistics.median(a_alone), "store_gbps": statistics.median(store_runs),
    }


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds else 0.0


def _loaded_bytes(store) -> int:
    """The connector's loaded bytes so far: its loaded tokens times the bytes of a token."""
    import math
    tokens = store.metrics.total("vllm_loaded_tokens")
    per_token = math.prod(store.block_shape) * store.dtype.itemsize / store.config.block_tokens
    return int(tokens * per_token)


def show(results: dict) -> None:
    """Prints ``run``'s results as a table."""
    print(f"vLLM time to first token, disk-tier hit vs recompute in the same run "
          f"(median of {results['repeats']}; SmolLM2-135M float32, CPU)")
    print(f"  {'tokens':>6s} {'hit':>5s} {'ttft hit':>9s} {'(load)':>7s} {'recompute':>9s} "
          f"{'ratio':>6s}  {'miss incl. store':>16s} {'(store)':>8s}")
    for n, r in results["vllm_ttft"].items():
        print(f"  {n:>6} {r['hit_tokens']:5d} {r['ttft_hit_s']:8.3f}s {r['load_s']:6.3f}s "
              f"{r['recompute_s']:8.3f}s {r['ratio']:6.3f}  {r['ttft_miss_s']:15.3f}s "
              f"{r['store_s']:7.3f}s")
    print("  recompute = miss TTFT (the connector saves off the step; store = its saver thread's "
          "time); load = the connector's load threads' time for the hit")
    d = results.get("decode_under_load")
    if d:
        print(f"\nDecode of a running request while a {d['prompt_tokens']}-token hit loads from a "
              f"cold store (A waited {d['a_wait_s']:.3f} s, the connector's load took "
              f"{d['load_s']:.3f} s)")
        print(f"  {'':22s} {'tokens':>6s} {'p50':>8s} {'p99':>8s} {'max':>8s}")
        for name, key in (("during A's load", "during_load"), ("alone (no load)", "alone")):
            g = d[key]
            print(f"  {name:22s} {g['n']:6d} {g['p50_s']:7.3f}s {g['p99_s']:7.3f}s {g['max_s']:7.3f}s")
        store = d["store_gbps"]
        ratio = lambda x: x / store if store else 0.0  # noqa: E731
        print(f"  load of {d['loaded_bytes'] / 2**20:.0f} MiB from a cold store; the store's own cold get "
              f"{store:.2f} GB/s")
        alone = d["connector_alone_gbps"]
        print(f"    connector, A alone      {alone:.2f} GB/s  ratio {ratio(alone):.2f}  target >= 0.8  "
              f"{'met' if ratio(alone) >= 0.8 else 'MISSED'}")
        print(f"    connector, while B decodes {d['connector_gbps']:.2f} GB/s  ratio "
              f"{ratio(d['connector_gbps']):.2f}  (B's forward holds one of the cores)")


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.bench_vllm [--quick] [--json] [--workdir DIR]``; the same run as
    ``python -m tools.bench vllm`` (which imports this module: this one imports no other tool)."""
    import argparse
    import importlib.util
    import json

    p = argparse.ArgumentParser(prog="python -m tools.bench_vllm", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quick", action="store_true", help="one prompt length, one repeat: a smoke run")
    p.add_argument("--workdir", help="directory for the temporary store (default: the system temp dir)")
    args = p.parse_args(argv)
    if importlib.util.find_spec("vllm") is None:  # not imported here: vLLM reads env at import
        raise SystemExit(NEEDS_VLLM)
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        show(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
