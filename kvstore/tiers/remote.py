"""RemoteTier: a shared tier on a Redis-protocol server (Valkey 9, Redis 7), below disk.

One block is one string ``<prefix><key hex>``: its last access and pinned-until times (fixed
width, so a touch or a pin rewrites them in place with SETRANGE and a lookup reads only them
with GETRANGE), its static metadata (msgpack) and the same self-describing, checksummed record
as the disk tier (a disk victim goes up as it is). One string, not a hash: the server sends a
string's value from its memory, a hash field's through its reply buffers (pipelined reads of
1.4 MiB values 1.5-2x slower here). Large values go through resp.py: read straight into the
destination, sent from the block's memory. The block key is chained from the namespace (model,
layout, dtype, rank, tenant salt), so tenants never share a key; in a cluster the keys of one
prompt spread over the shards. The server owns the budget: its ``maxmemory`` policy evicts, and
every key expires ``ttl_s`` after its last use (refreshed on a hit). A chain the server broke
is harmless: lookups stop at the first miss.

Faults are misses: every request waits at most ``timeout_s`` on a socket; a timeout, a refused
connection or refused credentials opens a circuit breaker, after which requests return misses
at once while a background thread probes the server with backoff. A record that fails its
checksum is a counted miss and is deleted. Last-access times of hits are sent in the background
(and by ``flush``), never on the lookup path.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from ..codec import PREFIX_SIZE, Codec, aligned_empty, byte_view, head_size
from ..config import parse_url
from ..errors import ConfigError, CorruptEntryError
from ..eviction import EntryMeta, is_expired, is_live
from ..lazy_torch import torch
from ..metrics import Metrics
from . import resp
from .base import BlockEntry, Evicted, EvictCallback, TierUsage

log = logging.getLogger(__name__)

PASSWORD_ENV = "KVSTORE_REMOTE_PASSWORD"
PREFIX = "kvstore:b:"
BACKOFF_S = (0.05, 2.0)  # first and longest wait between reconnect attempts
TOUCH_EVERY_S = 0.5
_SCAN_COUNT = 1000
# Bytes a socket read takes: blocks are megabytes, and redis-py's 64 KiB reads (each one a recv
# and a copy into the parser) ran the same pipelined GETs 30% slower here.
SOCKET_READ_SIZE = 1 << 20
# Raw bytes of blocks per batch of a get or put: a put encodes the next batch while one is on
# the wire; a get's replies are read and decoded as they arrive, a batch asked for ahead.
BATCH_BYTES = 8 << 20

# A block's value: last access and pinned-until (each _NUM ASCII chars), the length of the
# metadata (_ML digits), the metadata, the record.
_NUM, _ML = 20, 4
_HEAD = 2 * _NUM + _ML
_SCAN_BYTES = 512  # what a scan reads of each value: the head and the metadata
_MAX_NUM = 9.99e12  # the largest time _NUM chars hold with 6 decimals


def _num(t: float) -> bytes:
    return b"%020.6f" % min(max(float(t), 0.0), _MAX_NUM)


def _head(value: bytes) -> tuple[float, float, int] | None:
    """Last access, pinned-until and metadata length from a value's first _HEAD bytes (the
    times alone from its first 2 * _NUM); None when they are not a block's."""
    try:
        times = float(value[:_NUM]), float(value[_NUM:2 * _NUM])
        if len(value) == 2 * _NUM:
            return (*times, 0)
        return (*times, int(value[2 * _NUM:_HEAD])) if len(value) >= _HEAD else None
    except ValueError:
        return None


# Raise last access and refresh the expiry, only if the key exists (a touch never creates one).
_TOUCH = f"""
local h = redis.call('GETRANGE', KEYS[1], 0, {2 * _NUM - 1})
if #h < {2 * _NUM} then return 0 end
local a = tonumber(string.sub(h, 1, {_NUM}))
local p = tonumber(string.sub(h, {_NUM + 1}, {2 * _NUM}))
if tonumber(ARGV[1]) > a then redis.call('SETRANGE', KEYS[1], 0, ARGV[3]) end
local ttl = tonumber(ARGV[2])
if p - tonumber(ARGV[1]) > ttl then ttl = p - tonumber(ARGV[1]) end
redis.call('EXPIRE', KEYS[1], math.ceil(ttl))
return 1
"""
# Raise pinned-until, keeping the key at least until then.
_PIN = f"""
local h = redis.call('GETRANGE', KEYS[1], 0, {2 * _NUM - 1})
if #h < {2 * _NUM} then return 0 end
local p = tonumber(string.sub(h, {_NUM + 1}, {2 * _NUM}))
if tonumber(ARGV[1]) > p then redis.call('SETRANGE', KEYS[1], {_NUM}, ARGV[3]) end
local left = math.ceil(tonumber(ARGV[1]) - tonumber(ARGV[2]))
if left > redis.call('TTL', KEYS[1]) then redis.call('EXPIRE', KEYS[1], left) end
return 1
"""


def _batches(sizes: Sequence[int], limit: int) -> list[range]:
    """Consecutive index ranges whose ``sizes`` add up to about ``limit`` (at least one each)."""
    out, start, acc = [], 0, 0
    for i, n in enumerate(sizes):
        if acc and acc + n > limit:
            out.append(range(start, i))
            start, acc = i, 0
        acc += n
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def redact(url: str) -> str:
    """``url`` without its password (for stats and logs)."""
    parts = []
    for u in url.split(","):
        p = urllib.parse.urlsplit(u.strip())
        if p.password is not None:
            netloc = f"{p.username or ''}:***@{p.hostname}" + (f":{p.port}" if p.port else "")
            p = p._replace(netloc=netloc)
        parts.append(urllib.parse.urlunsplit(p))
    return ",".join(parts)


def _reason(e: Exception) -> str:
    """The ``remote_errors`` reason of a client exception."""
    if isinstance(e, redis.AuthenticationError) or "NOAUTH" in str(e) or "WRONGPASS" in str(e) \
            or "NOPERM" in str(e):
        return "auth"
    if isinstance(e, redis.TimeoutError):
        return "timeout"
    if isinstance(e, (redis.ConnectionError, OSError)):
        return "connection"
    if isinstance(e, redis.exceptions.OutOfMemoryError) or str(e).startswith("OOM"):
        return "oom"
    return "other"


_BREAKING = ("auth", "timeout", "connection")


class _Down(Exception):
    """The breaker is open: the server is not asked."""


class RemoteTier:
    """The remote tier (see ``Tier`` in base.py for each method's contract).

    Args:
        url: ``redis://[user:password@]host:port[/db]``, ``rediss://...`` (TLS),
            ``unix:///path.sock``, or comma-separated ``redis://`` seed nodes of a cluster.
        ttl_s: idle time after which the server drops a block (refreshed on every hit).
        timeout_s: the most any request waits on one socket operation.
        codec: encodes blocks that arrive without a record (the disk tier's codec).
        metrics: sink for hits, misses, errors, round trips, bytes.
        password: overrides the URL's; default ``$KVSTORE_REMOTE_PASSWORD``.
        prefix: what every key of this tier starts with.
        pool_size: most connections open at once.
        encode_threads: threads compressing one write batch.

    Never raises for the server's faults; an unreachable server at open starts disconnected.
    """

    name = "remote"
    slow = True
    shared = True
    networked = True

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # a property: torch is imported on first use (lazy_torch)

    def __init__(self, url: str, ttl_s: float, timeout_s: float, codec: Codec,
                 metrics: Metrics | None = None, password: str | None = None,
                 prefix: str = PREFIX, pool_size: int = 8, encode_threads: int = 2):
        self.url = parse_url(url)
        if not url:
            raise ConfigError("remote_url: expected a server URL, got ''")
        self.server = redact(url)
        self.ttl_s, self.timeout_s, self.codec = ttl_s, timeout_s, codec
        self.metrics = metrics or Metrics()
        self.prefix = prefix.encode()
        self._password = password if password is not None else os.environ.get(PASSWORD_ENV) or None
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self._local = threading.local()  # a scratch buffer per io thread
        self._pending: dict[bytes, float] = {}  # key -> last access not yet sent
        self._up = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.last_error = ""
        self.client = None  # a cluster client asks its seeds for the slot map when built
        try:
            self.client = self._connect()
            self.client.ping()
            self._up.set()
        except Exception as e:  # unreachable at open: start disconnected, keep trying
            self._failed(e)
        self._encoders = concurrent.futures.ThreadPoolExecutor(encode_threads,
                                                               thread_name_prefix="kvstore-remote-enc")
        self._thread = threading.Thread(target=self._background, name="kvstore-remote", daemon=True)
        self._thread.start()

    # -- connection and breaker -------------------------------------------------------------
    def _connect(self):
        t = self.timeout_s
        # RESP2: resp.py reads the replies of large values itself, and RESP2 has no pushes
        # that could arrive between them.
        common = dict(socket_timeout=t, socket_connect_timeout=t, retry=Retry(NoBackoff(), 0), protocol=2,
                      health_check_interval=0, socket_read_size=SOCKET_READ_SIZE)
        seeds = [u.strip() for u in self.url.split(",")]
        if len(seeds) > 1:
            first = urllib.parse.urlsplit(seeds[0])
            return RedisCluster(
                startup_nodes=[ClusterNode(urllib.parse.urlsplit(u).hostname,
                                           urllib.parse.urlsplit(u).port or 6379) for u in seeds],
                username=first.username, password=self._password or first.password,
                ssl=first.scheme == "rediss", require_full_coverage=False,
                max_connections=self._pool_size, **common)
        kw = dict(common, max_connections=self._pool_size)
        if self._password:
            kw["password"] = self._password
        return redis.Redis.from_url(seeds[0], **kw)

    @property
    def reachable(self) -> bool:
        return self._up.is_set()

    def _failed(self, e: Exception) -> str:
        reason = _reason(e)
        self.metrics.add("remote_errors", tier=self.name, reason=reason)
        self.last_error = reason
        if reason in _BREAKING and self._up.is_set():
            self._up.clear()
            log.warning("kvstore remote tier %s unreachable (%s): serving misses, reconnecting",
                        self.server, reason)
            self._wake.set()
        return reason

    def _call(self, op: str, fn: Callable[[], list]) -> list:
        """Runs one exchange ``fn`` (it returns one reply per command, errors inline); raises
        _Down when the server is not asked or failed (counted), else returns the replies."""
        if not self._up.is_set():
            self.metrics.add("remote_errors", tier=self.name, reason="breaker_open")
            raise _Down
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:
            self._failed(e)
            raise _Down from None
        self.metrics.observe("remote_round_trip_seconds", time.perf_counter() - t0, op=op)
        moved = False
        for r in out:
            if isinstance(r, Exception):
                self._failed(r)
                if _reason(r) in _BREAKING:
                    raise _Down
                moved = moved or str(r).startswith(("MOVED", "ASK"))
        if moved and isinstance(self.client, RedisCluster):
            try:  # the cluster resharded: the next exchange asks the right shards
                self.client.nodes_manager.initialize()
            except Exception as e:
                self._failed(e)
        return out

    def _run(self, op: str, build: Callable) -> list:
        """``_call`` of one redis-py pipeline (``build(pipe)`` adds its commands)."""
        def go():
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            return pipe.execute(raise_on_error=False)
        return self._call(op, go)

    def _background(self) -> None:
        """Reconnects with backoff while down; sends pending touches while up."""
        wait = BACKOFF_S[0]
        while not self._stop.is_set():
            if self._up.is_set():
                wait = BACKOFF_S[0]
                self._wake.wait(TOUCH_EVERY_S)
                self._wake.clear()
                if self._up.is_set() and not self._stop.is_set():
                    self._send_touches()
                continue
            self._stop.wait(wait)
            if self._stop.is_set():
                return
            try:
                if self.client is None:
                    self.client = self._connect()
                self.client.ping()
                self._up.set()
                log.info("kvstore remote tier %s reachable again", self.server)
            except Exception as e:
                self.last_error = _reason(e)
                wait = min(2 * wait, BACKOFF_S[1])

    def status(self) -> dict:
        """The server (password redacted), whether it answers now, the last fault seen, and how
        this machine writes its records (``remote_compression``)."""
        return {"server": self.server, "reachable": self.reachable, "last_error": self.last_error,
                "compression": self.codec.compression}

    def _k(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    def configure(self, block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        pass  # records are self-describing

    # -- reads -------------------------------------------------------------------------------
    def _live(self, key: bytes, a, p, now: float | None) -> bool:
        if a is None:
            return False
        if now is None:
            return True
        pend = self._pending.get(key, 0.0)
        return is_live(max(float(a), pend), float(p or 0), now, self.ttl_s)

    def contains_many(self, keys: Sequence[bytes], now: float, stop_at_miss: bool = False) -> list[bool]:
        if not keys:
            return []
        try:
            replies = self._run("contains", lambda pipe: [pipe.getrange(self._k(k), 0, 2 * _NUM - 1)
                                                          for k in keys])
        except _Down:
            return [False] * (1 if stop_at_miss else len(keys))
        out = []
        for k, h in zip(keys, replies):
            head = _head(h) if isinstance(h, bytes) else None
            out.append(head is not None and self._live(k, head[0], head[1], now))
            if stop_at_miss and not out[-1]:
                break
        return out

    def _stream(self, names: Sequence[bytes], batches: Sequence[range],
                pieces: Callable[[range], dict[int, list]],
                read: Callable[[resp.Reader, int], None]) -> None:
        """Sends the commands of ``batches`` (consecutive index ranges into ``names``) on one
        connection per server: ``pieces(batch)`` gives each index's command as pieces (called
        once a batch, in order), and the replies of a batch are read (``read(reader, i)``, in
        order) after the next batch is sent, so the socket waits neither for the caller's work
        on a batch nor for the server to drain one (each did cost 10-15% of a put here).
        Raises what the exchange raises; every connection it used is then dropped."""
        unread: dict = {}  # pool -> ((connection, reader), indices whose replies are unread)
        with contextlib.ExitStack() as stack:
            for r in batches:
                out = pieces(r)
                for pool, idx in resp.node_groups(self.client, [names[i] for i in r]):
                    idx = [r[j] for j in idx]
                    if pool not in unread:
                        unread[pool] = (stack.enter_context(resp.exchange(pool)), [])
                    (conn, reader), before = unread[pool]
                    resp.send(conn, [p for i in idx for p in out[i]])
                    for i in before:
                        read(reader, i)
                    unread[pool] = ((conn, reader), idx)
            for (conn, reader), idx in unread.values():
                for i in idx:
                    read(reader, i)

    def get_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor],
                 now: float | None = None) -> list[bool]:
        """Pipelined GETs in batches of about BATCH_BYTES (``_stream``: the server always has
        the next batch's requests), each reply read into its destination as it arrives. A
        fault keeps the blocks read before it as hits; the rest are misses."""
        if not keys:
            return []
        names = [self._k(k) for k in keys]
        got: list = [False] * len(keys)  # per key: True, False (a miss), "corrupt" or an error

        def read(reader: resp.Reader, i: int) -> None:
            got[i] = self._read_block(reader, keys[i], outs[i], now)

        def go():
            self._stream(names, _batches([o.nbytes for o in outs], BATCH_BYTES),
                         lambda r: {i: [resp.command("GET", names[i])] for i in r}, read)
            return [g for g in got if isinstance(g, Exception)]
        try:
            self._call("get", go)
        except _Down:
            pass  # the blocks read before the fault are hits; the rest are misses
        corrupt = [k for k, g in zip(keys, got) if g == "corrupt"]
        ok = [g is True for g in got]
        self.metrics.add("remote_bytes", sum(o.nbytes for o, hit in zip(outs, ok) if hit),
                         tier=self.name, direction="in")
        self.metrics.add("remote_hits", ok.count(True), tier=self.name)
        self.metrics.add("remote_misses", ok.count(False), tier=self.name)
        if corrupt:
            self.metrics.add("corrupt_records", len(corrupt), tier=self.name)
            self.metrics.add("remote_errors", len(corrupt), tier=self.name, reason="corrupt")
            self._delete(corrupt)
        return ok

    def _read_block(self, reader: resp.Reader, key: bytes, out: torch.Tensor,
                    now: float | None) -> bool | str | Exception:
        """Reads one GET reply into ``out``: True, False (absent or expired), ``"corrupt"``,
        or the error the server replied. The reply is read to its end whatever it holds."""
        n = reader.head()
        if n is None or isinstance(n, Exception):
            return False if n is None else n
        left, got = n, True
        try:
            if left < _HEAD:
                raise CorruptEntryError("value shorter than a block's head")
            head = _head(reader.take(_HEAD))
            left -= _HEAD
            if head is None or head[2] > left:
                raise CorruptEntryError("bad value head")
            reader.skip(head[2])  # the metadata: entries() reads it
            left -= head[2]
            if not self._live(key, head[0], head[1], now):
                got = False
            else:
                if left < PREFIX_SIZE:
                    raise CorruptEntryError("record truncated")
                prefix = reader.take(PREFIX_SIZE)
                left -= PREFIX_SIZE
                hlen = head_size(prefix) - PREFIX_SIZE
                if hlen > left:
                    raise CorruptEntryError("record truncated inside its header")
                h = Codec.read_header(prefix + reader.take(hlen))
                left -= hlen
                out = Codec.output(h, out)
                if Codec.verbatim(h) and left == out.nbytes:
                    hasher = Codec.payload_hasher()
                    # Straight from the socket into the destination, hashed piece by piece.
                    reader.into(byte_view(out), hasher.update)
                    left = 0
                    Codec.check_verbatim(h, hasher)
                else:
                    payload = self._scratch(left)
                    reader.into(payload)
                    left = 0
                    self.codec.decode_payload(h, payload, out)
        except (CorruptEntryError, ValueError):
            got = "corrupt"
        # Socket errors propagate from above without this: the connection is dropped.
        reader.skip(left)
        reader.end()
        return got

    def _scratch(self, nbytes: int) -> memoryview:
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.scratch = aligned_empty(max(nbytes, 1))
        return memoryview(buf)[:nbytes]

    def entries(self) -> list[tuple[bytes, EntryMeta]]:
        """Every entry under this tier's prefix (a SCAN of every shard: an operator's call)."""
        self._send_touches()
        try:
            names = self._scan()
            replies = self._run("scan", lambda pipe: [pipe.getrange(n, 0, _SCAN_BYTES - 1)
                                                      for n in names])
        except _Down:
            return []
        out = []
        for n, v in zip(names, replies):
            head = _head(v[:_HEAD]) if isinstance(v, bytes) and len(v) >= _HEAD else None
            if head is None or _HEAD + head[2] > len(v):
                continue  # gone since the scan, or not a block's value
            a, p, ml = head
            try:
                key = bytes.fromhex(n[len(self.prefix):].decode())
                ns, depth, parent, created, raw, stored = msgpack.unpackb(v[_HEAD:_HEAD + ml])
            except ValueError:
                continue
            last = max(a, self._pending.get(key, 0.0))
            out.append((key, EntryMeta(ns, depth, parent, created, last, raw, stored, float(p or 0))))
        return out

    def _scan(self) -> list[bytes]:
        if not self._up.is_set():
            raise _Down
        try:
            match = self.prefix + b"*"
            if isinstance(self.client, RedisCluster):
                names = set()
                for node in self.client.get_primaries():
                    names.update(self.client.scan_iter(match=match, count=_SCAN_COUNT, target_nodes=node))
                return sorted(names)
            return sorted(set(self.client.scan_iter(match=match, count=_SCAN_COUNT)))
        except Exception as e:
            self._failed(e)
            raise _Down from None

    def usage(self) -> TierUsage:
        es = self.entries()
        return TierUsage(len(es), sum(m.stored_bytes for _, m in es), sum(m.raw_bytes for _, m in es), 0)

    # -- writes ------------------------------------------------------------------------------
    def put_many(self, entries: Sequence[BlockEntry], now: float,
                 on_evict: EvictCallback | None = None) -> list[bool]:
        """Encodes (unless an entry carries its record) and sets the entries in batches of
        about BATCH_BYTES (``_stream``), the next batch encoded while one is on the wire. A
        fault drops what the server had not acknowledged (counted)."""
        if not entries:
            return []
        sizes = [e.meta.raw_bytes or (e.block.nbytes if e.block is not None else 0) for e in entries]
        batches = _batches(sizes, BATCH_BYTES)
        names = [self._k(e.key) for e in entries]
        expiry = max(1, int(self.ttl_s + 0.999))
        replies: list = [None] * len(entries)
        upcoming = iter(batches)
        ahead = self._encode([entries[i] for i in next(upcoming)])
        sent = 0

        def pieces(r: range) -> dict[int, list]:
            nonlocal ahead, sent
            records = [x.result() if isinstance(x, concurrent.futures.Future) else x for x in ahead]
            nxt = next(upcoming, None)  # called once a batch, in order: nxt is the one after r
            ahead = self._encode([entries[i] for i in nxt]) if nxt is not None else []
            sent += sum(memoryview(p).nbytes for rec in records for p in rec)
            return {i: resp.set_value(names[i], self._value(entries[i], rec), expiry)
                    for i, rec in zip(r, records)}

        def read(reader: resp.Reader, i: int) -> None:
            replies[i] = reader.reply()

        def go():
            self._stream(names, batches, pieces, read)
            return [r for r in replies if r is not None]
        try:
            self._call("put", go)
        except _Down:
            pass  # what was acknowledged before the fault is stored; the rest is dropped
        self.metrics.add("remote_bytes", sent, tier=self.name, direction="out")
        ok = [r is not None and not isinstance(r, Exception) for r in replies]
        self.metrics.add("dropped_writes", ok.count(False), tier=self.name, reason="io_error")
        return ok

    def _encode(self, entries: Sequence[BlockEntry]) -> list:
        """Per entry: its record's pieces, or a future of them being encoded (zstd and xxh3
        release the GIL, so the encoders use every core)."""
        return [[e.record] if e.record is not None else self._encoders.submit(self.codec.encode_parts, e.block)
                for e in entries]

    @staticmethod
    def _value(e: BlockEntry, record: list) -> list:
        """A block's value as pieces: its times, its metadata, then its record's pieces."""
        m = e.meta
        size = sum(memoryview(p).nbytes for p in record)
        meta = msgpack.packb([m.namespace_id, m.depth, m.parent, m.created, m.raw_bytes, size])
        return [_num(m.last_access) + _num(m.pinned_until) + b"%04d" % len(meta) + meta, *record]

    def touch_many(self, keys: Sequence[bytes], now: float) -> None:
        """Queues the touch: sent within TOUCH_EVERY_S by the background thread, or by flush."""
        with self._lock:
            for k in keys:
                if now > self._pending.get(k, 0.0):
                    self._pending[k] = now

    def _send_touches(self) -> None:
        with self._lock:
            touches, self._pending = self._pending, {}
        if not touches:
            return
        ttl = repr(float(self.ttl_s))
        try:
            self._run("touch", lambda pipe: [pipe.eval(_TOUCH, 1, self._k(k), repr(t), ttl, _num(t))
                                             for k, t in touches.items()])
        except _Down:
            pass  # best effort: the server's expiry may then come a little early

    def pin_many(self, keys: Sequence[bytes], until: float) -> int:
        if not keys:
            return 0
        wall = repr(time.time())  # the server's expiry counts in wall time
        try:
            replies = self._run("pin", lambda pipe: [pipe.eval(_PIN, 1, self._k(k), repr(float(until)),
                                                               wall, _num(until)) for k in keys])
        except _Down:
            return 0
        return sum(1 for r in replies if r == 1)

    def _delete(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            for k in keys:
                self._pending.pop(k, None)
        try:
            replies = self._run("delete", lambda pipe: [pipe.delete(self._k(k)) for k in keys])
        except _Down:
            return 0
        return sum(r for r in replies if isinstance(r, int))

    def delete_many(self, keys: Sequence[bytes]) -> int:
        return self._delete(keys)

    def _remove(self, chosen: list[tuple[bytes, EntryMeta]], reason: str) -> list[Evicted]:
        if not chosen:
            return []
        self._delete([k for k, _ in chosen])
        self.metrics.add("evictions", len(chosen), tier=self.name, reason=reason)
        return [Evicted(k, m, None, reason) for k, m in chosen]

    def purge(self, select: Callable[[bytes, EntryMeta], bool], now: float,
              reason: str = "purge") -> list[Evicted]:
        return self._remove([(k, m) for k, m in self.entries() if select(k, m)], reason)

    def expire(self, now: float) -> list[Evicted]:
        return self._remove([(k, m) for k, m in self.entries() if is_expired(m, now, self.ttl_s)], "ttl")

    def flush(self) -> None:
        """Sends pending last-access times (bounded by the timeout)."""
        self._send_touches()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(2 * self.timeout_s + BACKOFF_S[1])
        self.flush()
        self._encoders.shutdown(wait=True)
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
