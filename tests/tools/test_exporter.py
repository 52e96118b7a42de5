"""The Prometheus exporter in an engine's process (`kvstore serve-metrics` is tested with the CLI)."""

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tools.exporter import start_metrics_server

from ..conftest import BLOCK_TOKENS as B, block_nbytes, make_block

GRAFANA = Path(__file__).resolve().parents[2] / "docs" / "kvstore-grafana-dashboard.json"


def traffic(store, prompts=6, first=0):
    """Puts and re-reads new chains; a small host tier makes it evict (and spill) too."""
    for p in range(first, first + prompts):
        ids = list(range(p * 1000, p * 1000 + 4 * B))
        m = store.match(ids)
        store.put(ids, [make_block(p * 10 + i) for i in range(4)])
        store.flush()  # disk writes may be queued behind the call: make them visible now
        m = store.match(ids + [7] * 5)
        assert len(store.get(m)) == 4


def scrape(url, accept=None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def busy_store(open_store):
    store = open_store(host_bytes=6 * block_nbytes())  # room for 6 blocks: evictions follow
    traffic(store)
    return store


def test_metrics_render_the_store_snapshot(busy_store):
    store = busy_store
    with start_metrics_server(store, port=0) as server:
        assert server.host == "127.0.0.1"  # never all interfaces unless asked
        ctype, text = scrape(server.url + "metrics")
    assert ctype.startswith("text/plain")
    got = samples(text)
    m = store.metrics
    for tier in ("host", "disk"):
        assert got[("kvstore_hit_tokens_total", (("tier", tier),))] == m.value("hit_tokens", tier=tier)
        u = next(t for t in store.tiers if t.name == tier).usage()
        assert got[("kvstore_entries", (("tier", tier),))] == u.entries
        assert got[("kvstore_bytes", (("tier", tier),))] == u.bytes
        assert got[("kvstore_budget_bytes", (("tier", tier),))] == u.budget
    assert got[("kvstore_miss_tokens_total", ())] == m.total("miss_tokens") > 0
    assert got[("kvstore_evictions_total", (("reason", "capacity"), ("tier", "host")))] > 0
    assert got[("kvstore_evictions_total", (("reason", "ttl"), ("tier", "disk")))] == 0  # present from the start
    assert got[("kvstore_corrupt_records_total", (("tier", "disk"),))] == 0
    assert sum(v for (name, _), v in got.items() if name == "kvstore_dropped_writes_total") == 0
    assert got[("kvstore_load_seconds_count", ())] == 6
    assert got[("kvstore_load_seconds_bucket", (("le", "+Inf"),))] == 6
    assert got[("kvstore_store_seconds_count", ())] >= 1
    assert got[("kvstore_block_bytes", ())] == block_nbytes()
    assert got[("kvstore_block_tokens", ())] == B


def test_openmetrics_history_and_unknown_routes(busy_store):
    with start_metrics_server(busy_store, port=0, interval_s=0.05) as server:
        ctype, text = scrape(server.url + "metrics", accept="application/openmetrics-text; version=1.0.0")
        assert ctype.startswith("application/openmetrics-text") and text.endswith("# EOF\n")
        _, page = scrape(server.url)
        assert "<title>kvstore</title>" in page
        traffic(busy_store, 2, first=100)
        total = busy_store.metrics.total("requests")

        def history():
            h = json.loads(scrape(server.url + "api/history")[1])
            col = h["series"].index("kvstore_requests_total")
            return h, col
        # Wait for the sampler to take samples after the traffic (no fixed sleep: a loaded
        # machine may sample late); the deadline only stops a broken sampler.
        deadline = time.monotonic() + 60
        while True:
            h, col = history()
            if len(h["samples"]) >= 3 and h["samples"][-1][col + 1] == total:
                break
            assert time.monotonic() < deadline, h["samples"][-3:]
            time.sleep(0.05)
        assert h["info"]["path"] == str(busy_store.config.path)
        last = h["samples"][-1][0]
        # Only samples taken after `since` (the sampler may have taken one more meanwhile).
        newer = json.loads(scrape(server.url + f"api/history?since={last}")[1])["samples"]
        assert len(newer) < len(h["samples"]) and all(s[0] > last for s in newer)
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(server.url + "nope")
        assert e.value.code == 404


def test_grafana_dashboard_uses_only_exported_metrics(busy_store):
    dash = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    with start_metrics_server(busy_store, port=0) as server:
        exported = {name for name, _ in samples(scrape(server.url + "metrics")[1])}
    used = {name for e in exprs for name in re.findall(r"\bkvstore_\w+", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("hit rate", "occupancy", "throughput", "evictions"):
        assert needed in titles
