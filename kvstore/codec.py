"""Codec: one KV block tensor <-> one self-describing record of bytes.

Record layout: ``b"KVSR"`` | header length (u16 LE) | xxh32 of the header (u32 LE) |
msgpack header | payload.
The header holds the format version, dtype, shape, codec, level, byte-plane count, raw length,
the xxh3-64 checksum of the raw bytes and that of the stored payload (so every flipped bit is
caught before decompression, including bits zstd would ignore). For 16- and 32-bit dtypes the
payload is the block split into byte planes (all first bytes, then all second bytes, ...).

Two record formats, both read:
- version 1 (codec ``"zstd"`` or ``"none"``): the planes, one after the other, as one zstd frame
  (or raw). Kept for stores created with ``compression="zstd"`` and for records already written.
- version 2 (codec ``"zstd-hi"``): only the high half of the planes (sign and exponent, where the
  redundancy of KV is) is compressed, in chunks of CHUNK bytes that zstd (de)compresses on
  ``threads`` threads outside the GIL; the low planes (mantissa, close to random) are stored raw
  and copied at memory speed, straight from the record into the destination tensor. The header
  lists which planes are raw and each chunk's compressed length. Decoding is chunk by chunk:
  a chunk's planes are decompressed into a cached scratch and joined into the destination
  (``byteplanes.join``), so the destination is written once.

A Codec is a swappable object (the disk tier takes one); it is thread-safe, keeping one
compressor and one scratch buffer per thread.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np
import xxhash
import zstandard

from . import byteplanes
from .errors import CorruptEntryError
from .lazy_torch import torch

FORMAT_VERSION = 2  # what the "zstd-hi" codec writes; "zstd" and "none" still write version 1
READ_VERSIONS = (1, 2)
CODECS = ("zstd-hi", "zstd", "none")
CHUNK = 256 << 10  # bytes of a plane per zstd frame: several frames a block, for the threads
MAGIC = b"KVSR"
# zstd level 1 for the sign/exponent planes: their redundancy is in the byte distribution (the
# Huffman stage), not in repeats, so a tiny match table (64 entries, matches of 7+ bytes) loses
# nothing. Measured on real bf16 KV in 256 KiB chunks: 0.377x vs 0.404x of the plane, compress
# 2.5x and decompress 1.3x faster than zstd's own level 1. The frames are plain zstd frames.
_PLANE_PARAMS = zstandard.ZstdCompressionParameters(
    window_log=18, hash_log=6, chain_log=6, search_log=1, min_match=7, target_length=0, strategy=1)
_PREFIX = struct.Struct("<4sHI")
PREFIX_SIZE = _PREFIX.size


def head_size(prefix: bytes | memoryview) -> int:
    """The bytes of a record before its payload (prefix and header), from its first
    PREFIX_SIZE bytes: what a reader of a stream takes before it knows where the payload goes.

    Raises:
        CorruptEntryError: bad magic or truncation.
    """
    if len(prefix) < _PREFIX.size:
        raise CorruptEntryError(f"record truncated: {len(prefix)} bytes")
    magic, hlen, _ = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise CorruptEntryError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    return _PREFIX.size + hlen

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
        compression: ``"zstd-hi"`` (version 2: zstd on the high byte planes only), ``"zstd"``
            (version 1: zstd on the whole block) or ``"none"``.
        level: zstd level.
        byte_split: split 16/32-bit values into byte planes before compressing.
        threads: zstd threads per block when ``"zstd-hi"`` encodes (1: on the calling
            thread). Decoding runs on the calling thread, chunk by chunk: the store decodes
            blocks in parallel, and zstd's own threads were measured to halve the speed here.
        chunk: bytes of a plane per zstd frame for ``"zstd-hi"`` (recorded in each record).
    """

    def __init__(self, compression: str = "zstd-hi", level: int = 1, byte_split: bool = True,
                 threads: int = 2, chunk: int = CHUNK):
        if compression not in CODECS:
            raise ValueError(f"compression: expected one of {', '.join(map(repr, CODECS))}, "
                             f"got {compression!r}")
        self.compression = compression
        self.level = level
        self.byte_split = byte_split
        self.threads = max(1, int(threads))
        self.chunk = max(1, int(chunk))
        self._local = threading.local()

    # -- per-thread state: zstd contexts are not thread-safe, scratch buffers are reused
    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            if self.compression == "zstd-hi" and self.level == 1:
                c = zstandard.ZstdCompressor(compression_params=_PLANE_PARAMS)
            else:
                c = zstandard.ZstdCompressor(level=self.level)
            self._local.cctx = c
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def _scratch(self, nbytes: int, name: str = "scratch") -> np.ndarray:
        buf = getattr(self._local, name, None)
        if buf is None or buf.nbytes < nbytes:
            buf = aligned_empty(nbytes)
            setattr(self._local, name, buf)
        return buf[:nbytes]

    def _wide(self, n: int, planes: int) -> np.ndarray:
        """A per-thread scratch of ``n`` elements of ``planes`` bytes, for ``byteplanes.split``
        and ``byteplanes.join``."""
        return byteplanes.wide(self._scratch(n * planes, "wide"), n, planes)

    def encode(self, block: torch.Tensor) -> bytes:
        """The record of ``block`` (any device; copied to the CPU if needed).

        Raises:
            ValueError: the dtype is not one the codec stores.
        """
        return b"".join(self.pieces(block))

    def encode_parts(self, block: torch.Tensor) -> list:
        """The record of ``block`` as buffers that, sent one after the other, are its bytes.

        A record that holds the block verbatim (``"none"`` without byte planes) comes as its
        head and a view of the block's own memory, valid as long as ``block`` is and unchanged
        (a sender saves the copy into one record); any other record is one ``bytes``.

        Raises:
            ValueError: the dtype is not one the codec stores.
        """
        parts = self.pieces(block)
        verbatim = self.compression == "none" and self._planes(block) == 1
        return parts if verbatim else [b"".join(parts)]

    def encode_into(self, block: torch.Tensor, alloc: Callable[[int], Any]) -> Any:
        """The record of ``block`` written into ``alloc(length)`` (a writable buffer of exactly
        ``length`` bytes, e.g. a view of a reused arena), which is returned: the record without
        a fresh allocation of its own (fresh memory is page-faulted and zeroed by the kernel:
        1.5x the encode's time on two writers).

        Raises:
            ValueError: the dtype is not one the codec stores.
        """
        parts = self.pieces(block)
        out = alloc(sum(len(p) for p in parts))
        dst = np.frombuffer(out, dtype=np.uint8)
        at = 0
        for p in parts:
            n = len(p)
            dst[at:at + n] = np.frombuffer(p, dtype=np.uint8)
            at += n
        return out

    def pieces(self, block: torch.Tensor) -> list:
        """The record of ``block`` as buffers that, one after the other, are its bytes. They may
        view this thread's scratch or ``block``'s memory: valid until this thread's next encode,
        while ``block`` is unchanged.

        Raises:
            ValueError: the dtype is not one the codec stores.
        """
        name = dtype_name(block.dtype)
        block = block.detach().to("cpu").contiguous()
        raw = byte_view(block)
        planes = self._planes(block)
        if self.compression == "zstd-hi":
            return self._pieces_v2(name, block, raw, planes)
        if planes > 1:
            body = self._scratch(raw.nbytes)
            byteplanes.split(raw, body.reshape(planes, -1), self._wide(raw.nbytes // planes, planes))
        else:
            body = raw
        payload = self._compressor().compress(body) if self.compression == "zstd" else memoryview(body)
        xxh = xxhash.xxh3_64_digest(raw)
        header = msgpack.packb({
            "v": 1,
            "dtype": name,
            "shape": list(block.shape),
            "codec": self.compression,
            "level": self.level if self.compression == "zstd" else 0,
            "planes": planes,
            "n": raw.nbytes,
            "xxh": xxh,
            "pxh": xxh if planes == 1 and self.compression == "none" else xxhash.xxh3_64_digest(payload),
        })
        prefix = _PREFIX.pack(MAGIC, len(header), xxhash.xxh32_intdigest(header))
        return [prefix + header, payload]

    def _planes(self, block: torch.Tensor) -> int:
        """Byte planes a record of ``block`` is split into (1: none)."""
        return block.element_size() if self.byte_split and block.element_size() in (2, 4) else 1

    def _pieces_v2(self, name: str, block: torch.Tensor, raw: np.ndarray, planes: int) -> list:
        per = raw.nbytes // planes
        split = self._scratch(raw.nbytes).reshape(planes, per)
        byteplanes.split(raw, split, self._wide(per, planes))
        raw_planes = list(range(planes // 2))  # the low (mantissa) half; none for 1-byte dtypes
        cs = self.chunk
        chunks = [memoryview(split[i, a:a + cs]) for i in range(planes) if i not in raw_planes
                  for a in range(0, per, cs)]
        frames = self._compress_chunks(chunks)
        pieces = [memoryview(split[i]) for i in raw_planes] + frames
        pxh = xxhash.xxh3_64()
        for piece in pieces:
            pxh.update(piece)
        header = msgpack.packb({
            "v": 2, "dtype": name, "shape": list(block.shape), "codec": "zstd-hi",
            "level": self.level, "planes": planes, "n": raw.nbytes, "raw": raw_planes,
            "cs": cs, "ch": [len(f) for f in frames],
            "xxh": xxhash.xxh3_64_digest(raw), "pxh": pxh.digest(),
        })
        prefix = _PREFIX.pack(MAGIC, len(header), xxhash.xxh32_intdigest(header))
        return [prefix + header, *pieces]

    def _compress_chunks(self, chunks: list[memoryview]) -> list:
        if self.threads > 1 and len(chunks) > 1:
            got = self._compressor().multi_compress_to_buffer(chunks, threads=self.threads)
            return [got[i] for i in range(len(got))]
        c = self._compressor()
        return [c.compress(ch) for ch in chunks]

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
            if h.get("v") not in READ_VERSIONS:
                raise CorruptEntryError(
                    f"record format version {h.get('v')!r}; this build reads "
                    f"{', '.join(map(str, READ_VERSIONS))}"
                )
            shape = tuple(int(d) for d in h["shape"])
            dtype = DTYPES[h["dtype"]]
            n = int(h["n"])
            planes = int(h["planes"])
            codecs = ("zstd-hi",) if h["v"] == 2 else ("zstd", "none")
            if h["codec"] not in codecs or not isinstance(h["xxh"], bytes) \
                    or not isinstance(h["pxh"], bytes):
                raise ValueError("bad codec or checksum field")
            itemsize = dtype.itemsize
            if n != itemsize * math.prod(shape) or planes not in (1, itemsize):
                raise ValueError("length, shape and planes disagree")
            if h["v"] == 2:
                raw, cs, ch = h["raw"], int(h["cs"]), [int(c) for c in h["ch"]]
                per = n // planes
                if sorted(set(raw)) != raw or any(not 0 <= i < planes for i in raw) or cs <= 0 \
                        or len(ch) != (planes - len(raw)) * -(-per // cs) or min(ch, default=1) <= 0:
                    raise ValueError("plane and chunk fields disagree")
                h["ch"], h["cs"] = ch, cs
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
        out = self.output(h, out)
        self.decode_payload(h, memoryview(record)[h["offset"]:], out)
        return out

    @staticmethod
    def output(h: dict[str, Any], out: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` checked against the block that header ``h`` describes (a new tensor if None).

        Raises:
            ValueError: ``out`` is not a contiguous CPU tensor of the record's shape and dtype.
        """
        shape, dtype = h["shape"], h["torch_dtype"]
        if out is None:
            return torch.empty(shape, dtype=dtype)
        if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() \
                or out.device.type != "cpu":
            raise ValueError(
                f"out: expected a contiguous tensor of shape {shape} and dtype {h['dtype']} on the "
                f"CPU, "
                f"got shape {tuple(out.shape)} and dtype {out.dtype} on {out.device}"
            )
        return out

    @staticmethod
    def verbatim(h: dict[str, Any]) -> bool:
        """Whether the record of header ``h`` holds its block's bytes as they are (its payload
        may be read straight into the destination, then checked with ``check_verbatim``)."""
        return h["v"] == 1 and h["codec"] == "none" and h["planes"] == 1

    @staticmethod
    def payload_hasher():
        """A streaming hasher of a payload (``update(piece)`` as pieces arrive, in order):
        what ``check_verbatim`` takes, so a reader hashes each piece while it is in cache."""
        return xxhash.xxh3_64()

    @staticmethod
    def check_verbatim(h: dict[str, Any], hasher) -> None:
        """Checks a verbatim record's payload, whose every byte went into ``hasher`` (from
        ``payload_hasher``) as it was read into the destination, against its checksums.

        Raises:
            CorruptEntryError: the bytes differ from those the record was written with.
        """
        if hasher.digest() != h["pxh"]:
            raise CorruptEntryError("payload checksum mismatch: the record's payload was altered")
        if h["pxh"] != h["xxh"]:
            raise CorruptEntryError("checksum mismatch: the record's bytes were altered")

    def decode_payload(self, h: dict[str, Any], payload: bytes | memoryview,
                       out: torch.Tensor) -> None:
        """Decodes the payload of a record whose header is ``h`` (from ``read_header``) into
        ``out`` (from ``output``); ``decode`` is ``read_header``, ``output`` and this.

        Raises:
            CorruptEntryError: the payload is damaged.
        """
        dst = byte_view(out)
        payload = memoryview(payload)
        if h["v"] == 2:
            # No pass over the payload: a damaged frame or raw plane decodes to other bytes,
            # which the checksum of the decoded bytes catches (a tenth of a decode saved).
            data_sum = self._decode_v2(h, payload, dst)
        elif xxhash.xxh3_64_digest(payload) != h["pxh"]:
            raise CorruptEntryError("payload checksum mismatch: the record's payload was altered")
        elif self.verbatim(h) and len(payload) == h["n"]:
            dst[:] = np.frombuffer(payload, dtype=np.uint8)
            data_sum = h["pxh"]  # the payload is the data: its checksum was just verified
        else:
            self._decode_v1(h, payload, dst)
            data_sum = xxhash.xxh3_64_digest(dst)
        if data_sum != h["xxh"]:
            raise CorruptEntryError("checksum mismatch: the record's bytes were altered")

    def _decode_v2(self, h: dict, payload: memoryview, dst: np.ndarray) -> bytes:
        """Chunk by chunk: the compressed planes' chunks are decompressed into a per-thread
        scratch, then joined with the same rows of the raw planes (read straight from the
        record) into ``dst``, which is written once and checksummed while still in cache.
        Returns the xxh3-64 digest of ``dst``."""
        n, planes, raw, cs, ch = h["n"], h["planes"], h["raw"], h["cs"], h["ch"]
        per = n // planes
        if len(raw) * per + sum(ch) != len(payload):
            raise CorruptEntryError(f"payload holds a wrong length, expected {n} bytes")
        raws = {i: np.frombuffer(payload, dtype=np.uint8, count=per, offset=j * per)
                for j, i in enumerate(raw)}
        packed = [i for i in range(planes) if i not in raws]
        ends = np.cumsum([len(raw) * per, *ch]).tolist()
        frames = [payload[x:y] for x, y in zip(ends, ends[1:])]  # plane by plane, chunk by chunk
        nchunks = -(-per // cs)
        scratch = self._scratch(len(packed) * min(cs, per)).reshape(len(packed), -1)
        wide = self._wide(min(cs, per), planes)
        data_sum = xxhash.xxh3_64()
        for c in range(nchunks):
            a, b = c * cs, min(per, c * cs + cs)
            parts = {i: p[a:b] for i, p in raws.items()}
            for j, i in enumerate(packed):
                parts[i] = out = scratch[j, :b - a]
                try:
                    got = self._decompress_into(frames[j * nchunks + c], out)
                except zstandard.ZstdError as e:
                    raise CorruptEntryError(f"damaged payload: {e}") from None
                if got != b - a:
                    raise CorruptEntryError(f"payload holds a wrong length, expected {n} bytes")
            rows = dst[a * planes:b * planes]
            byteplanes.join([parts[i] for i in range(planes)], rows, wide)
            data_sum.update(rows)
        return data_sum.digest()

    def _decode_v1(self, h: dict, payload: memoryview, dst: np.ndarray) -> None:
        n, planes = h["n"], h["planes"]
        body = self._scratch(n) if planes > 1 else dst
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
            byteplanes.join(list(body.reshape(planes, -1)), dst, self._wide(n // planes, planes))

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
