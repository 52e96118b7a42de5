"""The store's metrics as a prometheus_client Collector: the one place that maps
kvstore/metrics.py's declarations to Prometheus families.

Used by tools/exporter.py (``kvstore serve-metrics`` and an engine's in-process exporter) and by
the engine adapter's HTTP server (its ``/metrics``), so both export the same series. This is the
only module of the package that imports prometheus_client (an optional dependency: nothing else
imports this module).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)

from .metrics import DECLARED, parse_flat
from .store import KVStore

__all__ = ["StoreCollector"]


def _counter_series(store: KVStore, process_counters: bool) -> dict[str, dict]:
    """Counter name -> {labels: value}: this process's counters, or (a tool outside the engine)
    the store's lifetime counters summed over every process; every declared series of the
    store's tiers is present, at 0 before its first event, so rate() works from the start."""
    if process_counters:
        counters = {n: dict(v) for n, v in store.metrics.snapshot()["counters"].items()}
    else:
        counters = {}
        for flat, value in store.lifetime_counters().items():
            name, labels = parse_flat(flat)
            if name in DECLARED:  # a series an older or newer kvstore counted is not ours to name
                series = counters.setdefault(name, {})
                key = tuple(sorted(labels.items()))
                series[key] = series.get(key, 0) + value
    tiers = [t.name for t in store.tiers]
    for d in DECLARED.values():
        if d.kind == "counter":
            series = counters.setdefault(d.name, {})
            for labels in d.zero_series(tiers):
                series.setdefault(tuple(sorted(labels.items())), 0)
    return counters


class StoreCollector:
    """A prometheus_client Collector: one store's counters, histograms and tier usage.

    Args:
        store: an open store; read on every ``collect``.
        process_counters: export this process's counters and histograms. False for a tool
            looking at a store another process writes: its own counters would read as zeros.
    """

    def __init__(self, store: KVStore, process_counters: bool = True):
        self.store = store
        self.process_counters = process_counters

    def collect(self) -> Iterator[Metric]:
        store = self.store
        info = {"path": str(store.config.path), "block_tokens": str(store.config.block_tokens)}
        if store.dtype is not None:
            info["dtype"] = str(store.dtype).removeprefix("torch.")
            info["block_shape"] = "x".join(map(str, store.block_shape))
        fam = InfoMetricFamily("kvstore_store", "The store this exporter reads.")
        fam.add_metric([], info)
        yield fam
        yield GaugeMetricFamily("kvstore_block_tokens", "Tokens per block.",
                                value=store.config.block_tokens)
        gauges = {
            "entries": ("kvstore_entries", "Blocks held, by tier."),
            "bytes": ("kvstore_bytes", "Bytes a tier's blocks take against its budget."),
            "raw_bytes": ("kvstore_raw_bytes", "Uncompressed bytes of a tier's blocks."),
            "budget": ("kvstore_budget_bytes", "A tier's byte budget."),
        }
        fams = {k: GaugeMetricFamily(name, doc, labels=["tier"]) for k, (name, doc) in gauges.items()}
        block_bytes = 0
        for tier in store.tiers:
            u = tier.usage()
            for k, f in fams.items():
                f.add_metric([tier.name], getattr(u, k))
            if u.entries:
                block_bytes = u.raw_bytes // u.entries  # every block of a store has one layout
        yield from fams.values()
        for tier in store.tiers:
            status = getattr(tier, "status", None)  # a tier on a server says whether it answers
            if status is not None:
                yield GaugeMetricFamily(f"kvstore_{tier.name}_reachable",
                                        "1 while the tier's server answers, 0 while its breaker is open.",
                                        value=1 if status()["reachable"] else 0)
        if block_bytes:
            yield GaugeMetricFamily("kvstore_block_bytes", "Uncompressed bytes of one block.",
                                    value=block_bytes)
        for name, series in sorted(_counter_series(store, self.process_counters).items()):
            names = list(DECLARED[name].labels)
            fam = CounterMetricFamily(f"kvstore_{name}", DECLARED[name].help, labels=names)
            for labels, value in sorted(series.items()):
                d = dict(labels)
                fam.add_metric([d.get(n, "") for n in names], value)
            yield fam
        if not self.process_counters:  # histograms are not persisted: a tool has none to show
            return
        for name, series in sorted(store.metrics.snapshot()["histograms"].items()):
            names = list(DECLARED[name].labels)
            fam = HistogramMetricFamily(f"kvstore_{name}", DECLARED[name].help, labels=names)
            for labels, h in sorted(series.items()):
                d, cum, buckets = dict(labels), 0, []
                for bound, count in zip((*h["buckets"], float("inf")), h["counts"]):
                    cum += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cum))
                fam.add_metric([d.get(n, "") for n in names], buckets, h["sum"])
            yield fam
