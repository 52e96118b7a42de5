"""Counters and histograms of one store process, pulled as snapshots.

The store and its tiers only count; exporters (Prometheus, the dashboard) live in tools/ and
render ``Metrics.snapshot()``. Names follow Prometheus conventions without the ``kvstore_``
prefix and ``_total`` suffix, which exporters add.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]

# Seconds: from a host-tier copy (sub-ms) to a cold multi-block disk load.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """Thread-safe counters (monotonic) and fixed-bucket histograms."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hists: dict[str, dict[Labels, list]] = defaultdict(dict)

    def add(self, name: str, value: float = 1, **labels: str) -> None:
        """Adds ``value`` (>= 0) to counter ``name`` with ``labels``."""
        if not value:
            return
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Records one observation in histogram ``name`` (buckets: LATENCY_BUCKETS)."""
        key = tuple(sorted(labels.items()))
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
