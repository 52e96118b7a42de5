"""The dashboard's remote tile, against a real valkey-server: reachable with the blocks it
served, then unreachable once the server is gone (the exporter's gauge follows the breaker)."""

import time

from kvstore import KVStore, StoreConfig
from tools.exporter import start_metrics_server
from tools.valkey_server import ValkeyServer

from ..conftest import BLOCK_TOKENS, SHAPE, make_block
from .test_dashboard import SAMPLE_S, browser, wait_for_samples  # noqa: F401 (the fixture)


def open_machine(tmp_path, name, url):
    return KVStore.open(StoreConfig(path=tmp_path / name, block_tokens=BLOCK_TOKENS, host_bytes=0,
                                    disk_bytes=1 << 22, remote_url=url, remote_timeout_s=0.5,
                                    block_shape=SHAPE, dtype="bfloat16"))


def test_the_remote_tile_shows_hits_then_an_unreachable_server(browser, tmp_path):  # noqa: F811
    tokens = list(range(3 * BLOCK_TOKENS + 1))
    with ValkeyServer() as server:
        with open_machine(tmp_path, "a", server.url) as a:
            a.put(tokens, [make_block(i) for i in range(3)])
            assert a.flush()
        b = open_machine(tmp_path, "b", server.url)
        try:
            assert len(b.get(b.match(tokens))) == 3  # all three from Valkey
            with start_metrics_server(b, port=0, interval_s=SAMPLE_S) as exporter:
                browser.get(exporter.url)
                wait_for_samples(browser, 2)
                tile = "return [document.querySelector('#remote .value').textContent, " \
                       "document.querySelector('#remote .sub').textContent]"
                value, sub = browser.run(tile)
                assert value == "reachable" and sub.startswith("3 hit / 0 miss blocks")
                server.kill()
                assert b.match(tokens).tiers == ("disk",) * 3  # promoted on the hit: local now
                assert b.match([t + 1 for t in tokens]).num_blocks == 0  # asks Valkey: the breaker opens
                n = len(exporter.history.table()["samples"])
                time.sleep(SAMPLE_S * 3)
                wait_for_samples(browser, n + 2)
                value, sub = browser.run(tile)
                assert value == "unreachable" and "0 errors" not in sub
                assert browser.run("return window.__errors") == []
        finally:
            b.close()
