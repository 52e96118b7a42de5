"""The benchmark commands run end to end (figures are printed, never asserted: see docs/benchmarks.md)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.engine
@pytest.mark.heavy
def test_tiers_benchmark_quick_run_reports_every_figure(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tools.bench", "tiers", "--quick", "--json",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    for name in ("smollm2_bf16_1.4MiB", "bf16_8MiB"):
        h, d = r["host"][name], r["disk"][name]
        # Each ratio is the quotient of the figures printed beside it (a wrong formula, or a
        # figure taken from another run, shows here); speeds are finite and positive.
        assert h["put_ratio"] == pytest.approx(h["put_GBps"] / h["copyto_GBps"], rel=1e-6)
        assert h["get_ratio"] == pytest.approx(h["get_GBps"] / h["copyto_GBps"], rel=1e-6)
        assert d["cold_load_ratio"] == pytest.approx(d["cold_load_GBps"] / d["raw_lmdb_cold_get_GBps"], rel=1e-6)
        assert d["store_ratio"] == pytest.approx(d["store_GBps"] / d["raw_lmdb_put_GBps"], rel=1e-6)
        assert all(0 < v < 1e3 for v in (*h.values(), d["store_GBps"], d["cold_load_GBps"]))
    # Compression as measured in DESIGN.md: bf16 KV compresses, and better with the byte-plane
    # split (1.45 vs 1.26 on real KV); the synthetic blocks here must show the same order.
    for dtype in ("bf16", "fp16"):
        c = r["codec"][dtype]
        assert c["ratio"] > 1.0 and c["ratio"] > c["ratio_without_split"], c
    assert r["match"]["blocks"] == 256
