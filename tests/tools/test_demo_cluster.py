"""``make demo-cluster``: machine B, with an empty store of its own, answers machine A's document
question from Valkey with A's output."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.heavy]  # two model loads and prefills: make test-all


def test_the_second_machine_answers_from_valkey_with_the_same_output(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tools.demo_cluster", "--json", "--doc-chars", "3000",
                          "--max-new-tokens", "6", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = r["machines"]["A"], r["machines"]["B"]
    assert a["hit_tokens"] == 0 and a["hit_tiers"].get("remote", 0) == 0
    assert b["hit_tiers"] == {"remote": b["hit_tokens"] // 64} and b["hit_tokens"] == (b["prompt_tokens"] - 1) // 64 * 64
    assert r["same_output"] and b["output_ids"] == a["output_ids"]
