"""The disk tier: cold blocks as compressed, checksummed records in one LMDB environment.

Split by job: ``env`` (the environment and every LMDB rule; the only module importing ``lmdb``),
``schema`` (how a block and the totals are laid out), ``tier`` (budget, LRU, TTL, pins),
``removals`` (what other processes must drop from RAM) and ``ledger`` (the store's own records:
settings, namespace names, lifetime counters).
"""

from .env import DISK_FORMAT_VERSION, LMDBEnv
from .ledger import DiskLedger
from .schema import entry_cost
from .tier import DiskTier

__all__ = ["DISK_FORMAT_VERSION", "DiskLedger", "DiskTier", "LMDBEnv", "entry_cost"]
