"""Counters and histograms of one store process, declared once and pulled as snapshots.

Every metric is declared in ``DECLARED`` (name, kind, help, unit, label names and their allowed
values); recording an undeclared name, an undeclared label or a value outside the allowed ones
raises ValueError, so a typo fails the test that reaches it instead of exporting a stray series.
The store and its tiers only count; exporters (Prometheus, the dashboard) live in tools/ and
render ``Metrics.snapshot()`` with the declarations. Names follow Prometheus conventions without
the ``kvstore_`` prefix and ``_total`` suffix, which exporters add.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]

# Seconds: from a host-tier copy (sub-ms) to a cold multi-block disk load.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

ANY = None  # a label whose values are open (tier names: a stack can have any tiers)
EVICTION_REASONS = ("capacity", "ttl", "purge", "corrupt")
DROP_REASONS = ("queue_full", "capacity", "no_space", "io_error", "error")
FAULT_STAGES = ("lookup", "load", "store", "flush")
BYPASS_REASONS = ("lora", "multimodal", "prompt_embeds")
SERVER_ENDPOINTS = ("chat", "completions")
SERVER_OUTCOMES = ("ok", "bad_request", "unauthorized", "not_found", "queue_full", "cancelled", "error")
REMOTE_ERRORS = ("timeout", "connection", "auth", "oom", "corrupt", "breaker_open", "other")
REMOTE_OPS = ("contains", "get", "put", "touch", "pin", "delete", "scan")


@dataclasses.dataclass(frozen=True)
class Declared:
    """One metric: ``labels`` maps each label name to its allowed values (``ANY``: open)."""

    name: str
    kind: str  # "counter" | "histogram"
    help: str
    unit: str  # "tokens", "blocks", "seconds", "" (events)
    labels: dict[str, tuple[str, ...] | None] = dataclasses.field(default_factory=dict)

    def zero_series(self, tiers: list[str]) -> list[dict[str, str]]:
        """The label sets exported at 0 before their first event (so rate() works from the
        start): every allowed combination, with ``tier`` taking the store's tier names."""
        combos: list[dict[str, str]] = [{}]
        for label, allowed in self.labels.items():
            values = tiers if label == "tier" else allowed
            if values is None:
                return []
            combos = [{**c, label: v} for c in combos for v in values]
        return combos


def _declare(*items: Declared) -> dict[str, Declared]:
    return {d.name: d for d in items}


_TIER = {"tier": ANY}
DECLARED: dict[str, Declared] = _declare(
    Declared("hit_tokens", "counter", "Prompt tokens served from the cache, by the tier that held them.",
             "tokens", _TIER),
    Declared("miss_tokens", "counter", "Prompt tokens not found in any tier (computed by the engine).",
             "tokens"),
    Declared("requests", "counter", "Prompts looked up.", ""),
    Declared("stored_blocks", "counter", "Blocks newly stored, by tier.", "blocks", _TIER),
    Declared("loaded_bytes", "counter", "Block bytes (raw) loaded by get, by the tier that served them.",
             "bytes", _TIER),
    Declared("dropped_writes", "counter",
             "Blocks a tier could not store (full queue, budget held by pins, full disk, I/O error).",
             "blocks", {"tier": ANY, "reason": DROP_REASONS}),
    Declared("evictions", "counter", "Blocks removed from a tier, by reason (capacity, ttl, purge, corrupt).",
             "blocks", {"tier": ANY, "reason": EVICTION_REASONS}),
    Declared("corrupt_records", "counter",
             "Records that failed their checksum; each was a miss and was removed.", "blocks", _TIER),
    Declared("io_errors", "counter", "I/O errors in a tier, each served as a miss or a dropped write.",
             "", _TIER),
    Declared("spilled_blocks", "counter", "Blocks evicted from a tier and moved down to the next.",
             "blocks", _TIER),
    Declared("load_failed_blocks", "counter",
             "Matched blocks that could not be loaded (vanished or corrupt).", "blocks"),
    Declared("orphan_blocks", "counter",
             "Blocks not stored because their parent block was no longer held.", "blocks"),
    Declared("adapter_faults", "counter",
             "Store faults the engine adapter turned into misses, by stage.", "",
             {"stage": FAULT_STAGES}),
    Declared("promoted_blocks", "counter", "Blocks copied up into a faster tier after a hit lower down.",
             "blocks", _TIER),
    Declared("prefetched_blocks", "counter", "Blocks a prefetch moved up into the RAM tiers.", "blocks"),
    Declared("flushes", "counter",
             "Calls to KVStore.flush (each waits for the slow tiers' writes to commit).", ""),
    Declared("prefetch_errors", "counter",
             "Prefetches that failed (their blocks stayed where they were).", ""),
    Declared("vllm_faults", "counter", "Store faults the vLLM connector turned into misses, by stage.",
             "", {"stage": FAULT_STAGES}),
    Declared("vllm_loaded_tokens", "counter", "Tokens the vLLM connector loaded into vLLM's KV cache.",
             "tokens"),
    Declared("vllm_load_failed_blocks", "counter",
             "Store blocks whose load failed in the vLLM connector (vLLM recomputes them).", "blocks"),
    Declared("vllm_stored_blocks", "counter", "Store blocks the vLLM connector saved.", "blocks"),
    Declared("vllm_idle_waits", "counter",
             "Steps with no tokens scheduled in which the vLLM connector waited for a transfer "
             "instead of letting vLLM's loop spin.", ""),
    Declared("vllm_bypassed_requests", "counter",
             "Requests the vLLM connector neither loads nor stores (LoRA, multimodal, prompt "
             "embeddings), by reason.", "", {"reason": BYPASS_REASONS}),
    Declared("server_requests", "counter",
             "Requests the HTTP server answered, by endpoint and outcome.", "",
             {"endpoint": SERVER_ENDPOINTS, "outcome": SERVER_OUTCOMES}),
    Declared("server_prompt_tokens", "counter",
             "Prompt tokens of the HTTP server's requests, by whether the cache supplied them.", "tokens",
             {"cached": ("yes", "no")}),
    Declared("server_completion_tokens", "counter", "Tokens the HTTP server generated.", "tokens"),
    Declared("server_pinned_blocks", "counter", "Blocks pinned by requests' cache_control.", "blocks"),
    Declared("server_ttft_seconds", "histogram",
             "Seconds from a request's arrival (queueing included) to its first token.", "seconds",
             {"endpoint": SERVER_ENDPOINTS}),
    Declared("server_request_seconds", "histogram",
             "Seconds from a request's arrival to its last token.", "seconds",
             {"endpoint": SERVER_ENDPOINTS}),
    Declared("remote_hits", "counter", "Blocks the remote tier served.", "blocks", _TIER),
    Declared("remote_misses", "counter", "Blocks asked of the remote tier that it could not serve.",
             "blocks", _TIER),
    Declared("remote_errors", "counter",
             "Remote tier faults, each a miss or a dropped write (breaker_open: not asked).", "",
             {"tier": ANY, "reason": REMOTE_ERRORS}),
    Declared("remote_bytes", "counter", "Record bytes sent to (out) and received from (in) the server.",
             "bytes", {"tier": ANY, "direction": ("in", "out")}),
    Declared("remote_round_trip_seconds", "histogram", "Seconds per pipelined round trip to the server.",
             "seconds", {"op": REMOTE_OPS}),
    Declared("load_seconds", "histogram", "Seconds to load the hit blocks of one prompt.", "seconds"),
    Declared("put_seconds", "histogram",
             "Seconds a put holds the caller (RAM copies and queueing the slow writes).", "seconds"),
    Declared("store_seconds", "histogram",
             "Seconds per store: a prompt's new blocks, or one batch written to a slow tier.", "seconds"),
    Declared("vllm_load_seconds", "histogram", "Seconds the vLLM connector spent loading one request.",
             "seconds"),
    Declared("vllm_store_seconds", "histogram", "Seconds the vLLM connector spent saving one step.",
             "seconds"),
)


def _checked(name: str, kind: str, labels: dict[str, str]) -> Labels:
    """The series key of ``labels``; raises ValueError for anything ``DECLARED`` does not allow."""
    d = DECLARED.get(name)
    if d is None or d.kind != kind:
        raise ValueError(f"metric {name!r}: not a declared {kind} (kvstore/metrics.py DECLARED)")
    for label, value in labels.items():
        if label not in d.labels:
            raise ValueError(f"metric {name!r}: undeclared label {label!r}; declared: {sorted(d.labels)}")
        allowed = d.labels[label]
        if allowed is not None and value not in allowed:
            raise ValueError(f"metric {name!r}: {label}={value!r} is not one of {allowed}")
    return tuple(sorted(labels.items()))


def parse_flat(series: str) -> tuple[str, dict[str, str]]:
    """``"name|label=value,..."`` (``Metrics.flat``'s form) -> (name, labels)."""
    name, _, rest = series.partition("|")
    return name, dict(p.split("=", 1) for p in rest.split(",") if p)


class Metrics:
    """Thread-safe counters (monotonic) and fixed-bucket histograms."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hists: dict[str, dict[Labels, list]] = defaultdict(dict)

    def add(self, name: str, value: float = 1, **labels: str) -> None:
        """Adds ``value`` (>= 0) to counter ``name`` with ``labels``."""
        key = _checked(name, "counter", labels)
        if not value:
            return
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Records one observation in histogram ``name`` (buckets: LATENCY_BUCKETS)."""
        key = _checked(name, "histogram", labels)
        with self._lock:
            h = self._hists[name].get(key)
            if h is None:
                h = self._hists[name][key] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0, 0]
            h[0][bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
            h[1] += value
            h[2] += 1

    def value(self, name: str, **labels: str) -> float:
        """The current value of one counter series (0 if never counted)."""
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def total(self, name: str) -> float:
        """The sum of counter ``name`` over all its label values."""
        with self._lock:
            return sum(self._counters.get(name, {}).values())

    def flat(self) -> dict[str, float]:
        """Every counter series as ``"name|label=value,..."`` -> value (the persisted form)."""
        with self._lock:
            return {f"{n}|{','.join(f'{k}={v}' for k, v in labels)}": value
                    for n, series in self._counters.items() for labels, value in series.items()}

    def snapshot(self) -> dict:
        """A copy: ``{"counters": {name: {labels: value}}, "histograms": {name: {labels: {...}}}}``.

        Histogram values hold ``buckets`` (upper bounds), cumulative-free ``counts`` (one per
        bucket plus +Inf), ``sum`` and ``count``.
        """
        with self._lock:
            return {
                "counters": {n: dict(s) for n, s in self._counters.items()},
                "histograms": {
                    n: {k: {"buckets": LATENCY_BUCKETS, "counts": list(h[0]), "sum": h[1], "count": h[2]}
                        for k, h in s.items()}
                    for n, s in self._hists.items()
                },
            }
