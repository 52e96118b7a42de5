"""The one place where the commands reach into a store.

Every read a command makes (listing the disk tier's entries, namespace names, usage, lifetime
counters, one record, whether keys are held) and the one write (purge) goes through
``StoreView``. A view opens the store read-only (no RAM tiers, no threads, nothing written: it
works on a read-only mount) unless the command removes blocks.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from kvstore import KVStore, KVStoreError, StoreConfig
from kvstore.store import PurgePlan
from kvstore.config import ENV_PREFIX
from kvstore.eviction import EntryMeta
from kvstore.tiers.disk import LMDBEnv


def config(args: argparse.Namespace, path: str | None = None) -> StoreConfig:
    """The engine's settings for the store at ``path`` (default: --path, KVSTORE_PATH, or the
    path in the config file).

    Read as the engine reads them: --config (or KVSTORE_CONFIG) and the KVSTORE_* variables that
    StoreConfig knows; other KVSTORE_* variables belong to other components and are ignored.

    Raises:
        KVStoreError: no store given, or a bad setting.
    """
    known = {ENV_PREFIX + k.upper() for k in StoreConfig.keys()} | {ENV_PREFIX + "CONFIG"}
    env = {k: v for k, v in os.environ.items() if k in known and v}
    if args.config:
        env[ENV_PREFIX + "CONFIG"] = args.config
    path = path or args.path or env.get(ENV_PREFIX + "PATH")
    if not path and ENV_PREFIX + "CONFIG" not in env:
        raise KVStoreError("no store given: pass --path DIR (or --config FILE), or set KVSTORE_PATH")
    overrides = {"path": path} if path else {}  # else the config file names it
    # Tools never put: no RAM (or GPU) slab and no write-behind staging memory.
    return StoreConfig.from_env(env, host_bytes=0, device_bytes=0, write_queue_bytes=0, io_threads=1,
                                **overrides)


def store_given(args: argparse.Namespace) -> bool:
    """Whether the command line or the environment names a store."""
    return bool(args.path or args.config or os.environ.get(ENV_PREFIX + "PATH")
                or os.environ.get(ENV_PREFIX + "CONFIG"))


class StoreView:
    """A store as the commands see it: the disk tier's entries and records, and purge.

    Use as a context manager (``with open_view(args) as view``); the store closes on exit.
    """

    def __init__(self, store: KVStore):
        self.store = store  # serve-metrics hands it to the exporter
        self._disk = store.tier("disk")  # the durable tier: what outlives the engines
        self.path = str(store.config.path)
        self.block_tokens = store.config.block_tokens
        self.ttl_s = store.config.disk_ttl_s
        self.namespace = store.config.namespace  # the configured default namespace

    def __enter__(self) -> StoreView:
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()

    def entries(self) -> list[tuple[bytes, EntryMeta]]:
        """Every block the disk tier holds, with its metadata."""
        return self._disk.entries()

    def remote(self) -> dict[str, Any] | None:
        """The remote tier's server, reachability and usage under this store's prefix (None
        without ``remote_url``)."""
        tier = self.store.tier("remote")
        if tier is None:
            return None
        u = tier.usage()
        return {**tier.status(), "entries": u.entries, "bytes": u.bytes, "raw_bytes": u.raw_bytes}

    def namespaces(self) -> dict[int, str]:
        """Namespace id -> name, for every namespace the store has seen."""
        return self.store.namespaces()

    def usage(self) -> Any:
        """The disk tier's entries, bytes (stored and raw) and budget."""
        return self._disk.usage()

    def file_usage(self) -> dict[str, int]:
        """The disk tier's data file: its size, and what inside it holds data or is free for
        reuse (``LMDBEnv.file_usage``)."""
        return self._disk.env.file_usage()

    def settings(self) -> dict[str, Any]:
        """The settings stored with the data (block size, budget, TTL, codec, layout)."""
        return self.store.settings()

    def counters(self) -> dict[str, float]:
        """The persisted lifetime counters (``name|label=value,...`` -> value)."""
        return self.store.lifetime_counters()

    def read_record(self, key: bytes) -> tuple[bytes, EntryMeta] | None:
        """One record and its metadata (one short read transaction), or None if not held."""
        return self._disk.read_record(key)

    def contains_many(self, keys: list[bytes], now: float) -> list[bool]:
        """Whether each key is held (and not expired at ``now``)."""
        return self._disk.contains_many(keys, now)

    def plan_purge(self, **criteria: Any) -> PurgePlan:
        """What a purge with ``criteria`` (``KVStore.plan_purge``'s) removes, cascade included."""
        return self.store.plan_purge(**criteria)

    def remove(self, keys: frozenset[bytes], reason: str = "purge") -> int:
        """Removes exactly ``keys`` (a plan's) for ``reason`` (``KVStore.remove``'s); returns
        how many blocks went."""
        return self.store.remove(keys, reason)


def open_view(args: argparse.Namespace, writable: bool = False) -> StoreView:
    """Opens the store named by the arguments without creating one; read-only unless
    ``writable`` (a command that removes blocks).

    Raises:
        KVStoreError: no path, not a store, a newer format, or an unusable directory.
    """
    cfg = config(args)
    _check_is_store(str(cfg.path))
    store = KVStore.open(cfg, readonly=not writable)
    if store.tier("disk") is None:
        store.close()
        raise KVStoreError(f"{cfg.path}: the config disables the disk tier (disk_bytes = 0)")
    return StoreView(store)


def compact(args: argparse.Namespace, progress=None) -> dict[str, dict[str, int]]:
    """Compacts the disk tier of the store named by the arguments (``LMDBEnv.compact``), which
    no other process may have open meanwhile; ``progress(done, total)`` as there.

    Raises:
        KVStoreError: not a store, in use by other processes (``StoreBusyError``, naming them),
            or the copy failed (the store is left as it was).
    """
    cfg = config(args)
    _check_is_store(str(cfg.path))
    env = LMDBEnv(os.path.join(cfg.path, "disk"), 2 * cfg.disk_bytes, exclusive=True)
    try:
        return env.compact(progress)
    finally:
        env.close()


def _check_is_store(path: str) -> None:
    data = os.path.join(path, "disk", "data.mdb")
    if not os.path.isfile(data):
        raise KVStoreError(f"{path}: not a kvstore store (no disk/data.mdb inside)")
    if not _is_lmdb(data):
        # LMDB would format an empty or foreign file as a new environment: never write there.
        raise KVStoreError(f"{path}: not a kvstore store (disk/data.mdb is not an LMDB file)")


# An LMDB data file starts with a meta page: a 16-byte page header, then this magic number.
_LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little")


def _is_lmdb(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(20)[16:20] == _LMDB_MAGIC
    except OSError:
        return True  # unreadable: the open says why


def namespace_names(args: argparse.Namespace) -> list[str]:
    """The names of the namespaces the store named by the arguments has seen (opened briefly)."""
    with open_view(args) as view:
        return list(view.namespaces().values())
