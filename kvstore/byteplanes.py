"""Byte planes: 2- and 4-byte elements split into planes (plane i = byte i of every element, in
memory order) and joined back; the codec's inner loops.

Native when the C extension ``kvstore._byteplanes`` was built at install (one pass at memory speed,
outside the GIL: 19-22 GB/s here); otherwise numpy shifts on whole elements (8-9 GB/s). Both
write the same bytes; ``NATIVE`` says which runs.
"""

from __future__ import annotations

import numpy as np

try:
    from . import _byteplanes as _native
except ImportError:  # built without a C compiler (setup.py marks the extension optional)
    _native = None

NATIVE = _native is not None
_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4")}  # little-endian: plane i is byte i in memory


def wide(scratch: np.ndarray, n: int, planes: int) -> np.ndarray:
    """``n`` elements of ``planes`` bytes viewed over ``scratch`` (at least ``n * planes``
    bytes): the scratch ``split`` and ``join`` take (bytes when ``planes`` is 1)."""
    return scratch[:n * planes].view(_UINT.get(planes, np.uint8))


def split(raw: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """``out[i]`` = byte ``i`` of every element of ``raw`` (``out.shape[0]`` bytes each, rows
    contiguous); ``scratch`` is one plane's length of the elements' type (from ``wide``), used
    only without the extension.

    The numpy path shifts whole elements (4x faster here than strided byte copies) and narrows
    each plane with a plain copy: a ufunc that casts its output held the GIL."""
    planes = out.shape[0]
    if planes == 1:
        out[0] = raw
        return
    if _native is not None:
        _native.split(raw, list(out))
        return
    u = raw.view(_UINT[planes])
    out[0][:] = u
    w = scratch[:len(u)]
    for i in range(1, planes):
        np.right_shift(u, 8 * i, out=w)
        out[i][:] = w


def join(parts: list[np.ndarray], out: np.ndarray, scratch: np.ndarray) -> None:
    """The inverse of ``split``: ``out`` (bytes) from its byte planes ``parts``; ``scratch`` is
    at least one plane's length of ``out``'s element type (from ``wide``), used only without
    the extension.

    The numpy path is a shift-or on whole elements (2x faster here than strided byte copies),
    each plane widened by a plain copy first: a ufunc that casts its input held the GIL."""
    if len(parts) == 1:
        out[:] = parts[0]
        return
    if _native is not None:
        _native.join(out, parts)
        return
    o = out.view(_UINT[len(parts)])
    o[:] = parts[0]
    w = scratch[:len(o)]
    for i in range(1, len(parts)):
        w[:] = parts[i]
        np.left_shift(w, 8 * i, out=w)
        np.bitwise_or(o, w, out=o)
