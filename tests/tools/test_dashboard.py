"""The built-in dashboard, rendered by headless Chromium against a live exporter.

Chromium and chromedriver are installed with apt-get when missing (tools.browser); the test is
skipped, with the reason, only when that is impossible (no apt-get, no root, no network), and
never in CI (``CI=true``): there a missing browser fails the test.
"""

import os
import struct
import time

import pytest

from tools.browser import BrowserUnavailable, Chromium
from tools.exporter import start_metrics_server

from ..conftest import block_nbytes
from .test_exporter import traffic

SAMPLE_S = 0.2


@pytest.fixture(scope="module")
def browser():
    try:
        with Chromium(width=1280, height=1500) as b:
            yield b
    except BrowserUnavailable as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"headless Chromium unavailable in CI: {e}")
        pytest.skip(f"headless Chromium unavailable: {e}")


def wait_for_samples(browser, n):
    browser.wait_for(f"return document.body.dataset.ready && state.rows.length >= {n}")


def test_dashboard_shows_live_figures(browser, open_store, tmp_path):
    store = open_store(host_bytes=6 * block_nbytes())
    with start_metrics_server(store, port=0, interval_s=SAMPLE_S) as server:
        browser.get(server.url)
        for r in range(4):  # traffic spread over several samples: the charts get lines
            traffic(store, 3, first=10 * r)
            time.sleep(SAMPLE_S * 1.5)
        time.sleep(SAMPLE_S * 2)
        n = len(server.history.table()["samples"])
        wait_for_samples(browser, n)
        page = browser.run("""
            const text = id => document.querySelector(id + ' .value').textContent;
            const lines = id => [...document.querySelectorAll(id + ' path.line')]
                .filter(p => p.getAttribute('d').startsWith('M')).map(p => p.dataset.series);
            return {errors: window.__errors, hitRate: text('#hit-rate'), disk: text('#tier-disk'),
                    host: text('#tier-host'), requests: text('#requests'),
                    noteHidden: document.getElementById('note').hidden,
                    hit: lines('#chart-hit-rate'), occupancy: lines('#chart-occupancy'),
                    throughput: lines('#chart-throughput'), evictions: lines('#chart-evictions'),
                    latency: lines('#chart-latency')};""")
        shot = browser.screenshot(tmp_path / "dashboard.png")
    m = store.metrics
    hit = m.value("hit_tokens", tier="host") + m.value("hit_tokens", tier="disk")
    assert page["errors"] == []
    assert page["hitRate"] == f"{100 * hit / (hit + m.total('miss_tokens')):.1f}%"
    assert page["requests"] == str(int(m.total("requests")))
    disk_kib = store.tier("disk").usage().bytes / 1024
    assert page["disk"] == f"{disk_kib:.1f} KiB"
    assert page["noteHidden"] is True
    assert {"all tiers", "from host"} <= set(page["hit"])
    assert set(page["occupancy"]) == {"host", "disk"}
    assert {"load host", "store host", "store disk"} <= set(page["throughput"])
    assert "host capacity" in page["evictions"]
    assert {"load", "store"} <= set(page["latency"])
    png = shot.read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width == 1280 and height > 1000


def test_dashboard_of_serve_metrics_shows_lifetime_counters_and_explains_latency(browser, open_store):
    store = open_store(host_bytes=0)
    traffic(store, 2)
    with start_metrics_server(store, port=0, process_counters=False, interval_s=SAMPLE_S) as server:
        browser.get(server.url)
        wait_for_samples(browser, 2)
        page = browser.run("""return {errors: window.__errors, note: document.getElementById('note'),
            hitRate: document.querySelector('#hit-rate .value').textContent,
            hitChart: document.getElementById('chart-hit-rate').textContent,
            occupancy: document.querySelectorAll('#chart-occupancy path.line').length};""")
    c = store.lifetime_counters()
    hit = sum(v for k, v in c.items() if k.startswith("hit_tokens|"))
    miss = sum(v for k, v in c.items() if k.startswith("miss_tokens|"))
    assert page["errors"] == [] and hit + miss > 0
    assert page["hitRate"] == f"{100 * hit / (hit + miss):.1f}%"  # the store's lifetime figure
    assert page["occupancy"] == 1
    note = browser.run("return [document.getElementById('note').hidden, "
                       "document.getElementById('note').textContent]")
    assert note[0] is False and "lifetime totals" in note[1] and "latency" in note[1]


def test_dashboard_of_serve_metrics_on_a_store_an_engine_fills(browser, engine, kv, tmp_path):
    """`kvstore serve-metrics` in its own process, on a store an engine process (engine_proc)
    uses: while the engine serves lookups and a purge runs between samples, every tile shows a
    figure (none "—") equal to the store's lifetime counters, and the hit-rate, occupancy,
    throughput and eviction charts draw lines; latency, which only an engine's own exporter has,
    is left empty with the note saying why."""
    import json
    import signal
    import subprocess
    import sys

    from .conftest import ROOT
    from .engine_proc import DATASET

    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve-metrics", "--config", str(engine.config),
                             "--port", "0", "--interval", str(SAMPLE_S), "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = json.loads(proc.stdout.readline())["dashboard"]
        browser.get(url)
        wait_for_samples(browser, 1)
        ns, ids, _ = DATASET["main"]
        for r in range(4):  # traffic between samples: the rates get lines
            for _ in range(3):
                assert engine.ask("match", ns=ns, ids=ids)["blocks"] == 5
            if r == 1:
                assert kv("purge", "--config", engine.config, "--namespace", "tenant-b")[0] == 0
            engine.ask("flush")  # persists the engine's counters, as it does every few seconds
            seen = browser.run("return state.rows.length")
            wait_for_samples(browser, seen + 1)
        # One more sample, begun after the last flush had persisted the counters (the one
        # above may have been under way while it ran).
        wait_for_samples(browser, browser.run("return state.rows.length") + 1)
        page = browser.run("""
            const tiles = Object.fromEntries([...document.querySelectorAll('#tiles .tile')]
                .map(t => [t.id, t.querySelector('.value').textContent]));
            const lines = id => [...document.querySelectorAll(id + ' path.line')]
                .filter(p => p.getAttribute('d').startsWith('M')).map(p => p.dataset.series);
            return {errors: window.__errors, tiles, note: document.getElementById('note').textContent,
                    hit: lines('#chart-hit-rate'), occupancy: lines('#chart-occupancy'),
                    throughput: lines('#chart-throughput'), evictions: lines('#chart-evictions'),
                    latency: lines('#chart-latency')};""")
        shot = browser.screenshot(tmp_path / "dashboard.png", full_page=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr.read()
    code, stats, _ = kv("stats", "--config", engine.config, "--json")
    c = stats["counters"]
    assert page["errors"] == []
    assert set(page["tiles"]) >= {"hit-rate", "tier-disk", "requests", "evictions", "dropped", "corrupt"}
    assert "—" not in page["tiles"].values(), page["tiles"]
    assert page["tiles"]["requests"] == str(int(c["requests"]))
    assert page["tiles"]["evictions"] == str(int(c["evictions_total"])) != "0"
    assert page["hit"] and page["occupancy"] == ["disk"] and "load disk" in page["throughput"]
    assert "disk purge" in page["evictions"]
    assert page["latency"] == [] and "latency lives in the engine process" in page["note"]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[1] > 1000
