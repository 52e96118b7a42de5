"""Runs one vLLM engine in this (fresh) process and writes what it produced as JSON.

Usage: python tests/vllm/engine_run.py SPEC.json OUT.json. SPEC holds ``model``, ``store`` (a
kvstore path, or null for an engine without the connector), ``multiprocessing`` (vLLM's
VLLM_ENABLE_V1_MULTIPROCESSING), ``prefix_caching`` (vLLM's own prefix cache), ``block_size``,
``tenant`` (the connector's tenant salt), ``prompt_embeds`` (vLLM's enable_prompt_embeds) and
``phases``: a list of prompt lists, each run by one ``LLM.generate`` call, in order. A prompt is
a list of token ids, or ``{"embeds_seed": S, "len": N}``: N seeded random prompt embeddings. OUT
holds, per
phase and prompt, the greedy output ids and vLLM's ``num_cached_tokens``, and the store's
counters (histograms as ``<name>_count``) when the worker runs in this process.
"""

import json
import os
import sys


def _prompt(p, llm) -> dict:
    if isinstance(p, list):
        return {"prompt_token_ids": p}
    import torch
    hidden = llm.llm_engine.model_config.get_hidden_size()
    g = torch.Generator().manual_seed(p["embeds_seed"])
    return {"prompt_embeds": torch.randn(p["len"], hidden, generator=g) * 0.15}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    # vLLM reads these at import time.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.get("multiprocessing") else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = {}
    if spec.get("store"):
        extra = {"path": spec["store"], "host_bytes": "64MiB", "disk_bytes": "256MiB"}
        if spec.get("tenant"):
            extra["tenant"] = spec["tenant"]
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVStoreConnector",
            kv_connector_module_path="engine_adapter.vllm_connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    if spec.get("prompt_embeds"):
        kw["enable_prompt_embeds"] = True
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              block_size=spec.get("block_size", 64), max_model_len=2048, seed=0,
              enable_prefix_caching=spec.get("prefix_caching", True), **kw)
    params = SamplingParams(max_tokens=spec.get("max_tokens", 16), temperature=0, detokenize=False,
                            ignore_eos=True)
    phases = []
    for prompts in spec["phases"]:
        outs = llm.generate([_prompt(p, llm) for p in prompts], params, use_tqdm=False)
        phases.append([{"output": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens}
                       for o in outs])
    counters = None
    if spec.get("store") and not spec.get("multiprocessing"):
        from engine_adapter.vllm_connector import open_stores
        store = open_stores()[os.path.realpath(spec["store"])]
        snap = store.metrics.snapshot()
        counters = {name: sum(series.values()) for name, series in snap["counters"].items()}
        # Histograms as "<name>_count": how many observations.
        counters.update({f"{name}_count": sum(h["count"] for h in series.values())
                         for name, series in snap["histograms"].items()})
    with open(out_path, "w") as f:
        json.dump({"phases": phases, "counters": counters}, f)


if __name__ == "__main__":  # vLLM's multiprocessing mode spawns: keep the guard
    main(*sys.argv[1:])
