"""The store's own records, beside the blocks: settings, namespace names, lifetime counters and
the removal log. The store keeps them in one ``Ledger``; the disk tier's package provides the
durable one (in the same LMDB environment, so every process sees them), ``MemoryLedger`` serves
a store without a durable tier.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol


class Ledger(Protocol):
    durable: bool  # survives the process and is shared with other processes on the machine

    def settings(self) -> dict[str, Any]:
        """The stored settings (see settings.py); empty for a new store."""

    def save_settings(self, values: Mapping[str, Any]) -> None:
        """Stores ``values`` (JSON-able), replacing those keys."""

    def register_namespace(self, ns_id: int, name: str) -> None:
        """Remembers the name of a namespace id (written by the next ``flush``), for tools."""

    def namespaces(self) -> dict[int, str]: ...

    def add_counters(self, deltas: Mapping[str, float]) -> None:
        """Adds ``deltas`` (``Metrics.flat`` series -> increment) to the lifetime counters."""

    def counters(self) -> dict[str, float]:
        """Lifetime counters summed over every process that used the store."""

    def removal_epoch(self) -> int:
        """How many removal batches (purges, corrupt records) the store has logged."""

    def removals_since(self, epoch: int) -> tuple[int, set[bytes] | None]:
        """``(current epoch, keys removed after epoch)``; None: the log does not reach back that
        far, drop everything."""

    def flush(self) -> None:
        """Writes what is pending (namespace names). Never raises for a fault of the medium."""

    def close(self) -> None: ...


class MemoryLedger:
    """A ledger that lives and dies with the process (no other process can purge its blocks)."""

    durable = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settings: dict[str, Any] = {}
        self._names: dict[int, str] = {}
        self._counters: dict[str, float] = {}

    def settings(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._settings)

    def save_settings(self, values: Mapping[str, Any]) -> None:
        with self._lock:
            self._settings.update(values)

    def register_namespace(self, ns_id: int, name: str) -> None:
        with self._lock:
            self._names[ns_id] = name

    def namespaces(self) -> dict[int, str]:
        with self._lock:
            return dict(self._names)

    def add_counters(self, deltas: Mapping[str, float]) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._counters[k] = self._counters.get(k, 0.0) + v

    def counters(self) -> dict[str, float]:
        with self._lock:
            return dict(self._counters)

    def removal_epoch(self) -> int:
        return 0

    def removals_since(self, epoch: int) -> tuple[int, set[bytes] | None]:
        return epoch, set()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
