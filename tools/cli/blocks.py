"""How the commands describe and select held blocks: one block as data, namespace and key
filters, and the blocks chained below others."""

from __future__ import annotations

import datetime as dt

from kvstore import KVStoreError
from kvstore.eviction import EntryMeta
from kvstore.keys import namespace_id


def iso(ts: float | None) -> str | None:
    """A timestamp as local ISO 8601 with its offset, to the second."""
    return None if ts is None else dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def ns_label(names: dict[int, str], ns_id: int) -> str:
    """A namespace's name, or ``#`` and its id where the store has no name for it."""
    return names.get(ns_id, f"#{ns_id:016x}")


def expires(meta: EntryMeta, ttl: float) -> float:
    return max(meta.last_access + ttl, meta.pinned_until)


def entry_json(key: bytes, m: EntryMeta, names: dict[int, str], ttl: float, bt: int, now: float) -> dict:
    """One block as data (the rows of ``ls``, the head of ``inspect``)."""
    return {
        "key": key.hex(), "namespace": ns_label(names, m.namespace_id), "namespace_id": short_id(m.namespace_id),
        "depth": m.depth, "tokens": f"{m.depth * bt}-{(m.depth + 1) * bt - 1}", "parent": m.parent.hex() or None,
        "raw_bytes": m.raw_bytes, "stored_bytes": m.stored_bytes,
        "created": iso(m.created), "last_access": iso(m.last_access),
        "expires": iso(expires(m, ttl)),
        "pinned_until": iso(m.pinned_until) if m.pinned_until > now else None,
    }


def short_id(ns_id: int) -> str:
    """A namespace's short form: ``#`` and the first 8 of its 16 hex digits (accepted wherever
    a namespace is, as long as it is unique in the store)."""
    return f"#{ns_id:016x}"[:9]


def namespace_filter(text: str, names: dict[int, str]) -> int:
    """The id of the store's namespace ``text`` names: its name, or ``#`` and a unique prefix
    (4 to 16 hex digits) of its id, as ``stats`` and ``ls`` print it.

    Raises:
        KVStoreError: not a namespace of this store (the message lists the ones it has), or an
            ambiguous or malformed id.
    """
    def known() -> str:
        shown = [f"{n} ({short_id(i)})" for i, n in sorted(names.items(), key=lambda kv: kv[1])]
        return "; it holds " + (", ".join(shown[:8]) + (" …" if len(shown) > 8 else "") if shown else "none")

    if text.startswith("#"):
        digits = text[1:].lower()
        if not 4 <= len(digits) <= 16 or any(c not in "0123456789abcdef" for c in digits):
            raise KVStoreError(f"--namespace {text}: expected a name, or '#' and 4 to 16 hex digits of its id")
        found = [i for i in names if f"{i:016x}".startswith(digits)]
        if len(found) > 1:
            raise KVStoreError(f"--namespace {text} is ambiguous: {len(found)} namespaces match; give more digits")
        if not found:
            raise KVStoreError(f"--namespace {text}: no namespace of this store has that id{known()}")
        return found[0]
    ns_id = namespace_id(text)
    if ns_id not in names:
        raise KVStoreError(f"--namespace {text}: no such namespace in this store{known()}")
    return ns_id


def find_key(entries: list[tuple[bytes, EntryMeta]], text: str) -> bytes:
    """The one key starting with hex ``text``.

    Raises:
        KVStoreError: not hex, no such key, or more than one.
    """
    prefix = text.lower().removeprefix("0x")
    if len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix):
        raise KVStoreError(f"{text!r}: expected a key or a key prefix of at least 4 hex digits")
    found = [k for k, _ in entries if k.hex().startswith(prefix)]
    if not found:
        raise KVStoreError(f"no block with key {prefix}… in this store")
    if len(found) > 1:
        raise KVStoreError(f"key prefix {prefix} is ambiguous: {len(found)} blocks match; give more digits")
    return found[0]
