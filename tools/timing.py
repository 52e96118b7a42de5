"""Timing for the benchmarks: the best of repeated runs, so that figures show what the machine
can do rather than its noise."""

from __future__ import annotations

import time
from collections.abc import Callable


def best(fn: Callable[[], object], repeat: int = 5, setup: Callable[[], object] | None = None) -> float:
    """Best wall time of ``repeat`` runs (the machine's capability, not its noise); ``setup``
    runs untimed before each."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
