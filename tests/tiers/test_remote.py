"""The remote tier in a store, against real valkey-servers started here: machines share
prefixes bit-exact, a machine with an empty disk starts warm, tenants stay apart, and every
server fault (stalled, killed, restarted empty, evicting, refusing auth) is a counted miss."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis
import torch

from kvstore import KVStore, StoreConfig
from kvstore.keys import make_namespace
from tools.valkey_server import ValkeyCluster, ValkeyServer

from ..conftest import BLOCK_TOKENS, SHAPE, block_nbytes, make_block
from .remote_machine import prompt

TIMEOUT = 0.2


@pytest.fixture
def server():
    with ValkeyServer() as s:
        yield s


def machine(tmp_path, name, url, *args):
    out = subprocess.run([sys.executable, "-m", "tests.tiers.remote_machine", str(tmp_path / name), url,
                          *map(str, args)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def open_remote(tmp_path, name, url, clock=time.time, **kw):
    kw = {"remote_timeout_s": TIMEOUT, "host_bytes": 64 * block_nbytes(), "disk_bytes": 1 << 22, **kw}
    cfg = StoreConfig(path=tmp_path / name, block_tokens=BLOCK_TOKENS, remote_url=url,
                      block_shape=SHAPE, dtype="bfloat16", **kw)
    return KVStore.open(cfg, clock=clock)


def wait_until(cond, what, limit_s=20.0):
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def blocks(seed, n):
    return [make_block(seed * 1000 + i) for i in range(n)]


def same(a, b):
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# -- machines sharing one server ------------------------------------------------------------------
def test_two_machines_share_prefixes_bit_exact_and_the_second_starts_warm(tmp_path, server):
    a = machine(tmp_path, "a", server.url, "put", "ns", 5, 4)
    assert a["stored"] == 4 and a["flushed"]
    b = machine(tmp_path, "b", server.url, "get", "ns", 5, 4)  # empty disk, empty RAM
    assert b["tiers"] == ["remote"] * 4
    assert b["digests"] == a["digests"]
    assert b["again"] == ["host"] * 4  # promoted like a disk hit
    again = machine(tmp_path, "b", server.url, "get", "ns", 5, 4)  # restarted: its disk has them
    assert again["tiers"] == ["disk"] * 4 and again["digests"] == a["digests"]


def test_tenants_with_other_salts_never_read_each_others_blocks(tmp_path, server):
    ns1, ns2 = (make_namespace("m", "layout", "bfloat16", tenant_salt=s) for s in ("t1", "t2"))
    tokens, bs = prompt(6, 3), blocks(6, 3)
    with open_remote(tmp_path, "a", server.url) as a:
        a.put(tokens, bs, namespace=ns1)
        assert a.flush()
    with open_remote(tmp_path, "b", server.url) as b:  # another machine, another tenant
        assert b.match(tokens, namespace=ns2).num_blocks == 0
        m = b.match(tokens, namespace=ns1)
        assert m.tiers == ("remote",) * 3 and all(same(x, y) for x, y in zip(b.get(m), bs))


def test_machines_writing_other_remote_compressions_read_each_others_blocks(tmp_path, server):
    """remote_compression is each machine's own: "none" stores the block verbatim, "zstd-hi"
    compressed; each machine reads the other's bit-exact."""
    from kvstore.codec import Codec
    from kvstore.tiers import remote

    tokens_a, tokens_b, bs = prompt(11, 4), prompt(12, 4), blocks(11, 4)
    cfg = dict(host_bytes=0, disk_bytes=0)
    with open_remote(tmp_path, "a", server.url, remote_compression="none", **cfg) as a, \
            open_remote(tmp_path, "b", server.url, remote_compression="zstd-hi", **cfg) as b:
        a.put(tokens_a, bs)
        b.put(tokens_b, bs)
        assert a.flush() and b.flush()
        codecs = {}
        for reader, writer, tokens in ((b, "a", tokens_a), (a, "b", tokens_b)):
            m = reader.match(tokens)
            assert m.tiers == ("remote",) * 4
            assert all(same(x, y) for x, y in zip(reader.get(m), bs))
            for k, block in zip(m.keys, bs):
                value = reader.tier("remote").client.get(reader.tier("remote")._k(k))
                rec = value[remote._HEAD + remote._head(value[:remote._HEAD])[2]:]
                codecs.setdefault(writer, set()).add(Codec.read_header(rec)["codec"])
                verbatim = block.contiguous().view(torch.uint8).numpy().tobytes() in rec
                assert verbatim == (writer == "a")
    assert codecs == {"a": {"none"}, "b": {"zstd-hi"}}


@pytest.mark.heavy
def test_a_three_shard_cluster_spreads_one_prompt_and_serves_it(tmp_path):
    with ValkeyCluster(3) as cluster:
        a = machine(tmp_path, "a", cluster.url, "put", "ns", 7, 12)
        sizes = [int(n.command("DBSIZE")) for n in cluster.nodes]
        assert sum(sizes) == 12 and all(sizes), sizes  # every shard holds some of the prompt
        b = machine(tmp_path, "b", cluster.url, "get", "ns", 7, 12)
        assert b["tiers"] == ["remote"] * 12 and b["digests"] == a["digests"]


# -- faults ---------------------------------------------------------------------------------------
def _shared(tmp_path, url, n=4, seed=1, **kw):
    """Machine a stores a prompt; returns (tokens, blocks, machine b: a store with an empty disk)."""
    tokens, bs = prompt(seed, n), blocks(seed, n)
    with open_remote(tmp_path, "a", url, **kw) as a:
        a.put(tokens, bs)
        assert a.flush()
    return tokens, bs, open_remote(tmp_path, "b", url, **kw)


def errors(store, reason):
    return store.metrics.value("remote_errors", tier="remote", reason=reason)


def test_a_stalled_server_is_a_miss_and_flush_and_close_return(tmp_path, server):
    tokens, bs, b = _shared(tmp_path, server.url)
    server.pause()
    try:
        m = b.match(tokens)
        assert m.num_blocks == 0 and errors(b, "timeout") == 1
        assert b.match(tokens).num_blocks == 0 and errors(b, "timeout") == 1  # breaker: not asked
        assert errors(b, "breaker_open") >= 1
        b.put(prompt(2, 2), blocks(2, 2))
        b.flush(timeout=5)  # returns: the queued remote write is dropped, not waited on
        b.close()
    finally:
        server.resume()


def test_a_killed_server_is_a_miss_and_the_tier_reconnects_when_it_is_back(tmp_path, server):
    tokens, bs, b = _shared(tmp_path, server.url)
    with b:
        remote = b.tier("remote")
        server.kill()
        assert b.match(tokens).num_blocks == 0
        assert errors(b, "connection") >= 1 and not remote.reachable
        server.start()  # back, empty
        wait_until(lambda: remote.reachable, "the tier reconnects")
        assert b.match(tokens).num_blocks == 0  # restarted empty: a plain miss
        b.put(tokens, bs)
        assert b.flush()
    with open_remote(tmp_path, "c", server.url) as c:
        m = c.match(tokens)
        assert m.tiers == ("remote",) * 4
        assert all(same(x, y) for x, y in zip(c.get(m), bs))


def test_a_server_restarted_empty_is_a_miss_and_local_tiers_still_hit(tmp_path, server):
    tokens, bs = prompt(3, 3), blocks(3, 3)
    with open_remote(tmp_path, "a", server.url) as a:
        a.put(tokens, bs)
        assert a.flush()
        server.restart()
        wait_until(lambda: a.tier("remote").reachable, "reconnected")
        assert a.match(tokens).tiers == ("host",) * 3
    with open_remote(tmp_path, "b", server.url) as b:
        assert b.match(tokens).num_blocks == 0


def used_memory(server) -> int:
    return int(server.command("INFO", "memory").split("used_memory:")[1].split()[0])


def test_server_eviction_under_maxmemory_leaves_only_whole_correct_prefixes(tmp_path, server):
    prompts = {s: (prompt(s, 8), blocks(s, 8)) for s in range(10, 20)}
    with open_remote(tmp_path, "a", server.url) as a:
        for tokens, bs in prompts.values():
            a.put(tokens, bs)
        assert a.flush()
        # Below what the blocks use now: the next writes make the server evict (allkeys-lru).
        server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        server.command("CONFIG", "SET", "maxmemory", used_memory(server) - 30 * block_nbytes())
        a.put(prompt(30, 4), blocks(30, 4))
        assert a.flush()
    assert int(server.command("INFO", "stats").split("evicted_keys:")[1].split()[0]) > 0
    with open_remote(tmp_path, "b", server.url) as b:
        hits = 0
        for tokens, bs in prompts.values():
            m = b.match(tokens)
            got = b.get(m)
            hits += len(got)
            assert all(same(x, y) for x, y in zip(got, bs))  # a prefix, bit-exact
        assert hits < 80
        assert sum(errors(b, r) for r in ("timeout", "connection", "other")) == 0


def test_a_server_refusing_writes_drops_them_counted(tmp_path, server):
    server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    server.command("CONFIG", "SET", "maxmemory", 1)
    with open_remote(tmp_path, "a", server.url) as a:
        a.put(prompt(4, 2), blocks(4, 2))
        a.flush()
        assert errors(a, "oom") >= 1
        assert a.metrics.value("dropped_writes", tier="remote", reason="io_error") == 2
        assert a.tier("remote").reachable  # refused writes are no outage
        assert a.match(prompt(4, 2)).tiers == ("host",) * 2


def test_wrong_credentials_are_misses_and_never_printed(tmp_path, capfd, caplog):
    with ValkeyServer(password="right-secret") as s:
        s.command("ACL", "SETUSER", "engine", "on", ">engine-pw", "~*", "+@all")
        good = s.url.replace("redis://", "redis://engine:engine-pw@")
        tokens, bs, b = _shared(tmp_path, good)
        b.close()
        bad = s.url.replace("redis://", "redis://engine:wrong-pw@")
        with open_remote(tmp_path, "c", bad) as c:
            assert not c.tier("remote").reachable and errors(c, "auth") == 1
            assert c.match(tokens).num_blocks == 0
            assert "wrong-pw" not in c.tier("remote").server
        out, err = capfd.readouterr()
        assert "wrong-pw" not in out + err + caplog.text
        assert "engine-pw" not in out + err + caplog.text


def test_an_unreachable_server_at_open_costs_misses_only(tmp_path):
    from tools.ports import free_port
    with open_remote(tmp_path, "a", f"redis://127.0.0.1:{free_port()}") as a:
        tokens, bs = prompt(8, 3), blocks(8, 3)
        assert a.put(tokens, bs) == 3
        assert a.flush()
        assert a.match(tokens).tiers == ("host",) * 3
        assert errors(a, "breaker_open") >= 1


# -- operations -----------------------------------------------------------------------------------
def test_stats_shows_the_remote_tier_and_purge_reaches_it(tmp_path, server, kv, monkeypatch):
    keep, gone = (make_namespace("m", "layout", "bfloat16", tenant_salt=s) for s in ("keep", "gone"))
    with open_remote(tmp_path, "a", server.url) as a:
        a.put(prompt(1, 3), blocks(1, 3), namespace=keep)
        a.put(prompt(2, 2), blocks(2, 2), namespace=gone)
        assert a.flush()
        a.match(prompt(1, 3), namespace=keep)
    monkeypatch.setenv("KVSTORE_REMOTE_URL", server.url.replace("redis://", "redis://default:pw@"))
    code, data, _ = kv("stats", "--path", tmp_path / "a", "--json")
    assert code == 0, data
    r = data["tiers"]["remote"]
    assert r["entries"] == 5 and r["reachable"] and "pw@" not in r["server"] and "***" in r["server"]
    assert r["compression"] == "none"  # this machine's remote_compression (the default)
    code, text, _ = kv("stats", "--path", tmp_path / "a")
    assert "remote tier" in text and "5 blocks" in text and "reachable" in text
    assert "remote_compression none" in text
    code, _, _ = kv("purge", "--path", tmp_path / "a", "--namespace", gone)
    assert code == 0
    with open_remote(tmp_path, "b", server.url) as b:  # another machine sees the purge
        assert b.match(prompt(2, 2), namespace=gone).num_blocks == 0
        assert b.match(prompt(1, 3), namespace=keep).tiers == ("remote",) * 3


@pytest.mark.heavy
def test_a_cluster_unreachable_at_open_starts_disconnected_and_joins_later(tmp_path):
    from tools.ports import free_port
    cluster = ValkeyCluster(3)
    for node in cluster.nodes:
        node.port = free_port()
    with open_remote(tmp_path, "a", cluster.url) as a:  # nothing listens yet
        assert not a.tier("remote").reachable
        assert a.match(prompt(9, 2)).num_blocks == 0
        with cluster:
            wait_until(lambda: a.tier("remote").reachable, "the tier joins the cluster")
            a.put(prompt(9, 2), blocks(9, 2))
            assert a.flush()
            with open_remote(tmp_path, "b", cluster.url) as b:
                assert b.match(prompt(9, 2)).tiers == ("remote",) * 2


def test_a_fresh_store_that_declares_its_layout_loads_what_others_stored(tmp_path, server):
    tokens, bs = prompt(12, 3), blocks(12, 3)
    with open_remote(tmp_path, "a", server.url) as a:
        a.put(tokens, bs)
        assert a.flush()
    cfg = StoreConfig(path=tmp_path / "b", block_tokens=BLOCK_TOKENS, host_bytes=64 * block_nbytes(),
                      disk_bytes=1 << 22, remote_url=server.url)  # no layout in its config
    with KVStore.open(cfg) as b:
        m = b.match(tokens)
        assert m.tiers == ("remote",) * 3 and b.get(m) == []  # no layout: nothing to decode into
        b.declare_layout(SHAPE, torch.bfloat16)
        got = b.get(b.match(tokens))
        assert len(got) == 3 and all(same(x, y) for x, y in zip(got, bs))
        with pytest.raises(ValueError, match="expected shape"):
            b.declare_layout((1, 2), torch.bfloat16)


def test_a_connection_reset_mid_batch_is_a_miss_never_a_torn_block(tmp_path, server):
    """The server's reply to a pipelined load is cut by a reset halfway: the load returns at
    most an exact prefix (no block from the torn reply), the fault is counted, and once the
    tier reconnects the same load is whole and bit-exact."""
    from .reset_proxy import ResetProxy

    tokens, bs = prompt(7, 8), blocks(7, 8)
    with open_remote(tmp_path, "a", server.url) as a:
        a.put(tokens, bs)
        assert a.flush()
    with ResetProxy(server.port) as proxy, open_remote(tmp_path, "b", proxy.url) as b:
        m = b.match(tokens)
        assert m.tiers == ("remote",) * 8
        proxy.reset_after(4 * block_nbytes())  # about half of the 8 records' reply
        got = b.get(m)
        assert proxy.resets == 1 and errors(b, "connection") == 1
        assert len(got) < 8 and all(same(x, y) for x, y in zip(got, bs))
        wait_until(lambda: b.tier("remote").reachable, "the tier reconnects")
        m = b.match(tokens)
        again = b.get(m)
        assert len(again) == 8 and all(same(x, y) for x, y in zip(again, bs))


def test_put_never_waits_on_the_server(tmp_path, server):
    """put() asks the remote tier nothing on the caller's thread: with the server stalled, it
    returns before the first timeout could fire (the writer thread's question then times out)."""
    with open_remote(tmp_path, "a", server.url, remote_timeout_s=3.0) as a:
        a.put(prompt(8, 2), blocks(8, 2))
        assert a.flush()
        server.pause()
        try:
            tokens = prompt(9, 4)
            a.put(tokens, blocks(9, 4))
            assert errors(a, "timeout") == 0  # put did not wait 3 s on the stalled server
            wait_until(lambda: errors(a, "timeout") >= 1, "a writer's round trip times out")
        finally:
            server.resume()


def test_batches_larger_than_one_pipeline_arrive_whole_and_in_place(server, monkeypatch):
    """Gets and puts go in pipelines of about BATCH_BYTES: with a budget of one block a
    pipeline, every block of a batch (a miss among them) is still stored and loaded exactly."""
    from kvstore.codec import Codec
    from kvstore.eviction import EntryMeta
    from kvstore.tiers import remote
    from kvstore.tiers.base import BlockEntry

    monkeypatch.setattr(remote, "BATCH_BYTES", block_nbytes())
    tier = remote.RemoteTier(server.url, 3600.0, 2.0, Codec(), prefix="test:batches:")
    try:
        bs = blocks(3, 5)
        es = [BlockEntry(bytes([i]) * 16, b, EntryMeta(0, i, b"", 1.0, 1.0, b.nbytes)) for i, b in enumerate(bs)]
        assert tier.put_many(es, 1.0) == [True] * 5
        rounds = tier.metrics.snapshot()["histograms"]["remote_round_trip_seconds"]
        # The five batches go out on one connection, each batch's replies read after the next
        # is sent: one exchange, not a round trip a batch.
        assert sum(h["count"] for k, h in rounds.items() if dict(k)["op"] == "put") == 1
        keys = [es[4].key, es[0].key, b"\xff" * 16, es[2].key, es[1].key, es[3].key]
        outs = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in keys]
        assert tier.get_many(keys, outs, None) == [True, True, False, True, True, True]
        for out, i in zip(outs, [4, 0, None, 2, 1, 3]):
            assert same(out, bs[i]) if i is not None else not out.any()
    finally:
        tier.close()


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_large_verbatim_block_damaged_anywhere_is_a_counted_miss(server, where):
    """A verbatim record is read from the socket straight into the destination, in many reads,
    then checksummed there: a flipped byte anywhere (the first, which arrives in the reader's
    buffer with the reply's head, one from the middle, the last) is caught, and the next reply
    still reads whole."""
    from kvstore.codec import Codec
    from kvstore.eviction import EntryMeta
    from kvstore.tiers import remote
    from kvstore.tiers.base import BlockEntry

    shape = (8, 2, 8, 64, 64)  # 2 MiB of bf16: many reads of the socket, past the reader's buffer
    tier = remote.RemoteTier(server.url, 3600.0, 2.0, Codec("none", byte_split=False), prefix="test:big:")
    try:
        tier.configure(shape, torch.bfloat16)
        g = torch.Generator().manual_seed(5)
        bs = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2)]
        es = [BlockEntry(bytes([i]) * 16, b, EntryMeta(0, i, b"", 1.0, 1.0, b.nbytes)) for i, b in enumerate(bs)]
        assert tier.put_many(es, 1.0) == [True, True]
        name = tier._k(es[0].key)
        value = bytearray(tier.client.get(name))
        n = bs[0].nbytes  # verbatim: the value ends with the block's bytes
        value[{"first": len(value) - n, "middle": len(value) - n // 2, "last": len(value) - 1}[where]] ^= 0x10
        tier.client.set(name, bytes(value), keepttl=True)
        outs = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(2)]
        assert tier.get_many([es[0].key, es[1].key], outs, None) == [False, True]
        assert same(outs[1], bs[1])
        assert tier.metrics.value("corrupt_records", tier=tier.name) == 1
    finally:
        tier.close()
