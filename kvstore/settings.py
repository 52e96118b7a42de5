"""Settings stored with the data: every process that opens a store runs with the same ones.

Written when a store is created (and the block layout when it is first known), kept in the
store's ledger, shown by tools without any config. The rule when a store is opened:

- ``block_tokens``, ``block_shape``, ``dtype`` (what the keys and the records mean): an opener
  that names a different value is refused (``SettingsMismatchError`` naming the key and both
  values); one that names none runs with the stored value.
- ``disk_bytes``, ``disk_ttl_s``, ``compression``, ``zstd_level``, ``byte_split`` (policy): the
  stored value wins unless the opener names one explicitly, which is then stored; the disk tier
  reads the stored budget and TTL in every write transaction, so all processes enforce the
  latest one. (Records are self-describing: a codec change applies to new records only.)
- RAM tier budgets and TTLs (``host_*``, ``device_*``) are each process's own memory: not stored.
"""

from __future__ import annotations

from typing import Any

from .config import StoreConfig
from .errors import SettingsMismatchError

FIXED = ("block_tokens", "block_shape", "dtype")
POLICY = ("disk_bytes", "disk_ttl_s", "compression", "zstd_level", "byte_split")


def _plain(key: str, value: Any) -> Any:
    """The stored (JSON) form of a setting."""
    return list(value) if key == "block_shape" and value is not None else value


def _from_stored(key: str, value: Any) -> Any:
    return tuple(value) if key == "block_shape" else value


def resolve(config: StoreConfig, stored: dict[str, Any]) -> tuple[StoreConfig, dict[str, Any]]:
    """The config a store opened with ``config`` runs with, and the settings to store.

    Raises:
        SettingsMismatchError: ``config`` names a block size or layout the store was not made with.
    """
    adopt: dict[str, Any] = {}
    save: dict[str, Any] = {}
    for key in FIXED:
        mine, theirs = getattr(config, key), stored.get(key)
        if theirs is None:
            if mine is not None:
                save[key] = _plain(key, mine)
            continue
        theirs = _from_stored(key, theirs)
        if key in config.explicit and mine != theirs:
            raise SettingsMismatchError(
                f"{key}: this store ({config.path}) was created with {key}={_show(theirs)}; "
                f"the config asks for {_show(mine)}: open it with {key}={_show(theirs)} (or "
                f"leave {key} unset) or use another path"
            )
        adopt[key] = theirs
    for key in POLICY:
        if key in stored and key not in config.explicit:
            adopt[key] = stored[key]
        elif stored.get(key) != getattr(config, key):
            save[key] = getattr(config, key)
    return config.adopt(adopt), save


def layout_settings(block_shape: tuple[int, ...], dtype: str) -> dict[str, Any]:
    """What to store when the block layout becomes known (the first put)."""
    return {"block_shape": _plain("block_shape", block_shape), "dtype": dtype}


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
