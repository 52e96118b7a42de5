"""``make demo-cluster``: two engine "machines" share prefixes through one Valkey.

Starts a valkey-server on 127.0.0.1 (tools/valkey_server.py), then runs machine A and machine B
as separate processes, each with its own store directory (RAM and disk tiers of its own) and the
same ``remote_url``: nothing is shared but Valkey. A answers the document question (computing
the prefix and storing it locally and in Valkey); B, which has never seen the document, answers
it from the remote tier. Prints each machine's hit tokens, where they came from, TTFT, and
whether B's output equals A's. Exit 1 if B did not hit the remote tier or its output differs.

    python -m tools.demo_cluster [--workdir DIR] [--max-new-tokens N] [--doc-chars N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .valkey_server import ValkeyServer


def machine(store: str, remote_url: str, max_new_tokens: int, doc_chars: int) -> dict:
    """One machine's run (in its own process): the document question, with the remote tier on."""
    from engine_adapter import model_files
    from engine_adapter import scenarios as sc
    from engine_adapter.hf import CachedLM
    from kvstore import KVStore, StoreConfig

    model, tok = model_files.load_default_model()
    messages = sc.doc_messages(sc.DOC_QUESTIONS[0])
    if doc_chars:
        messages[-1]["content"] = sc.DOCUMENT[:doc_chars] + "\n\nQuestion: " + sc.DOC_QUESTIONS[0]
    cfg = StoreConfig(path=store, host_bytes="256MiB", disk_bytes="1GiB", remote_url=remote_url,
                      remote_timeout_s=2.0)
    with KVStore.open(cfg) as s:
        c = CachedLM(model, tok, s).chat(messages, max_new_tokens=max_new_tokens)
        s.flush()  # so the other machine sees every block
    u = c.usage
    return {"prompt_tokens": u["prompt_tokens"], "hit_tokens": u["prompt_cache_hit_tokens"],
            "hit_tiers": c.hit_tiers, "ttft_ms": round(c.ttft_s * 1e3, 1), "output_ids": c.output_ids,
            "text": c.text}


def _run_machine(name: str, store: Path, url: str, args) -> dict:
    print(f"  ... machine {name}: its own store {store}, Valkey at {url}", file=sys.stderr, flush=True)
    argv = [sys.executable, "-m", "tools.demo_cluster", "--machine", str(store), "--remote-url", url,
            "--max-new-tokens", str(args.max_new_tokens), "--doc-chars", str(args.doc_chars)]
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise SystemExit(f"machine {name} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo_cluster", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where the two store directories go (default: a temporary one)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length (default 24)")
    p.add_argument("--doc-chars", type=int, default=0, help="use only this much of the document (0: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--machine", help=argparse.SUPPRESS)  # internal: run one machine on this store
    p.add_argument("--remote-url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.doc_chars < 0:
        p.error("--max-new-tokens: expected >= 1; --doc-chars: expected >= 0")
    if args.machine:
        print(json.dumps(machine(args.machine, args.remote_url, args.max_new_tokens, args.doc_chars)))
        return 0
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvstore-cluster-", dir=args.workdir) as wd, ValkeyServer() as server:
        t = time.perf_counter()
        a = _run_machine("A", Path(wd) / "machine-a", server.url, args)
        b = _run_machine("B", Path(wd) / "machine-b", server.url, args)
        same = a["output_ids"] == b["output_ids"]
        ok = same and b["hit_tiers"].get("remote", 0) > 0
        result = {"valkey": server.url, "machines": {"A": a, "B": b}, "same_output": same, "ok": ok,
                  "seconds": round(time.perf_counter() - t, 1)}
    if args.json:
        print(json.dumps(result))
        return 0 if ok else 1
    print(f"Two machines, separate stores, one Valkey ({result['valkey']}): the document question")
    print(f"  {'machine':8s} {'prompt':>6s} {'hit':>6s}  {'hit from':24s} {'TTFT':>9s}")
    for name, m in (("A", a), ("B", b)):
        tiers = ", ".join(f"{t} {n}" for t, n in m["hit_tiers"].items() if n) or "-"
        print(f"  {name:8s} {m['prompt_tokens']:6d} {m['hit_tokens']:6d}  {tiers:24s} {m['ttft_ms']:7.0f}ms")
    print(f"  B's answer is A's: {'yes' if same else 'NO'}  ({b['text'][:60]!r}...)")
    if not ok:
        print("  FAILED: machine B did not answer from the remote tier with A's output", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
