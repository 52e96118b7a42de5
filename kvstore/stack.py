"""The default tier stack a store opens from its config: device -> host -> disk -> remote
(when ``remote_url`` is set).

The only module besides the tiers themselves that names concrete tiers: the store loops over
whatever list it is given (``KVStore(config, tiers=..., ledger=...)`` injects another).
"""

from __future__ import annotations

import dataclasses

from . import settings
from .codec import Codec
from .config import StoreConfig
from .ledger import Ledger, MemoryLedger
from .metrics import Metrics
from .tiers.base import Tier
from .tiers.disk import DiskLedger, DiskTier, LMDBEnv
from .tiers.slab import SlabTier


@dataclasses.dataclass
class Stack:
    config: StoreConfig  # resolved against the stored settings
    tiers: list[Tier]  # fastest first
    ledger: Ledger


def open_stack(config: StoreConfig, metrics: Metrics, readonly: bool = False) -> Stack:
    """Opens the tiers ``config`` enables, with the settings stored in the store.

    Read-only: no RAM tiers, nothing created or written (the remote tier is read).

    Raises:
        StoreOpenError, IncompatibleFormatError: from the disk tier.
        SettingsMismatchError: ``config`` names another block size or layout than the store's.
    """
    env = None
    ledger: Ledger = MemoryLedger()
    if config.disk_bytes > 0:
        disk_dir = config.path / "disk"
        if not readonly:
            disk_dir.mkdir(mode=0o700, exist_ok=True)
        env = LMDBEnv(disk_dir, 2 * config.disk_bytes, readonly=readonly)
        ledger = DiskLedger(env, metrics)  # closes env, after the tiers
    try:
        config, save = settings.resolve(config, ledger.settings())
    except Exception:
        ledger.close()
        raise
    if save and not readonly:
        ledger.save_settings(save)
    tiers: list[Tier] = []
    if not readonly:
        if config.device_bytes > 0:
            tiers.append(SlabTier("device", config.device_bytes, config.device_ttl_s,
                                  device=config.resolved_device(), metrics=metrics))
        if config.host_bytes > 0:
            tiers.append(SlabTier("host", config.host_bytes, config.host_ttl_s, device="cpu",
                                  metrics=metrics))
    if env is not None:
        # One zstd thread a block: the io_threads writers already encode blocks in parallel, and
        # two writers each on two zstd threads encoded 1.4 MiB blocks at 1.26 GB/s against 1.75.
        codec = Codec(config.compression, config.zstd_level, config.byte_split, threads=1)
        tiers.append(DiskTier(None, config.disk_bytes, config.disk_ttl_s, codec, metrics, env=env))
    if config.remote_url:  # read-only too: tools show and purge what the fleet shares
        from .tiers.remote import RemoteTier  # only a store with a remote tier imports the client
        # Byte planes only help compression: a "none" record is the block verbatim.
        codec = Codec(config.remote_compression, config.zstd_level,
                      config.remote_compression != "none" and config.byte_split, config.io_threads)
        tiers.append(RemoteTier(config.remote_url, config.remote_ttl_s, config.remote_timeout_s,
                                codec, metrics, encode_threads=config.io_threads))
    return Stack(config, tiers, ledger)
