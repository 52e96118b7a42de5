"""Chained block keys: pure functions, no state.

``d[i] = H(k[i-1] || tokens of block i as little-endian uint32)`` with ``k[-1] = H(namespace)``
and H = xxh3-128, so the key of block i commits to the namespace and every token before and in
it: only a common prefix can hit. The key ``k[i]`` is ``d[i]`` with its first ``LEAD_BYTES``
replaced by those of its group's first key ``k[i - i % GROUP_BLOCKS]``: the blocks of a group
sort together in every index keyed by them (the disk tier's B-trees), so a prompt's blocks,
which are stored, touched and evicted together, share leaf pages instead of dirtying one page
each (measured on the trace replay: 1.7x the small-block writes a second, docs/benchmarks.md).
The other 13 bytes stay the digest's: two different prefixes share a key with odds of 2**-104.
The digest is stable across processes, machines and Python runs (never the builtin ``hash``,
which PYTHONHASHSEED changes).
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence

import numpy as np
import xxhash

# The key scheme's version, in every namespace (``v=``): 2 groups keys by their leading bytes;
# blocks stored under 1 are another namespace's, which ``kvstore purge --namespace`` removes.
FORMAT_VERSION = 2
GROUP_BLOCKS = 16  # blocks that share their group's leading bytes (measured: 4, 16 and 64)
LEAD_BYTES = 3
KEY_BYTES = 16
_MAX_TOKEN = (1 << 32) - 1
_ROOT_DOMAIN = b"kvstore/namespace/v1\x00"


def make_namespace(
    model: str,
    kv_layout: str,
    dtype: str,
    tenant_salt: str = "",
    tp_rank: int | None = None,
    format_version: int = FORMAT_VERSION,
) -> str:
    """The canonical namespace string for KV that is interchangeable.

    Everything that makes KV incompatible or private goes in: model identity, KV layout, dtype,
    tensor-parallel rank (where it applies), tenant salt and the format version. Two namespaces
    that differ in any field never share a block.
    """
    for name, value in (("model", model), ("kv_layout", kv_layout), ("dtype", dtype)):
        if not value or "|" in value:
            raise ValueError(f"{name}: expected a non-empty string without '|', got {value!r}")
    parts = [f"model={model}", f"layout={kv_layout}", f"dtype={dtype}", f"v={format_version}"]
    if tp_rank is not None:
        parts.append(f"tp={int(tp_rank)}")
    if tenant_salt:
        # The salt itself is private: only its digest goes into the (listable) namespace name.
        parts.append("tenant=" + xxhash.xxh3_64_hexdigest(tenant_salt.encode()))
    return "|".join(parts)


def namespace_root(namespace: str) -> bytes:
    """``k[-1]``: the seed of every chain in ``namespace``."""
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace: expected a non-empty string, got {namespace!r}")
    return xxhash.xxh3_128_digest(_ROOT_DOMAIN + namespace.encode())


def namespace_id(namespace: str) -> int:
    """A 64-bit id of ``namespace``, stored with each record for filtering and purges."""
    return xxhash.xxh3_64_intdigest(_ROOT_DOMAIN + namespace.encode())


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> memoryview:
    """Token ids as little-endian uint32 bytes.

    Raises:
        ValueError: an id is negative, not an integer, or >= 2**32.
    """
    if isinstance(token_ids, np.ndarray) or hasattr(token_ids, "__array__"):
        arr = np.asarray(token_ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(
                f"token_ids: expected a 1-D sequence of integer ids, got an array of shape "
                f"{arr.shape} and dtype {arr.dtype}"
            )
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _MAX_TOKEN):
            raise ValueError(
                f"token_ids: expected ids in [0, {_MAX_TOKEN}], got values in "
                f"[{int(arr.min())}, {int(arr.max())}]"
            )
        return memoryview(np.ascontiguousarray(arr, dtype="<u4")).cast("B")
    try:
        # array('I') validates range and type in C: about 10x faster than a Python loop.
        arr32 = array.array("I", token_ids)
    except (TypeError, OverflowError):
        _raise_bad_token(token_ids)
    if arr32.itemsize != 4:  # pragma: no cover - 'I' is 4 bytes on every platform we run on
        arr32 = array.array("L", token_ids)
    if sys.byteorder != "little":  # pragma: no cover
        arr32.byteswap()
    return memoryview(arr32).cast("B")


def _raise_bad_token(token_ids: Sequence) -> None:
    try:
        seq = list(token_ids)
    except TypeError:
        raise ValueError(
            f"token_ids: expected a sequence of integer ids, got {type(token_ids).__name__}"
        ) from None
    for i, t in enumerate(seq):
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
            raise ValueError(
                f"token_ids[{i}]: expected an integer token id, got {type(t).__name__} {t!r}"
            )
        if not 0 <= t <= _MAX_TOKEN:
            raise ValueError(f"token_ids[{i}]: expected an id in [0, {_MAX_TOKEN}], got {t}")
    raise ValueError("token_ids: expected integer ids in [0, 2**32)")  # pragma: no cover


def block_keys(
    namespace: str,
    token_ids: Sequence[int] | np.ndarray,
    block_tokens: int,
    max_blocks: int | None = None,
) -> list[bytes]:
    """Keys of the full blocks of ``token_ids`` (a partial trailing block gets no key).

    Args:
        namespace: the namespace string (see ``make_namespace``).
        token_ids: the prompt.
        block_tokens: tokens per block.
        max_blocks: compute at most this many leading keys.

    Returns:
        ``keys[i]`` is the 16-byte chained key of block i (see the module's docstring).

    Raises:
        ValueError: bad token ids or namespace.
    """
    data = token_bytes(token_ids)
    n = len(data) // (4 * block_tokens)
    if max_blocks is not None:
        n = min(n, max_blocks)
    step = 4 * block_tokens
    h = namespace_root(namespace)
    keys = []
    new = xxhash.xxh3_128
    lead = b""
    for i, off in enumerate(range(0, n * step, step)):
        state = new(h)
        state.update(data[off:off + step])
        h = state.digest()
        if i % GROUP_BLOCKS:
            h = lead + h[LEAD_BYTES:]
        else:
            lead = h[:LEAD_BYTES]
        keys.append(h)
    return keys
