"""The removal log: what other processes must drop from their RAM tiers.

A purge or a corrupt record removes a block for good: a RAM copy in another process would keep
serving it. Each such removal bumps an epoch and logs the keys (the last ``LOG_EPOCHS``
removals) in the same transaction; stores poll the epoch (one small read) and drop those keys
from their private tiers. A reader whose epoch is older than the log drops everything.
"""

from __future__ import annotations

import struct

_U64 = struct.Struct("<Q")
_EPOCH = struct.Struct(">Q")
LOG_EPOCHS = 256  # removal batches remembered


class RemovalLog:
    def __init__(self, env):
        self.env = env

    # Handles are looked up on use: a forked child's reopened environment has new ones.
    _info = property(lambda self: self.env.dbs[b"info"])
    _log = property(lambda self: self.env.dbs[b"purges"])

    def log(self, txn, keys: list[bytes]) -> None:
        """Records ``keys`` as removed, inside the transaction that removes them."""
        raw = txn.get(b"purge_epoch", db=self._info)
        epoch = (_U64.unpack(raw)[0] if raw else 0) + 1
        txn.put(b"purge_epoch", _U64.pack(epoch), db=self._info)
        txn.put(_EPOCH.pack(epoch), b"".join(keys), db=self._log)
        old = epoch - LOG_EPOCHS
        if old > 0:
            txn.delete(_EPOCH.pack(old), db=self._log)

    def epoch(self) -> int:
        """How many removal batches this store has ever logged (by any process)."""
        with self.env.reading() as txn:
            raw = txn.get(b"purge_epoch", db=self._info)
        return _U64.unpack(raw)[0] if raw else 0

    def since(self, epoch: int) -> tuple[int, set[bytes] | None]:
        """``(current epoch, keys removed after epoch)``; None for the keys when the log no
        longer reaches back that far (drop everything)."""
        with self.env.reading() as txn:
            raw = txn.get(b"purge_epoch", db=self._info)
            now = _U64.unpack(raw)[0] if raw else 0
            keys: set[bytes] | None = set()
            for e in range(epoch + 1, now + 1):
                rec = txn.get(_EPOCH.pack(e), db=self._log)
                if rec is None:
                    return now, None
                rec = bytes(rec)
                keys.update(rec[i:i + 16] for i in range(0, len(rec), 16))
        return now, keys
