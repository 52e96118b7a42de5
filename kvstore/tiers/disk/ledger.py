"""DiskLedger: the store's own records in the disk tier's LMDB environment (see ledger.py).

Databases: ``settings`` name -> JSON value; ``namespaces`` id -> name; ``counters`` series ->
float64; the removal log (removals.py). Faults (full disk, I/O errors) are counted as
``io_errors{tier="disk"}`` and lose only what they were writing.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Mapping
from typing import Any

from ...codec import Codec, dtype_name
from ...metrics import Metrics
from .env import LMDBEnv, LMDBError
from .removals import RemovalLog

_NS = struct.Struct(">Q")
_F64 = struct.Struct("<d")


class DiskLedger:
    durable = True

    def __init__(self, env: LMDBEnv, metrics: Metrics | None = None):
        self.env = env
        self.metrics = metrics or Metrics()
        self.removals = RemovalLog(env)
        self._lock = threading.Lock()
        self._new_names: dict[int, str] = {}
        self._known_names: set[int] = set()

    # Handles are looked up on use: a forked child's reopened environment has new ones.
    _names_db = property(lambda self: self.env.dbs[b"namespaces"])
    _counters_db = property(lambda self: self.env.dbs[b"counters"])
    _settings_db = property(lambda self: self.env.dbs[b"settings"])

    def _locked_write(self, fn, durable: bool = True) -> bool:
        if self.env.readonly:
            return False
        with self.env.lock:
            self.env.check_pid()
            try:
                self.env.write(fn, durable=durable)
                return True
            except (LMDBError, OSError):
                self.metrics.add("io_errors", tier="disk")
                return False

    # -- settings ----------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Stored settings; for a store made before settings were stored, the block layout is
        read from one record's header (self-describing) so the store still refuses another."""
        with self.env.reading() as txn:
            out = {} if self._settings_db is None else {
                bytes(k).decode(): json.loads(bytes(v)) for k, v in txn.cursor(db=self._settings_db)}
            if "block_shape" not in out:
                for _, rec in txn.cursor(db=self.env.dbs[b"records"]):
                    try:
                        h = Codec.read_header(rec)
                    except Exception:  # a damaged record: verify reports it; layout stays unknown
                        break
                    out["block_shape"], out["dtype"] = list(h["shape"]), dtype_name(h["torch_dtype"])
                    break
        return out

    def save_settings(self, values: Mapping[str, Any]) -> None:
        def txn_fn(txn):
            for k, v in values.items():
                txn.put(k.encode(), json.dumps(v).encode(), db=self._settings_db)
        self._locked_write(txn_fn)

    # -- namespaces ------------------------------------------------------------------------------
    def register_namespace(self, ns_id: int, name: str) -> None:
        if ns_id not in self._known_names:
            with self._lock:
                self._new_names[ns_id] = name
                self._known_names.add(ns_id)

    def namespaces(self) -> dict[int, str]:
        with self.env.reading() as txn:
            return {_NS.unpack(bytes(k))[0]: bytes(v).decode() for k, v in txn.cursor(db=self._names_db)}

    def flush(self) -> None:
        with self._lock:
            names = dict(self._new_names)
        if not names:
            return

        def txn_fn(txn):
            for ns_id, name in names.items():
                txn.put(_NS.pack(ns_id), name.encode(), db=self._names_db, overwrite=False)
        if self._locked_write(txn_fn):
            with self._lock:
                for ns_id in names:
                    self._new_names.pop(ns_id, None)

    # -- lifetime counters -------------------------------------------------------------------------
    def add_counters(self, deltas: Mapping[str, float]) -> None:
        if not deltas:
            return

        def txn_fn(txn):
            for name, delta in deltas.items():
                key = name.encode()
                raw = txn.get(key, db=self._counters_db)
                old = _F64.unpack(raw)[0] if raw else 0.0
                txn.put(key, _F64.pack(old + delta), db=self._counters_db)
        self._locked_write(txn_fn, durable=False)  # counters: the next commit carries them

    def counters(self) -> dict[str, float]:
        with self.env.reading() as txn:
            return {bytes(k).decode(): _F64.unpack(v)[0] for k, v in txn.cursor(db=self._counters_db)}

    # -- removals ------------------------------------------------------------------------------------
    def removal_epoch(self) -> int:
        return self.removals.epoch()

    def removals_since(self, epoch: int) -> tuple[int, set[bytes] | None]:
        return self.removals.since(epoch)

    def close(self) -> None:
        """Writes pending names and closes the environment (after the tiers that share it)."""
        self.flush()
        self.env.close()
