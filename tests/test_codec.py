from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.codec import MAGIC, Codec
from kvstore.errors import CorruptEntryError

from .conftest import examples

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.uint8]
CODECS = [Codec("zstd-hi", 1, True, threads=2, chunk=1000), Codec("zstd-hi", 1, False, threads=1),
          Codec("zstd", 1, True), Codec("zstd", 3, False), Codec("none", 1, True)]
DATA = Path(__file__).parent / "data"


def sample(dtype, shape=(3, 2, 5, 16, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype in (torch.int8, torch.uint8):
        return torch.randint(-128 if dtype == torch.int8 else 0, 128, shape, generator=g, dtype=dtype)
    x = torch.randn(shape, generator=g) * 3
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")])  # odd values survive too
    return x.to(dtype)


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("codec", CODECS, ids=["hi-chunked", "hi-plain", "zstd-split", "zstd3-plain", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(codec, dtype, plane_loops):
    x = sample(dtype)
    rec = codec.encode(x)
    y = codec.decode(rec)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(bits(x), bits(y))
    out = torch.empty_like(x)
    assert codec.decode(memoryview(rec), out) is out
    assert torch.equal(bits(out), bits(x))


@pytest.mark.parametrize("codec", CODECS, ids=["hi-chunked", "hi-plain", "zstd-split", "zstd3-plain", "raw"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8], ids=str)
def test_encode_into_writes_the_same_record_into_the_buffer_it_is_given(codec, dtype):
    x = sample(dtype)
    asked = []
    arena = bytearray(1 << 20)

    def alloc(n):
        asked.append(n)
        return memoryview(arena)[100:100 + n]
    out = codec.encode_into(x, alloc)
    assert asked == [len(codec.encode(x))], "asked for anything but the record's exact length"
    assert out.obj is arena and bytes(out) == codec.encode(x)
    assert torch.equal(bits(codec.decode(out)), bits(x))


def test_non_contiguous_input_is_encoded_by_value():
    x = sample(torch.bfloat16).transpose(0, 1)
    assert torch.equal(bits(Codec().decode(Codec().encode(x))), bits(x.contiguous()))


def test_byte_split_compresses_kv_like_bf16_better():
    x = (torch.randn(30, 2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.3).to(torch.bfloat16)
    split, plain = len(Codec("zstd", 1, True).encode(x)), len(Codec("zstd", 1, False).encode(x))
    assert split < plain < x.numel() * 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "int8"])
@pytest.mark.parametrize("comp", ["zstd", "none"])
def test_records_written_by_the_version_1_encoder_are_still_read(dtype, comp, plane_loops):
    """tests/data holds records the version-1 encoder wrote (before "zstd-hi"), and their tensors."""
    rec = (DATA / f"codec_v1_{dtype}_{comp}.rec").read_bytes()
    want = torch.load(DATA / f"codec_v1_{dtype}.pt")
    assert Codec.read_header(rec)["v"] == 1
    for codec in (Codec(), Codec("zstd-hi", threads=1), Codec("none")):  # whatever a store writes
        assert torch.equal(bits(codec.decode(rec)), bits(want))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "int8"])
def test_records_written_by_the_first_version_2_encoder_are_still_read(dtype, plane_loops):
    """tests/data holds version-2 records (1000-byte chunks) written by the first "zstd-hi"
    encoder (strided plane copies, zstd's own level 1): the current decoder reads them."""
    rec = (DATA / f"codec_v2_{dtype}.rec").read_bytes()
    want = torch.load(DATA / f"codec_v2_{dtype}.pt")
    assert Codec.read_header(rec)["v"] == 2 and len(Codec.read_header(rec)["ch"]) > 1
    for codec in (Codec(), Codec("zstd-hi", threads=1), Codec("none")):
        assert torch.equal(bits(codec.decode(rec)), bits(want))


def test_zstd_hi_stores_the_low_planes_raw_and_compresses_the_high_ones():
    """Version 2: the mantissa planes are raw, the sign/exponent planes zstd chunks; the
    record still compresses KV-like bf16 about as well as zstd on every plane."""
    x = (torch.randn(30, 2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.3).to(torch.bfloat16)
    rec = Codec("zstd-hi", chunk=4096).encode(x)
    h = Codec.read_header(rec)
    per = x.numel()
    assert h["v"] == 2 and h["raw"] == [0] and h["planes"] == 2 and len(h["ch"]) == -(-per // 4096)
    low = bits(x).reshape(-1, 2)[:, 0].numpy().tobytes()
    assert rec[h["offset"]:h["offset"] + per] == low  # the raw plane, byte for byte
    assert sum(h["ch"]) < per * 0.7  # the high plane compresses
    assert len(rec) <= len(Codec("zstd", 1, True).encode(x)) * 1.02
    f32 = Codec.read_header(Codec().encode(sample(torch.float32)))
    assert f32["raw"] == [0, 1] and f32["planes"] == 4
    assert Codec.read_header(Codec().encode(sample(torch.int8)))["raw"] == []


def test_header_describes_the_record():
    x = sample(torch.bfloat16)
    h = Codec.read_header(Codec("zstd", 1, True).encode(x))
    assert h["dtype"] == "bfloat16" and h["shape"] == tuple(x.shape) and h["codec"] == "zstd"
    assert h["planes"] == 2 and h["n"] == x.numel() * 2 and h["level"] == 1


def _corruptions(rec: bytes):
    hlen = int.from_bytes(rec[4:6], "little")
    payload_at = 10 + hlen
    yield "flipped payload byte", rec[:payload_at + 10] + bytes([rec[payload_at + 10] ^ 0x40]) + rec[payload_at + 11:]
    yield "flipped last byte", rec[:-1] + bytes([rec[-1] ^ 1])
    yield "truncated payload", rec[:-7]
    yield "truncated header", rec[:8]
    yield "empty", b""
    yield "bad magic", b"XXXX" + rec[4:]
    yield "trailing garbage", rec + b"\x00" * 5
    h = msgpack.unpackb(rec[10:payload_at])
    for field, value in [("v", 99), ("shape", [1, 2]), ("dtype", "complex64"), ("planes", 3)]:
        yield f"header {field}", _with_header({**h, field: value}, rec[payload_at:])


def _with_header(header: dict, payload: bytes) -> bytes:
    """A record with a rewritten header whose own checksum is valid (a wrong writer, not bit rot)."""
    import xxhash
    raw = msgpack.packb(header)
    return MAGIC + len(raw).to_bytes(2, "little") + xxhash.xxh32_intdigest(raw).to_bytes(4, "little") + raw + payload


@pytest.mark.parametrize("codec", CODECS, ids=["hi-chunked", "hi-plain", "zstd-split", "zstd3-plain", "raw"])
def test_damaged_records_raise_corrupt_entry_error(codec):
    rec = codec.encode(sample(torch.bfloat16))
    for what, bad in _corruptions(rec):
        with pytest.raises(CorruptEntryError):
            codec.decode(bad)
            pytest.fail(f"{what}: decoded without error")


def test_wrong_version_names_the_versions():
    rec = Codec().encode(sample(torch.float16))
    hlen = int.from_bytes(rec[4:6], "little")
    bad = _with_header({**msgpack.unpackb(rec[10:10 + hlen]), "v": 7}, rec[10 + hlen:])
    with pytest.raises(CorruptEntryError, match="version 7"):
        Codec().decode(bad)


def test_out_of_the_wrong_shape_is_a_value_error():
    rec = Codec().encode(sample(torch.float16))
    with pytest.raises(ValueError, match="expected a contiguous tensor of shape"):
        Codec().decode(rec, torch.empty(4, dtype=torch.float16))


def test_unsupported_dtype_is_a_value_error():
    with pytest.raises(ValueError, match="dtype: expected one of"):
        Codec().encode(torch.zeros(3, dtype=torch.complex64))


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_corrupt_entry_error(data):
    with pytest.raises(CorruptEntryError):
        Codec().decode(data)


@settings(max_examples=examples(150), deadline=None)
@given(st.integers(0, 10**9), st.data())
def test_any_single_byte_flip_is_detected(seed, data):
    codec = Codec()
    rec = bytearray(codec.encode(sample(torch.bfloat16, shape=(2, 2, 8, 4), seed=seed % 1000)))
    i = data.draw(st.integers(0, len(rec) - 1))
    rec[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptEntryError):
        codec.decode(bytes(rec))
