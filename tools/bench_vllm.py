"""Benchmark: vLLM time to first token for a long prompt, store hit against recompute.

One vLLM engine (CPU, in-process, SmolLM2-135M-Instruct in float32, block_size 64) runs with
KVStoreConnector on a fresh store whose host tier is off, so hits are served from the disk tier
(LMDB, warm page cache) as after an engine restart. vLLM's own prefix cache is off, so a hit can
only come from the store. For each prompt length, in the same run and alternating:

- miss: a new random prompt; prefill computes everything, then the connector stores its blocks
  (``ttft_miss_s`` includes that synchronous store; ``store_s`` is its share);
- hit: the prompt of the previous miss again; all its full blocks but the last come from the store.

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

    from engine_adapter.vllm_connector import open_stores

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
                "recompute_s": statistics.median(m - s for m, s in zip(miss, stored)),
            }
            r = results[str(n)]
            r["ratio"] = r["ttft_hit_s"] / r["recompute_s"]
        del llm
    return {"vllm_ttft": results, "repeats": repeats}


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
    print("  recompute = miss TTFT minus the connector's synchronous store of the new blocks; "
          "load = the connector's share of the hit")


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
