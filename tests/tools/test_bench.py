"""The benchmark commands run end to end (figures are printed, never asserted: see docs/benchmarks.md)."""

import json
import statistics
import subprocess
import sys

import pytest


def quick_run(command: str, *args: str) -> dict:
    """``python -m tools.bench COMMAND --quick --json ARGS``: its exit status 0 and its JSON."""
    out = subprocess.run([sys.executable, "-m", "tools.bench", command, "--quick", "--json", *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.engine
@pytest.mark.heavy
def test_tiers_benchmark_quick_run_reports_every_figure(tmp_path):
    r = quick_run("tiers", "--workdir", str(tmp_path))
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


@pytest.mark.engine
@pytest.mark.heavy
def test_remote_benchmark_quick_run_reports_ratios_of_its_own_figures(tmp_path):
    r = quick_run("remote")
    rounds = r["rounds"]
    assert len(rounds) >= 3  # each ratio: the median of its rounds' own quotients
    assert r["store_ratio"] == pytest.approx(
        statistics.median(x["store_GBps"] / x["raw_set_GBps"] for x in rounds), rel=1e-6)
    assert r["load_ratio"] == pytest.approx(
        statistics.median(x["load_GBps"] / x["raw_get_GBps"] for x in rounds), rel=1e-6)
    assert r["store_copied_ratio"] == pytest.approx(
        statistics.median(x["store_copied_GBps"] / x["raw_set_GBps"] for x in rounds), rel=1e-6)
    assert all(x["first_load_GBps"] > 0 for x in rounds)
    assert r["store_GBps"] == pytest.approx(statistics.median(x["store_GBps"] for x in rounds), rel=0.5)
    assert r["breaker_added_ms"] == pytest.approx(r["match_ms_breaker_open"] - r["match_ms_no_remote"])
    assert r["match_round_trips"] == 1 and r["blocks"] == 16
    # Verbatim records by default: the raw bytes and small heads; zstd-hi fewer bytes.
    raw = r["blocks"] * r["block_bytes"]
    assert raw <= r["stored_bytes_on_server"] < raw * 1.05
    assert 0 < r["zstd_hi"]["stored_bytes_on_server"] < 0.9 * raw


@pytest.mark.engine
@pytest.mark.heavy
def test_datapath_benchmark_quick_run_prints_each_figure_beside_its_limit(tmp_path):
    r = quick_run("datapath", "--workdir", str(tmp_path))
    pairs = {"store_vs_files": ("store_GBps", "raw_files_write_GBps"),
             "store_vs_lmdb": ("store_GBps", "raw_lmdb_put_GBps"),
             "cold_load": ("cold_load_GBps", "raw_cold_read_GBps"),
             "warm_load": ("warm_load_GBps", "raw_warm_read_GBps")}
    for name in ("smollm2_bf16_1.4MiB", "bf16_8MiB"):
        d = r["sets"][name]
        for ratio, (fig, limit) in pairs.items():  # each ratio is the quotient of its own figures
            assert d[ratio] == pytest.approx(d[fig] / d[limit], rel=1e-6), ratio
            assert 0 < d[fig] < 1e3 and 0 < d[limit] < 1e3
        assert d["cache_drop"] in ("drop_caches", "fadvise")
        assert 0 < d["raw_warm_read_one_buffer_GBps"] < 1e3
        for fig, rounds in (("store_GBps", "store_rounds_GBps"),
                            ("raw_files_write_GBps", "raw_files_write_rounds_GBps"),
                            ("raw_lmdb_put_GBps", "raw_lmdb_put_rounds_GBps"),
                            ("cold_load_GBps", "cold_rounds_GBps")):  # medians of their rounds
            assert len(d[rounds]) == 3 and d[fig] == pytest.approx(statistics.median(d[rounds]), rel=1e-6)
    # bytes on disk as the store counts them: KV compresses (bf16 more than fp16), never grows
    assert 0 < r["sets"]["smollm2_bf16_1.4MiB"]["bytes_ratio"] < r["fp16_bytes_ratio"] < 1.0
    assert set(r["targets"]) == {"store_vs_files", "store_vs_lmdb", "cold_load", "warm_load",
                                 "bytes_bf16", "bytes_fp16"}


def test_trace_benchmark_quick_run_compares_the_store_with_an_exact_lru(tmp_path):
    r = quick_run("trace", "--workdir", str(tmp_path))
    assert r["requests"] == 300 and r["passes"] == 1
    # The disk tier held exactly the capacity the exact LRU was given: half the unique blocks.
    assert r["capacity_blocks"] == r["unique_blocks_per_pass"] // 2
    assert r["disk_budget_bytes"] == r["capacity_blocks"] * r["entry_bytes"]
    assert r["disk_entries_at_end"] == r["capacity_blocks"]
    assert r["evictions"]["reason=capacity,tier=disk"] > 0
    # Every hit block was served and checked bit-exact; the hit rate is those hits.
    assert r["blocks_verified"] * 64 == pytest.approx(r["hit_rate"] * r["prompt_tokens"], rel=1e-9)
    # The exact LRU ran over the same sequence: its own hits, not the store's figure copied.
    assert 0 < r["lru_hit_rate"] < 1 and r["hit_rate_vs_lru"] == pytest.approx(
        r["hit_rate"] / r["lru_hit_rate"], rel=1e-9)
    for name in ("match_get", "write"):
        assert r[f"{name}_growth"] == pytest.approx(
            r[f"{name}_ms_per_1k_end"] / r[f"{name}_ms_per_1k_start"], rel=1e-9)
    assert r["raw_writes_per_s"] > 0 and r["writes_per_s"] > 0 and r["block_writes"] > 0
    assert set(r["targets"]) == {"cost_growth", "writes_per_s", "hit_rate_vs_lru"}
