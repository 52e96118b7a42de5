"""Codec: one KV block tensor <-> one self-describing record of bytes.

Record layout: ``b"KVSR"`` | header length (u16 LE) | xxh32 of the header (u32 LE) |
msgpack header | payload.
The header holds the format version, dtype, shape, codec, level, byte-plane count, raw length,
the xxh3-64 checksum of the raw bytes and that of the stored payload (so every flipped bit is
caught before decompression, including bits zstd would ignore). For 16- and 32-bit dtypes the payload is the block split
into byte planes (all first bytes, then all second bytes, ...), which makes the slowly varying
exponent bytes compress well: measured on real bf16 KV, ratio 1.26 plain, 1.45 split.

A Codec is a swappable object (the disk tier takes one); it is thread-safe, keeping one
compressor and one scratch buffer per thread.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
import xxhash
import zstandard

from .errors import CorruptEntryError
from .lazy_torch import torch

FORMAT_VERSION = 1
MAGIC = b"KVSR"
_PREFIX = struct.Struct("<4sHI")

class _Dtypes(Mapping):
    """Name -> torch dtype of the dtypes the codec stores; the names are known without torch
    (config checks them), the dtypes are looked up on use (see lazy_torch)."""

    NAMES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "uint8")

    def __getitem__(self, name: str) -> torch.dtype:
        if name not in self.NAMES:
            raise KeyError(name)
        return getattr(torch, name)

    def __iter__(self):
        return iter(self.NAMES)

    def __len__(self) -> int:
        return len(self.NAMES)

    def __contains__(self, name: object) -> bool:
        return name in self.NAMES


DTYPES: Mapping[str, torch.dtype] = _Dtypes()


def dtype_name(dtype: torch.dtype) -> str:
    """The codec's name of a torch dtype; ValueError for one it cannot store."""
    name = str(dtype).removeprefix("torch.")
    if isinstance(dtype, torch.dtype) and name in DTYPES:
        return name
    else:
        raise ValueError(
            f"dtype: expected one of {', '.join(DTYPES)}, got {dtype}"
        ) from None


def aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    """A uint8 array of ``nbytes`` starting on an ``align``-byte boundary.

    Reads into a buffer off a 64-byte boundary were measured 4x slower on these machines.
    """
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


def byte_view(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a flat uint8 numpy array (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class Codec:
    """Encodes KV blocks into records and back.

    Args:
        compression: ``"zstd"`` or ``"none"``.
        level: zstd level.
        byte_split: split 16/32-bit values into byte planes before compressing.
    """

    def __init__(self, compression: str = "zstd", level: int = 1, byte_split: bool = True):
        if compression not in ("zstd", "none"):
            raise ValueError(f"compression: expected 'zstd' or 'none', got {compression!r}")
        self.compression = compression
        self.level = level
        self.byte_split = byte_split
        self._local = threading.local()

    # -- per-thread state: zstd contexts are not thread-safe, scratch buffers are reused
    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def _scratch(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.scratch = aligned_empty(nbytes)
        return buf[:nbytes]

    def encode(self, block: torch.Tensor) -> bytes:
        """The record of ``block`` (any device; copied to the CPU if needed).

        Raises:
            ValueError: the dtype is not one the codec stores.
        """
        name = dtype_name(block.dtype)
        block = block.detach().to("cpu").contiguous()
        raw = byte_view(block)
        planes = block.element_size() if self.byte_split and block.element_size() in (2, 4) else 1
        if planes > 1:
            split = self._scratch(raw.nbytes)
            np.copyto(split.reshape(planes, -1), raw.reshape(-1, planes).T)
            body = split
        else:
            body = raw
        if self.compression == "zstd":
            payload = self._compressor().compress(body)
        else:
            payload = body.tobytes()
        header = msgpack.packb({
            "v": FORMAT_VERSION,
            "dtype": name,
            "shape": list(block.shape),
            "codec": self.compression,
            "level": self.level if self.compression == "zstd" else 0,
            "planes": planes,
            "n": raw.nbytes,
            "xxh": xxhash.xxh3_64_digest(raw),
            "pxh": xxhash.xxh3_64_digest(payload),
        })
        prefix = _PREFIX.pack(MAGIC, len(header), xxhash.xxh32_intdigest(header))
        return b"".join((prefix, header, payload))

    @staticmethod
    def read_header(record: bytes | memoryview) -> dict[str, Any]:
        """The validated header of ``record``.

        Raises:
            CorruptEntryError: bad magic, truncation, an unknown format version or bad fields.
        """
        mv = memoryview(record)
        if len(mv) < _PREFIX.size:
            raise CorruptEntryError(f"record truncated: {len(mv)} bytes")
        magic, hlen, hsum = _PREFIX.unpack_from(mv)
        if magic != MAGIC:
            raise CorruptEntryError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
        if len(mv) < _PREFIX.size + hlen:
            raise CorruptEntryError("record truncated inside its header")
        header = mv[_PREFIX.size:_PREFIX.size + hlen]
        if xxhash.xxh32_intdigest(header) != hsum:
            raise CorruptEntryError("header checksum mismatch: the record's header was altered")
        try:
            h = msgpack.unpackb(header)
            if not isinstance(h, dict):
                raise TypeError("header is not a map")
            if h.get("v") != FORMAT_VERSION:
                raise CorruptEntryError(
                    f"record format version {h.get('v')!r}; this build reads {FORMAT_VERSION}"
                )
            shape = tuple(int(d) for d in h["shape"])
            dtype = DTYPES[h["dtype"]]
            n = int(h["n"])
            planes = int(h["planes"])
            if h["codec"] not in ("zstd", "none") or not isinstance(h["xxh"], bytes) \
                    or not isinstance(h["pxh"], bytes):
                raise ValueError("bad codec or checksum field")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if n != itemsize * int(np.prod(shape)) or planes not in (1, itemsize):
                raise ValueError("length, shape and planes disagree")
        except CorruptEntryError:
            raise
        except Exception as e:  # msgpack and field errors alike: the header is damaged
            raise CorruptEntryError(f"damaged record header: {e}") from None
        h["shape"], h["torch_dtype"], h["offset"] = shape, dtype, _PREFIX.size + hlen
        return h

    def decode(self, record: bytes | memoryview, out: torch.Tensor | None = None) -> torch.Tensor:
        """The block stored in ``record``, bit-exact, written into ``out`` when given.

        ``record`` may be a buffer that is only valid for the call (an LMDB ``buffers=True``
        value): nothing keeps a reference to it. ``out`` must be a contiguous CPU tensor of the
        record's shape and dtype; after a CorruptEntryError its contents are undefined.

        Raises:
            CorruptEntryError: the record is damaged (checksum, truncation, version, fields).
            ValueError: ``out`` does not match the record's shape and dtype.
        """
        h = self.read_header(record)
        shape, dtype, n, planes = h["shape"], h["torch_dtype"], h["n"], h["planes"]
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(
                f"out: expected a contiguous tensor of shape {shape} and dtype {h['dtype']}, "
                f"got shape {tuple(out.shape)} and dtype {out.dtype}"
            )
        dst = byte_view(out)
        body = self._scratch(n) if planes > 1 else dst
        payload = memoryview(record)[h["offset"]:]
        if xxhash.xxh3_64_digest(payload) != h["pxh"]:
            raise CorruptEntryError("payload checksum mismatch: the record's payload was altered")
        try:
            if h["codec"] == "zstd":
                got = self._decompress_into(payload, body)
            else:
                got = min(len(payload), n)
                body[:got] = np.frombuffer(payload, dtype=np.uint8, count=got)
                if len(payload) != n:
                    got = -1
        except zstandard.ZstdError as e:
            raise CorruptEntryError(f"damaged payload: {e}") from None
        if got != n:
            raise CorruptEntryError(f"payload holds a wrong length, expected {n} bytes")
        if planes > 1:
            rows = dst.reshape(-1, planes)
            split = body.reshape(planes, -1)
            for i in range(planes):  # per-plane strided copies: 3.3 GB/s vs 0.5 for one .T copy
                rows[:, i] = split[i]
        if xxhash.xxh3_64_digest(dst) != h["xxh"]:
            raise CorruptEntryError("checksum mismatch: the record's bytes were altered")
        return out

    def _decompress_into(self, payload: memoryview, body: np.ndarray) -> int:
        """Decompresses one frame straight into ``body``; returns the bytes written, -1 on excess."""
        reader = self._decompressor().stream_reader(payload)
        target = memoryview(body).cast("B")
        got = 0
        while got < len(target):
            k = reader.readinto(target[got:])
            if not k:
                break
            got += k
        if reader.read(1):  # more data than the header announced
            return -1
        return got
