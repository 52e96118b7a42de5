"""API keys -> tenant salts for the HTTP server.

The key file is TOML, one ``"API-KEY" = "TENANT-SALT"`` line a key (several keys may share a
salt: one tenant, several keys). The salt goes into the cache namespace
(``kvstore.make_namespace(tenant_salt=...)``), so two tenants never share a block. Without a key
file every request is the one tenant ``""``.
"""

from __future__ import annotations

import hmac
import tomllib
from pathlib import Path

__all__ = ["Tenants"]


class Tenants:
    """Who a request is. ``keys`` None: a single tenant, no key needed."""

    def __init__(self, keys: dict[str, str] | None = None):
        self.keys = keys

    @classmethod
    def from_file(cls, path: str | Path) -> Tenants:
        """Reads a key file.

        Raises:
            ValueError: unreadable, not TOML, empty, or a key or salt that is not a non-empty string.
        """
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"key file {path}: cannot read: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"key file {path}: not TOML: {e}") from None
        if not data:
            raise ValueError(f'key file {path}: no keys; expected lines "API-KEY" = "TENANT-SALT"')
        for k, v in data.items():
            if not k or not isinstance(v, str) or not v:
                raise ValueError(f'key file {path}: key {k[:4]!r}...: expected "API-KEY" = "TENANT-SALT" '
                                 f"with a non-empty string salt, got {type(v).__name__}")
        return cls(dict(data))

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant salt of an ``Authorization`` header value, or None for no known key."""
        if self.keys is None:
            return ""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        given = authorization.removeprefix("Bearer ").strip()
        for key, salt in self.keys.items():
            if hmac.compare_digest(key.encode(), given.encode()):  # no timing hint of a key
                return salt
        return None
