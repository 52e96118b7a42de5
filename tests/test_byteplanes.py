"""The byte-plane loops: the C extension and the numpy fallback write the same planes, each the
inverse of the other, and the extension refuses buffers that do not fit."""

import numpy as np
import pytest

from kvstore import byteplanes


def reference_planes(raw: np.ndarray, k: int) -> np.ndarray:
    return raw.reshape(-1, k).T.copy()  # plane i = byte i of every element, by strided copy


def test_the_extension_is_built():
    """`make setup` compiles kvstore/_byteplanes.c; setup.py marks it optional, so a failed build
    would otherwise only show as a 2.4x slower decode."""
    assert byteplanes.NATIVE, ("kvstore._byteplanes was not built: a C compiler and the Python "
                               "headers are needed at install; the codec runs numpy loops instead")


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("n", [1, 7, 16, 4097, 300_001])
def test_split_and_join_match_strided_copies_and_invert_each_other(plane_loops, k, n):
    raw = np.random.default_rng(n * k).integers(0, 256, n * k, dtype=np.uint8)
    want = reference_planes(raw, k)
    got = np.full((k, n), 0xAA, dtype=np.uint8)
    byteplanes.split(raw, got, byteplanes.wide(np.empty(n * k, np.uint8), n, k))
    assert np.array_equal(got, want)
    back = np.zeros(n * k, dtype=np.uint8)
    byteplanes.join(list(want), back, byteplanes.wide(np.empty(n * k, np.uint8), n, k))
    assert np.array_equal(back, raw)


def test_join_writes_only_its_destination():
    """A chunk's rows are a slice of a larger destination: the bytes around them are untouched."""
    dst = np.full(100, 0x55, dtype=np.uint8)
    byteplanes.join([np.arange(10, dtype=np.uint8), np.arange(10, 20, dtype=np.uint8)],
                    dst[40:60], byteplanes.wide(np.empty(20, np.uint8), 10, 2))
    assert (dst[:40] == 0x55).all() and (dst[60:] == 0x55).all()
    assert dst[40:60].tolist() == [v for i in range(10) for v in (i, 10 + i)]


@pytest.mark.skipif(not byteplanes.NATIVE, reason="the extension was not built")
@pytest.mark.parametrize("call, match", [
    (lambda n: n.join(np.zeros(12, np.uint8), [np.zeros(4, np.uint8)] * 3), "expected 2 or 4 planes, got 3"),
    (lambda n: n.join(np.zeros(9, np.uint8), [np.zeros(4, np.uint8)] * 2), "not a whole number of 2-byte"),
    (lambda n: n.join(np.zeros(8, np.uint8), [np.zeros(4, np.uint8), np.zeros(3, np.uint8)]),
     r"plane 1 holds 3 bytes, expected 4"),
    (lambda n: n.split(np.zeros(8, np.uint8), [np.zeros(4, np.uint8), np.zeros(5, np.uint8)]),
     r"plane 1 holds 5 bytes, expected 4"),
])
def test_the_extension_names_what_does_not_fit(call, match):
    with pytest.raises(ValueError, match=match):
        call(byteplanes._native)


@pytest.mark.skipif(not byteplanes.NATIVE, reason="the extension was not built")
def test_the_extension_refuses_read_only_and_strided_buffers():
    ro = np.zeros(8, np.uint8)
    ro.flags.writeable = False
    with pytest.raises((BufferError, ValueError)):
        byteplanes._native.join(ro, [np.zeros(4, np.uint8)] * 2)
    with pytest.raises((BufferError, ValueError)):
        byteplanes._native.split(np.zeros(8, np.uint8), [np.zeros(8, np.uint8)[::2]] * 2)
    with pytest.raises(TypeError):
        byteplanes._native.join(bytearray(8), 5)
