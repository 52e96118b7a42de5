"""The vLLM connector's counters as vLLM connector stats, so they reach vLLM's own ``/metrics``.

vLLM pulls ``get_kv_connector_stats()`` from every worker after each step, sums the workers'
(``aggregate``), carries the result to the front end in the scheduler's stats and hands it to the
Prometheus logger, which calls ``KVStorePromMetrics.observe``. So one scrape of ``vllm serve``
shows the store next to vLLM's own metrics (names in ``PROM``). With tensor parallelism every
rank loads and stores its own shard: token counts are summed over ranks.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

# data key -> (Prometheus name, help). Counters only: vLLM observes each interval's sums.
PROM = {
    "loaded_tokens": ("vllm:kvstore_loaded_tokens", "Tokens the kvstore connector loaded into vLLM's KV cache (summed over TP ranks)."),
    "stored_tokens": ("vllm:kvstore_stored_tokens", "Tokens the kvstore connector saved from vLLM's KV cache (summed over TP ranks)."),
    "load_seconds": ("vllm:kvstore_load_seconds", "Seconds the kvstore connector's threads spent loading (off the engine step)."),
    "store_seconds": ("vllm:kvstore_store_seconds", "Seconds the kvstore connector's threads spent saving (off the engine step)."),
    "loaded_bytes": ("vllm:kvstore_loaded_bytes", "Bytes of KV the kvstore connector loaded into vLLM's KV cache."),
    "failed_blocks": ("vllm:kvstore_load_failed_blocks", "Store blocks whose load failed; vLLM recomputed them."),
    "loads": ("vllm:kvstore_loads", "Requests the kvstore connector loaded (one per TP rank)."),
}
TIER_HITS = ("vllm:kvstore_hit_tokens", "Tokens the kvstore connector loaded, by the store tier that held them.")


def _empty() -> dict[str, Any]:
    return {**{k: 0 for k in PROM}, "hit_tokens": {}}


@dataclasses.dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Sums since the last ``take`` (serializable: plain numbers and a tier -> tokens dict; no
    lock inside, since vLLM pickles it between processes: callers sharing one serialize)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = _empty()

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in PROM) and not self.data.get("hit_tokens")

    def add(self, **values: float) -> None:
        """Adds to the named sums; ``hit_tokens`` takes a tier -> tokens dict."""
        for k, v in values.items():
            if k == "hit_tokens":
                for tier, n in v.items():
                    self.data["hit_tokens"][tier] = self.data["hit_tokens"].get(tier, 0) + n
            else:
                self.data[k] += v

    def take(self) -> KVStoreConnectorStats | None:
        """The sums so far (None if nothing happened), starting new ones."""
        if self.is_empty():
            return None
        taken, self.data = KVStoreConnectorStats(data=self.data), _empty()
        return taken

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not other.is_empty():
            data = other.data
            self.add(**{k: data.get(k, 0) for k in PROM}, hit_tokens=data.get("hit_tokens", {}))
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: round(v, 4) if isinstance(v, float) else v
                                       for k, v in self.data.items() if k in PROM}
        out.update({f"hit_tokens_{t}": n for t, n in sorted(self.data["hit_tokens"].items())})
        return out


class KVStorePromMetrics(KVConnectorPromMetrics):
    """Registers the counters in ``PROM`` (and ``TIER_HITS`` by tier) with vLLM's Prometheus
    registry; ``observe`` adds one interval's ``KVStoreConnectorStats.data``."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {k: self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
                          for k, (name, doc) in PROM.items()}
        self._tier_hits = self._counter_cls(name=TIER_HITS[0], documentation=TIER_HITS[1],
                                            labelnames=[*labelnames, "tier"])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        if not transfer_stats_data:
            return
        labels = self.per_engine_labelvalues[engine_idx]
        for k, counter in self._counters.items():
            v = transfer_stats_data.get(k, 0)
            if v:
                counter.labels(*labels).inc(v)
        for tier, n in transfer_stats_data.get("hit_tokens", {}).items():
            self._tier_hits.labels(*labels, tier).inc(n)


class ConnectorCounters:
    """The one sink for the connector's counters: vLLM's stats (``take`` for
    ``get_kv_connector_stats``) and the store's own metrics (``vllm_*``, for kvstore's exporter
    and tests), kept in step. Thread-safe."""

    def __init__(self, metrics, block_tokens: int):
        self._metrics, self._bt = metrics, block_tokens
        self._stats = KVStoreConnectorStats()
        self._lock = threading.Lock()

    def add(self, **values: Any) -> None:
        m = self._metrics
        with self._lock:
            self._stats.add(**values)
        if values.get("loads"):
            m.add("vllm_loaded_tokens", values.get("loaded_tokens", 0))
            m.add("vllm_load_failed_blocks", values.get("failed_blocks", 0))
            m.observe("vllm_load_seconds", values.get("load_seconds", 0.0))
        if "store_seconds" in values:
            m.add("vllm_stored_blocks", values.get("stored_tokens", 0) // self._bt)
            m.observe("vllm_store_seconds", values["store_seconds"])

    def take(self) -> KVStoreConnectorStats | None:
        with self._lock:
            return self._stats.take()
