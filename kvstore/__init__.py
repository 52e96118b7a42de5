"""kvstore: a tiered, prefix-keyed store for the KV attention cache of LLM inference engines.

Hot blocks live in a host-memory slab, cold blocks zstd-compressed in LMDB on local SSD; keys
are chained over 64-token blocks so that only a common prompt prefix hits.
"""

from .config import StoreConfig
from .errors import (ConfigError, CorruptEntryError, IncompatibleFormatError, KVStoreError,
                     StoreOpenError)
from .keys import block_keys, make_namespace
from .store import KVStore, Match

__all__ = [
    "KVStore", "Match", "StoreConfig", "block_keys", "make_namespace",
    "KVStoreError", "ConfigError", "CorruptEntryError", "IncompatibleFormatError",
    "StoreOpenError",
]
__version__ = "0.1.0"
