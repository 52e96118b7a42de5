"""StoreConfig: the one typed, frozen configuration of a store.

Built from keyword arguments, a TOML file (``StoreConfig.from_file``) or ``KVSTORE_*`` environment
variables (``StoreConfig.from_env``). Sizes accept ``"512MiB"``/``"10GB"`` or integers (bytes);
durations accept ``"90s"``/``"6h"``/``"2d"`` or numbers (seconds). Any unknown key or bad value
raises ``ConfigError`` naming the key and what is allowed; nothing silently falls back.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .codec import DTYPES as _TORCH_DTYPES
from .errors import ConfigError
from .lazy_torch import torch

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")

COMPRESSIONS = ("zstd-hi", "zstd", "none")
DTYPES = tuple(_TORCH_DTYPES)
ENV_PREFIX = "KVSTORE_"
# Settings stored with the data when a store is created (settings.py says how an opener's value
# and the stored one combine); a config that leaves one unset (None) gets the stored value, or
# this default for a new store.
STORED_DEFAULTS: dict[str, Any] = {
    "block_tokens": 64, "disk_bytes": 16 << 30, "disk_ttl_s": 86400.0,
    "compression": "zstd-hi", "zstd_level": 1, "byte_split": True,
}


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from an int or a string like ``"512MiB"``; raises ConfigError naming ``key``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as 1073741824 or '1GiB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _QUANTITY.match(str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ConfigError(
                f"{key}: expected a size such as 1073741824, '512MiB' or '10GB', got {value!r}"
            )
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n < 0:
        raise ConfigError(f"{key}: expected a size >= 0, got {value!r}")
    return n


def parse_duration(value: Any, key: str = "duration") -> float:
    """Seconds from a number or a string like ``"90s"``, ``"6h"``, ``"2d"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration such as 3600 or '6h', got {value!r}")
    if isinstance(value, (int, float)):
        s = float(value)
    else:
        m = _QUANTITY.match(str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _DURATION_UNITS:
            raise ConfigError(
                f"{key}: expected a duration such as 3600, '90s', '6h' or '2d', got {value!r}"
            )
        s = float(m.group(1)) * _DURATION_UNITS[unit]
    if not math.isfinite(s) or s < 0:
        raise ConfigError(f"{key}: expected a finite duration >= 0, got {value!r}")
    return s


def _parse_int(value: Any, key: str, lo: int, hi: int) -> int:
    try:
        n = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        n = None
    if n is None or not lo <= n <= hi:
        raise ConfigError(f"{key}: expected an integer in [{lo}, {hi}], got {value!r}")
    return n


def _parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _parse_choice(value: Any, key: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _parse_shape(value: Any, key: str) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [p for p in re.split(r"[,x\s]+", value.strip("()[] ")) if p]
    try:
        dims = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(f"{key}: expected positive dimensions such as '30,2,3,64,64', got {value!r}")
    return dims


_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def parse_url(value: Any, key: str = "remote_url") -> str:
    """Each comma-separated seed must be redis://host:port, rediss://... or unix:///path."""
    import urllib.parse
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a URL string, got {type(value).__name__}")
    for u in filter(None, (s.strip() for s in value.split(","))):
        p = urllib.parse.urlsplit(u)
        try:
            port_ok = p.port is not None or True  # a port, if given, must be a number
        except ValueError:
            port_ok = False
        ok = port_ok and ((p.scheme in ("redis", "rediss") and p.hostname) or (p.scheme == "unix" and p.path))
        if not ok:
            shown = u if p.password is None else u.replace(p.password, "***")
            raise ConfigError(f"{key}: expected {', '.join(s + '...' for s in _URL_SCHEMES)} or a "
                              f"comma-separated list of redis:// cluster seeds, got {shown!r}")
    return value.strip()


def _parse_device(value: Any) -> str:
    text = str(value).strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", text):
        raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return text


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Everything a store needs to open.

    Attributes:
        path: directory of the store (created owner-only if missing).
        block_tokens: tokens per block; only full blocks are cached.
        namespace: default namespace for calls that pass none (see ``keys.make_namespace``).
        device: torch device of the hot tier (``"auto"``: ``"cuda"`` when present, else ``"cpu"``).
        device_bytes: budget of the device (hot) tier; 0 (the default) disables it.
        host_bytes: budget of the host (RAM) tier; 0 disables it.
        disk_bytes: budget of the disk tier's stored records; 0 disables it.
        device_ttl_s / host_ttl_s / disk_ttl_s: idle time after which a block is no longer served.
        write_queue_bytes: staging memory of the write-behind queue; a put that finds it full
            is dropped and counted, so ``put`` never waits for disk I/O.
        io_threads: background threads that compress, write and load (zstd and LMDB release
            the GIL, so 2 use both cores of a small machine). Each disk writer keeps a 40 MiB
            buffer for its batch's records.
        compression: disk records: ``"zstd-hi"`` (the default: zstd on the high byte planes
            only, the low ones raw; each writer encodes its blocks on one thread), ``"zstd"`` (zstd on
            every plane, the version-1 format of stores created before) or ``"none"``. Chosen
            when a store is created and stored with its settings; every format is read.
        zstd_level: zstd level (1 is the measured sweet spot: higher levels gain nothing on KV).
        byte_split: split 16/32-bit values into byte planes before compressing.
        remote_url: the shared remote tier's server (``redis://``, ``rediss://``, ``unix://``,
            or comma-separated cluster seeds); empty (the default): no remote tier. A password
            goes in the URL or ``$KVSTORE_REMOTE_PASSWORD``.
        remote_ttl_s: idle time after which the server drops a block (refreshed on a hit).
        remote_timeout_s: the most a request waits on the remote server.
        remote_compression: remote records: ``"none"`` (the default: the block's bytes as they
            are, read off the socket straight into the destination; measured faster than any
            codec here when the link runs at GB/s) or ``"zstd-hi"``/``"zstd"`` (0.7x the bytes
            on the server and the wire, for a server short of memory or a slow link). Each
            machine chooses for itself: every record says how it was written.
        block_shape / dtype: the layout of every block; when None they are fixed by the first
            block the store sees.

    block_tokens, disk_bytes, disk_ttl_s, compression, zstd_level, byte_split, block_shape and
    dtype are stored with the data when a store is created; one left unset (None) takes the
    stored value, or its ``STORED_DEFAULTS`` value for a new store (settings.py has the rule).
    """

    path: Path
    block_tokens: int | None = None
    namespace: str = "default"
    device: str = "auto"
    device_bytes: int = 0
    device_ttl_s: float = 3600.0
    host_bytes: int = 1 << 30
    disk_bytes: int | None = None
    host_ttl_s: float = 3600.0
    disk_ttl_s: float | None = None
    compression: str | None = None
    zstd_level: int | None = None
    byte_split: bool | None = None
    write_queue_bytes: int = 256 << 20
    io_threads: int = 2
    remote_url: str = ""
    remote_ttl_s: float = 86400.0
    remote_timeout_s: float = 0.15
    remote_compression: str = "none"
    block_shape: tuple[int, ...] | None = None
    dtype: str | None = None
    # The stored settings (STORED_DEFAULTS' keys, block_shape, dtype) this config names itself;
    # the others take the store's stored values (settings.py). Set by __post_init__.
    explicit: frozenset[str] = dataclasses.field(default=frozenset(), init=False, compare=False,
                                                 repr=False)

    def __post_init__(self) -> None:
        if self.path is None or str(self.path) == "":
            raise ConfigError("path: expected the store directory, got nothing")
        given = frozenset(k for k in (*STORED_DEFAULTS, "block_shape", "dtype")
                          if getattr(self, k) is not None)
        for key, default in STORED_DEFAULTS.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        object.__setattr__(self, "explicit", given)
        norm = {
            "path": Path(os.path.expanduser(str(self.path))),
            "block_tokens": _parse_int(self.block_tokens, "block_tokens", 1, 1 << 20),
            "namespace": self.namespace,
            "device": _parse_device(self.device),
            "device_bytes": parse_size(self.device_bytes, "device_bytes"),
            "device_ttl_s": parse_duration(self.device_ttl_s, "device_ttl_s"),
            "host_bytes": parse_size(self.host_bytes, "host_bytes"),
            "disk_bytes": parse_size(self.disk_bytes, "disk_bytes"),
            "host_ttl_s": parse_duration(self.host_ttl_s, "host_ttl_s"),
            "disk_ttl_s": parse_duration(self.disk_ttl_s, "disk_ttl_s"),
            "compression": _parse_choice(self.compression, "compression", COMPRESSIONS),
            "zstd_level": _parse_int(self.zstd_level, "zstd_level", 1, 22),
            "byte_split": _parse_bool(self.byte_split, "byte_split"),
            "write_queue_bytes": parse_size(self.write_queue_bytes, "write_queue_bytes"),
            "io_threads": _parse_int(self.io_threads, "io_threads", 1, 64),
            "remote_url": parse_url(self.remote_url),
            "remote_ttl_s": parse_duration(self.remote_ttl_s, "remote_ttl_s"),
            "remote_timeout_s": parse_duration(self.remote_timeout_s, "remote_timeout_s"),
            "remote_compression": _parse_choice(self.remote_compression, "remote_compression",
                                                COMPRESSIONS),
            "block_shape": None if self.block_shape is None
            else _parse_shape(self.block_shape, "block_shape"),
            "dtype": None if self.dtype is None else _parse_choice(str(self.dtype), "dtype", DTYPES),
        }
        if norm["remote_timeout_s"] <= 0 or norm["remote_timeout_s"] > 60:
            raise ConfigError(f"remote_timeout_s: expected a duration in (0, 60] seconds, got "
                              f"{self.remote_timeout_s!r}")
        if norm["remote_url"] and norm["remote_ttl_s"] < 1:
            raise ConfigError(f"remote_ttl_s: expected at least 1 second (the server's expiry), "
                              f"got {self.remote_ttl_s!r}")
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigError(f"namespace: expected a non-empty string, got {self.namespace!r}")
        for key, value in norm.items():
            object.__setattr__(self, key, value)

    def resolved_device(self) -> str:
        """The torch device of the device tier (``"auto"`` resolved)."""
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def adopt(self, values: Mapping[str, Any]) -> StoreConfig:
        """A copy with ``values`` (stored settings) in place of this config's defaults; what the
        config names explicitly stays as it is. (``dataclasses.replace`` would mark every
        setting explicit.)"""
        new = copy.copy(self)
        for key, value in values.items():
            object.__setattr__(new, key, value)
        return new

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> StoreConfig:
        """Builds a config from plain values; unknown keys raise ConfigError naming them."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(cls.keys())}"
            )
        if "path" not in values:
            raise ConfigError(f"{source}: missing required key 'path' (the store directory)")
        return cls(**values)

    @classmethod
    def from_file(cls, file: str | os.PathLike, **overrides: Any) -> StoreConfig:
        """Reads a TOML file of top-level keys (or a ``[kvstore]`` table); overrides win.

        A relative ``path`` in the file is taken relative to the file's directory.
        """
        file = Path(file)
        try:
            data = tomllib.loads(file.read_text())
        except OSError as e:
            raise ConfigError(f"{file}: cannot read config file: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{file}: not valid TOML: {e}") from None
        if set(data) == {"kvstore"} and isinstance(data["kvstore"], dict):
            data = data["kvstore"]
        if "path" in data and not os.path.isabs(os.path.expanduser(str(data["path"]))):
            data["path"] = file.parent / str(data["path"])
        return cls.from_mapping({**data, **overrides}, source=str(file))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> StoreConfig:
        """Reads ``KVSTORE_<KEY>`` variables (``KVSTORE_CONFIG`` names a TOML file read first).

        Precedence: overrides > environment > file. Unknown ``KVSTORE_*`` variables raise.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, value in env.items():
            if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
                continue
            key = name[len(ENV_PREFIX):].lower()
            if key not in cls.keys():
                raise ConfigError(
                    f"{name}: unknown setting; allowed: "
                    + ", ".join(ENV_PREFIX + k.upper() for k in cls.keys())
                )
            values[key] = value
        values.update(overrides)
        if env.get(ENV_PREFIX + "CONFIG"):
            return cls.from_file(env[ENV_PREFIX + "CONFIG"], **values)
        return cls.from_mapping(values, source="environment")
