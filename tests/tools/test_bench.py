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
        assert r["host"][name]["put_ratio"] > 0 and r["disk"][name]["cold_load_ratio"] > 0
    assert r["codec"]["bf16"]["ratio"] > 1.0 and r["codec"]["fp16"]["ratio"] > 1.0
    assert r["match"]["blocks"] == 256
