"""Every CLI command against a real store held open by another process (engine_proc.py)."""

import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time

import lmdb
import pytest

from kvstore.keys import block_keys, namespace_id
from kvstore.metrics import DECLARED
from tools import cli

from ..conftest import BLOCK_TOKENS as B, block_nbytes, make_block
from .conftest import ROOT
from .engine_proc import DATASET, TOTAL_BLOCKS
from .test_exporter import GRAFANA, samples, scrape


def keys_of(name):
    ns, ids, _ = DATASET[name]
    return block_keys(ns, ids, B)


def test_stats(shared_engine, kv):
    code, data, _ = kv("stats", "--config", shared_engine.config, "--json")
    assert code == 0
    disk = data["tiers"]["disk"]
    assert disk["entries"] == TOTAL_BLOCKS and disk["budget"] == 4 << 20
    assert disk["pinned"] == 3 and disk["expired"] == 0 and disk["ttl_s"] == 7 * 86400
    assert data["namespaces"]["tenant-a"]["entries"] == 11
    assert data["namespaces"]["tenant-a"]["longest_chain_tokens"] == 5 * B
    assert data["namespaces"]["tenant-b"]["entries"] == 3
    assert 2.9 * 86400 < time.time() - _ts(disk["oldest_created"]) < 3.1 * 86400
    # Lifetime counters the engine persisted on flush: its 5 lookups while filling and pinning
    # (other tests may add more through the same engine).
    c = data["counters"]
    assert c["requests"] >= 5 and c["hit_tokens_total"] >= 5 * B and c["miss_tokens"] >= 14 * B
    assert c["hit_rate"] == pytest.approx(c["hit_tokens_total"] / (c["hit_tokens_total"] + c["miss_tokens"]))
    code, text, _ = kv("stats", "--path", shared_engine.path, "--config", shared_engine.config)
    assert f"{TOTAL_BLOCKS} blocks" in text and "tenant-b" in text and "3 pinned" in text
    assert "hit rate" in text and "miss tokens" in text


def _ts(iso):
    import datetime as dt
    return dt.datetime.fromisoformat(iso).timestamp()


def test_ls_filters_sorts_and_pages(shared_engine, kv):
    cfg = ("--config", shared_engine.config, "--json")
    _, data, _ = kv("ls", *cfg)
    assert data["total"] == TOTAL_BLOCKS
    assert {e["key"] for e in data["entries"]} == {k.hex() for name in DATASET for k in keys_of(name)}
    _, old, _ = kv("ls", *cfg, "--older-than", "2d")
    assert [e["key"] for e in sorted(old["entries"], key=lambda e: e["depth"])] == [k.hex() for k in keys_of("old")]
    _, idle, _ = kv("ls", *cfg, "--idle-longer-than", "1d")
    assert idle["total"] == 4
    _, pinned, _ = kv("ls", *cfg, "--pinned")
    assert {e["key"] for e in pinned["entries"]} == {k.hex() for k in keys_of("other")}
    assert all(e["pinned_until"] for e in pinned["entries"])
    _, b, _ = kv("ls", *cfg, "--namespace", "tenant-b", "--sort", "depth", "--reverse")
    assert [e["depth"] for e in b["entries"]] == [0, 1, 2] and b["entries"][2]["tokens"] == f"{2 * B}-{3 * B - 1}"
    pages = [kv("ls", *cfg, "--sort", "key", "--limit", "5", "--offset", str(o))[1] for o in (0, 5, 10)]
    keys = [e["key"] for p in pages for e in p["entries"]]
    assert keys == sorted(keys) and len(set(keys)) == TOTAL_BLOCKS
    _, text, _ = kv("ls", "--config", shared_engine.config, "--limit", "5")
    assert text.splitlines()[0].startswith("KEY") and "next page: --offset 5" in text


def test_short_namespace_ids_are_printed_and_accepted(shared_engine, kv):
    """stats and ls print '#' and 8 hex digits of each namespace's id; ls and purge take it."""
    cfg = ("--config", shared_engine.config)
    _, data, _ = kv("stats", *cfg, "--json")
    short = data["namespaces"]["tenant-b"]["id"]
    assert short == f"#{namespace_id('tenant-b'):016x}"[:9]
    assert short in kv("stats", *cfg)[1]
    _, by_id, _ = kv("ls", *cfg, "--json", "--namespace", short)
    _, by_name, _ = kv("ls", *cfg, "--json", "--namespace", "tenant-b")
    assert by_id == by_name and by_id["total"] == 3 and {e["namespace_id"] for e in by_id["entries"]} == {short}
    assert short in kv("ls", *cfg, "--namespace", short)[1]
    _, dry, _ = kv("purge", *cfg, "--json", "--dry-run", "--namespace", short.upper())
    assert dry["namespaces"] == {"tenant-b": 3}


def test_version(kv):
    from importlib.metadata import version
    code, out, _ = kv("--version")
    assert code == 0 and out.startswith(f"kvstore {version('kvstore')} (record format 2, disk format 1)")


def test_inspect_shows_header_verdict_and_chain(shared_engine, kv):
    main = keys_of("main")
    code, data, _ = kv("inspect", main[3].hex()[:10], "--config", shared_engine.config, "--json")
    assert code == 0 and data["key"] == main[3].hex()
    assert data["checksum"] == "ok" and data["header"]["dtype"] == "bfloat16"
    assert data["header"]["shape"] == [2, 2, 2, B, 4] and data["header"]["codec"] == "zstd-hi"
    assert data["depth"] == 3 and data["tokens"] == f"{3 * B}-{4 * B - 1}"
    assert [a["key"] for a in data["ancestors"]] == [k.hex() for k in reversed(main[:3])]
    assert data["children"] == [main[4].hex()]
    _, root, _ = kv("inspect", main[1].hex(), "--config", shared_engine.config, "--json")
    assert set(root["children"]) == {main[2].hex(), keys_of("branch")[2].hex()}  # the branch point
    _, text, _ = kv("inspect", main[3].hex(), "--config", shared_engine.config)
    assert "verdict      ok" in text and "block 3 of its chain" in text


def test_verify_a_clean_store_with_a_progress_bar(shared_engine, kv):
    code, data, err = kv("verify", "--config", shared_engine.config, "--json", "--progress")
    assert code == 0 and data["checked"] == TOTAL_BLOCKS and data["ok"] == TOTAL_BLOCKS
    assert "verify [" in err and f"{TOTAL_BLOCKS}/{TOTAL_BLOCKS} 100%" in err
    code, _, err = kv("verify", "--config", shared_engine.config, "--no-progress")
    assert code == 0 and err == ""


def corrupt(path, key):
    """Flips a payload byte of one record (the test process holds no other environment there)."""
    env = lmdb.open(str(path / "disk"), max_dbs=8)
    try:
        db = env.open_db(b"records")
        with env.begin(write=True) as txn:
            rec = bytearray(txn.get(key, db=db))
            rec[-5] ^= 0x40
            txn.put(key, bytes(rec), db=db)
    finally:
        env.close()


def test_verify_finds_and_repairs_corrupt_records(engine, kv):
    main = keys_of("main")
    corrupt(engine.path, main[2])
    code, data, _ = kv("verify", "--config", engine.config, "--json")
    assert code == 3 and data["corrupt"] == 1 and data["bad"][0]["key"] == main[2].hex()
    assert "checksum" in data["bad"][0]["error"] and data["repaired"] == 0
    code, _, _ = kv("inspect", main[2].hex(), "--config", engine.config)
    assert code == 3  # inspect reports the bad verdict too
    code, text, _ = kv("verify", "--config", engine.config, "--repair")
    assert code == 0 and "removed 1 corrupt record(s) and 2 block(s) chained below them" in text
    # Counted as what they were: one corrupt record (an eviction for "corrupt"), two purged below.
    c = kv("stats", "--config", engine.config, "--json")[1]["counters"]
    assert c["corrupt_records"] == {"disk": 1} and c["corrupt_records_total"] == 1
    assert c["evictions"]["disk"] == {"corrupt": 1, "purge": 2}
    text = kv("stats", "--config", engine.config)[1]
    assert "corrupt records 1 (disk 1)" in text and "disk: corrupt 1, purge 2" in text
    # The engine's disk tier no longer has the bad block nor the two unreachable below it.
    ns, ids, _ = DATASET["main"]
    assert engine.ask("disk_held", ns=ns, ids=ids)["held"] == [True, True, False, False, False]
    assert kv("verify", "--config", engine.config, "--json")[1]["ok"] == TOTAL_BLOCKS - 3


def test_purge_namespace_dry_run_then_for_real(engine, kv):
    cfg = ("--config", engine.config)
    code, dry, _ = kv("purge", *cfg, "--namespace", "tenant-b", "--dry-run", "--json")
    assert code == 0 and dry["dry_run"] and dry["matched"] == 3 and dry["removed"] == 0
    assert dry["namespaces"] == {"tenant-b": 3}
    ns, ids, _ = DATASET["other"]
    assert engine.ask("disk_held", ns=ns, ids=ids)["held"] == [True] * 3
    code, text, _ = kv("purge", *cfg, "--namespace", "tenant-b")  # pins do not protect from a purge
    assert code == 0 and text.startswith("removed 3 block(s)")
    assert engine.ask("disk_held", ns=ns, ids=ids)["held"] == [False] * 3
    assert kv("stats", *cfg, "--json")[1]["tiers"]["disk"]["entries"] == TOTAL_BLOCKS - 3


def test_purge_by_age_and_idle_time(engine, kv):
    cfg = ("--config", engine.config, "--json")
    assert kv("purge", *cfg, "--older-than", "4d")[1]["removed"] == 0
    _, data, _ = kv("purge", *cfg, "--idle-longer-than", "2d")
    assert data["removed"] == 4 and data["namespaces"] == {"tenant-a": 4}
    ns, ids, _ = DATASET["old"]
    assert engine.ask("disk_held", ns=ns, ids=ids)["held"] == [False] * 4
    _, data, _ = kv("purge", *cfg, "--all")
    assert data["removed"] == TOTAL_BLOCKS - 4
    assert kv("stats", *cfg)[1]["tiers"]["disk"]["entries"] == 0


def test_purge_prefix_of_a_prompt_takes_the_chains_below(engine, kv, tmp_path):
    prompt = tmp_path / "prompt.json"
    ns, ids, _ = DATASET["main"]
    prompt.write_text(json.dumps(ids[:2 * B + 3]))  # blocks 0-1 (+3 tokens), shared with "branch"
    cfg = ("--config", engine.config, "--json")
    _, later, _ = kv("purge", *cfg, "--prefix-of", prompt, "--from-block", "1", "--dry-run")
    # Block 1 and everything below it: main 1-4 and branch 2-3.
    assert later["matched"] == 6 and later["selected"] == 1 and later["chained_below"] == 5
    _, data, _ = kv("purge", *cfg, "--prefix-of", prompt)
    assert data["removed"] == 7 and data["prompt"]["full_blocks"] == 2
    assert engine.ask("disk_held", ns=ns, ids=ids)["held"] == [False] * 5
    assert engine.ask("disk_held", ns=ns, ids=DATASET["branch"][1])["held"] == [False] * 4
    assert engine.ask("disk_held", ns="tenant-a", ids=DATASET["old"][1])["held"] == [True] * 4


def test_explain_with_the_store_shows_what_is_held(shared_engine, kv, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(DATASET["main"][1]))
    b.write_text(json.dumps({"input_ids": DATASET["branch"][1] + [9] * B}))
    code, r, _ = kv("explain", a, b, "--config", shared_engine.config, "--json")
    assert code == 0 and r["namespace"] == "tenant-a"  # the store's namespace holding the prompts
    assert r["first_different_token"] == 2 * B and r["first_different_block"] == 2
    assert r["b_after_a"] == {"hit_tokens": 2 * B, "hit_blocks": 2, "miss_tokens": 3 * B, "prompt_tokens": 5 * B}
    assert r["store"] == {"a_held": 5, "b_held": 4, "b_hits_now_blocks": 4, "b_hits_now_tokens": 4 * B,
                          "other_namespaces": []}
    assert [row["state"] for row in r["blocks"]] == ["same", "same", "first difference",
                                                     "differs (chained)", "differs (chained)"]
    assert r["blocks"][0]["a"] == keys_of("main")[0].hex()
    short = f"#{namespace_id('tenant-a'):016x}"[:9]  # the short id stats prints names it too
    _, by_id, _ = kv("explain", a, b, "--config", shared_engine.config, "--json", "--namespace", short)
    assert by_id["namespace"] == "tenant-a" and by_id["store"] == r["store"]
    assert [t["pos"] for t in r["divergence"]["tokens"]][0] == 2 * B - 8


@pytest.mark.parametrize("argv, code, fragment", [
    (["stats", "--path", "/nonexistent/kv"], 1, "not a kvstore store"),
    (["stats"], 1, "no store given"),
    (["ls", "--path", "{tmp}"], 1, "not a kvstore store"),
    (["purge", "--path", "{store}"], 2, "say what to remove"),
    (["purge", "--path", "{store}", "--all", "--namespace", "x"], 2, "combines with no other"),
    (["purge", "--path", "{store}", "--older-than", "soon"], 2, "expected a duration"),
    (["ls", "--path", "{store}", "--idle-longer-than=-3h"], 2, "expected a duration"),
    (["inspect", "--path", "{store}", "beef"], 1, "no block with key beef"),
    (["inspect", "--path", "{store}", "xyz"], 1, "at least 4 hex digits"),
    (["explain", "{tmp}/missing.txt", "{tmp}/missing.txt"], 1, "cannot read"),
    (["explain", "{tmp}/bad.json", "{tmp}/bad.json"], 1, "neither a list of token ids"),
    (["explain", "{tmp}/empty.json", "{tmp}/bad.json"], 1, "an empty prompt"),
    (["purge", "--path", "{store}", "--prefix-of", "{tmp}/bad.json"], 1, "neither a list of token ids"),
    (["serve-metrics", "--path", "{store}", "--port", "{busy}"], 1, "--port {busy}: cannot listen there: Address already in use"),
    # Out-of-range numbers are usage errors naming the option and what it allows (issue 14).
    (["ls", "--path", "{store}", "--limit", "-3"], 2, "argument --limit: expected an integer >= 0, got '-3'"),
    (["ls", "--path", "{store}", "--offset", "-5"], 2, "argument --offset: expected an integer >= 0, got '-5'"),
    (["purge", "--path", "{store}", "--prefix-of", "{tmp}/ids.json", "--from-block", "-1"], 2,
     "argument --from-block: expected an integer >= 0, got '-1'"),
    (["explain", "{tmp}/ids.json", "{tmp}/ids.json", "--context", "-2"], 2, "argument --context: expected an integer >= 0"),
    (["serve-metrics", "--path", "{store}", "--port", "99999"], 2, "argument --port: expected a port number from 0"),
    (["serve-metrics", "--path", "{store}", "--interval", "-5"], 2, "argument --interval: expected a number of seconds > 0"),
    (["serve-metrics", "--path", "{store}", "--interval", "0"], 2, "argument --interval: expected a number of seconds > 0"),
    # Filters that name nothing in the store say so instead of listing 0 rows.
    (["ls", "--path", "{store}", "--namespace", "no-such-tenant"], 1, "--namespace no-such-tenant: no such namespace"),
    (["purge", "--path", "{store}", "--namespace", "no-such-tenant"], 1, "no such namespace in this store"),
    (["ls", "--path", "{store}", "--namespace", "#zz"], 1, "'#' and 4 to 16 hex digits"),
    (["ls", "--path", "{store}", "--namespace", "#abcdef12"], 1, "no namespace of this store has that id"),
    (["ls", "--path", "{store}", "--key", "xyz"], 2, "argument --key: expected hex digits"),
    (["ls", "--path", "{store}", "--key", "abcdef"], 1, "--key abcdef: no block of this store"),
    # Prompt files: JSON that does not parse is not read as text; an empty text is no prompt.
    (["explain", "{tmp}/broken.json", "{tmp}/ids.json"], 1, "broken.json: not valid JSON (line 1 column 9"),
    (["explain", "{tmp}/broken.txt", "{tmp}/ids.json"], 1, "broken.txt: not valid JSON"),
    (["explain", "{tmp}/blank.txt", "{tmp}/ids.json"], 1, "blank.txt: an empty prompt"),
    (["explain", "{tmp}/wizard.json", "{tmp}/ids.json"], 1, "messages[1].role: expected one of system, developer"),
    (["explain", "{tmp}/image.json", "{tmp}/ids.json"], 1, "messages[0].content[1]: expected a text part"),
    (["explain", "{tmp}/ids.json", "{tmp}/ids.json", "--chat-template", "{tmp}/binary.bin"], 1,
     "--chat-template {tmp}/binary.bin: not UTF-8 text"),
    (["frobnicate"], 2, "invalid choice"),
    # Found by test_cli_fuzz: control characters in arguments, file names and library messages
    # are escaped, so that an error stays one line.
    (["ls", "--path", "{store}", "a\nb"], 2, "unrecognized arguments: a\\nb"),
    (["explain", "{tmp}/ids.json", "no-such-\r"], 1, "no-such-\\r: cannot read"),
    (["stats", "--path", "{tmp}/new\nline"], 1, "new\\nline: not a kvstore store"),
    (["explain", "{tmp}/ids.json", "{tmp}/ids.json", "--tokenizer", "{tmp}"], 1,
     "cannot load a tokenizer from {tmp}: the directory holds none of tokenizer.json"),
    (["stats", "--path", "{tmp}/hollow"], 1, "disk/data.mdb is not an LMDB file"),
])
def test_bad_input_is_one_line_without_traceback(argv, code, fragment, kv, tmp_path, open_store):
    import socket
    open_store().close()  # an empty, valid store at tmp_path/store
    (tmp_path / "bad.json").write_text('{"neither": 1}')
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "ids.json").write_text("[1, 2, 3]")
    (tmp_path / "broken.json").write_text('[1, 2, 3')
    (tmp_path / "broken.txt").write_text('{"messages": [{"role": "user", "content": "hi"}')
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "wizard.json").write_text(json.dumps([{"role": "user", "content": "hi"},
                                                      {"role": "wizard", "content": "abracadabra"}]))
    (tmp_path / "image.json").write_text(json.dumps([{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]}]))
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    (tmp_path / "hollow" / "disk").mkdir(parents=True)
    (tmp_path / "hollow" / "disk" / "data.mdb").write_bytes(b"")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {"tmp": tmp_path, "store": tmp_path / "store", "busy": busy.getsockname()[1]}
        got, out, err = kv(*[a.format(**fill) for a in argv])
    assert got == code and fragment.format(**fill) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_no_command_writes_into_a_directory_that_is_not_a_store(tmp_path, kv):
    """An empty disk/data.mdb stays empty: LMDB would format it as a new 1 MiB environment."""
    data = tmp_path / "hollow" / "disk" / "data.mdb"
    data.parent.mkdir(parents=True)
    data.write_bytes(b"")
    for argv in (["stats"], ["ls"], ["verify", "--repair"], ["purge", "--all"]):
        code, _, err = kv(*argv, "--path", tmp_path / "hollow")
        assert code == 1 and "not an LMDB file" in err
    assert data.stat().st_size == 0 and sorted(p.name for p in data.parent.iterdir()) == ["data.mdb"]


def test_a_file_name_that_is_not_utf8_prints_on_a_strict_stdout(tmp_path, monkeypatch):
    """Found by test_cli_fuzz: argv holds such a name as surrogates, which a strict stdout (a
    UTF-8 locale such as en_US.UTF-8) cannot encode; it prints as escapes, not a traceback."""
    name = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.json"))
    with open(name, "w") as f:
        f.write(json.dumps(list(range(2 * B))))
    for var in ("KVSTORE_PATH", "KVSTORE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["explain", name, name]) == 0
    assert b"caf\\udce9.json  (ids)" in out.buffer.getvalue()


def test_a_store_of_a_newer_format_is_refused(open_store, tmp_path, kv):
    open_store().close()
    env = lmdb.open(str(tmp_path / "store" / "disk"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"format", (99).to_bytes(8, "little"), db=env.open_db(b"info", txn=txn))
    env.close()
    code, _, err = kv("stats", "--path", tmp_path / "store")
    assert code == 1 and "written by disk format version 99" in err and "upgrade kvstore" in err


def test_console_script_in_a_fresh_process(shared_engine):
    """The installed `kvstore` entry point, with KVSTORE_PATH/KVSTORE_CONFIG from the environment."""
    exe = shutil.which("kvstore", path=os.path.dirname(sys.executable))
    argv = [exe] if exe else [sys.executable, "-m", "tools.cli"]
    env = {**os.environ, "KVSTORE_PATH": str(shared_engine.path), "KVSTORE_CONFIG": str(shared_engine.config)}
    out = subprocess.run([*argv, "stats", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tiers"]["disk"]["entries"] == TOTAL_BLOCKS
    bad = subprocess.run([*argv, "ls", "--path", "/nonexistent"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_serve_metrics_from_outside_the_engine(shared_engine, kv):
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve-metrics", "--config",
                             str(shared_engine.config), "--port", "0", "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["url"].startswith("http://127.0.0.1:")
        got = samples(scrape(info["metrics"])[1])
        assert got[("kvstore_entries", (("tier", "disk"),))] == TOTAL_BLOCKS
        assert got[("kvstore_budget_bytes", (("tier", "disk"),))] == 4 << 20
        # The counters are the store's lifetime ones (every process's), as `kvstore stats` shows.
        code, stats, _ = kv("stats", "--config", shared_engine.config, "--json")
        exported = sum(v for (name, _), v in got.items() if name == "kvstore_requests_total")
        assert code == 0 and exported == stats["counters"]["requests"] >= 5
        assert sum(v for (name, _), v in got.items() if name == "kvstore_hit_tokens_total") == \
            stats["counters"]["hit_tokens_total"]
        # A Grafana board scraping it: every metric its panels use is exported from outside too,
        # except the latency histograms, which only an engine's own process measures.
        dash = json.loads(GRAFANA.read_text())
        used = {n for p in dash["panels"] for t in p.get("targets", [])
                for n in re.findall(r"\bkvstore_\w+", t["expr"])}
        exported = {name for name, _ in got}
        latency = {f"kvstore_{m.name}_bucket" for m in DECLARED.values() if m.kind == "histogram"}
        assert used - exported and used - exported <= latency, used - exported
        assert {"kvstore_remote_hits_total", "kvstore_remote_bytes_total"} <= used & exported
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr.read()


def test_stats_shows_the_data_file_beside_the_bytes_stored(open_store, tmp_path, kv):
    """The file keeps its size after a purge; stats shows what inside it holds data and what is
    free for reuse, so that "du" and "stored" can be told apart."""
    store = open_store(disk_bytes=64 << 20)
    ids = list(range(300 * B))
    store.put(ids, [make_block(i) for i in range(300)], namespace="t")
    store.flush()
    store.close()
    path = ("--path", tmp_path / "store")
    before = kv("stats", *path, "--json")[1]["tiers"]["disk"]
    f0 = before["file"]
    assert f0["file_bytes"] == (tmp_path / "store" / "disk" / "data.mdb").stat().st_size
    assert f0["data_bytes"] >= before["bytes"] and f0["data_bytes"] + f0["free_bytes"] == f0["written_bytes"]
    assert kv("purge", *path, "--all")[0] == 0
    after = kv("stats", *path, "--json")[1]["tiers"]["disk"]
    f1 = after["file"]
    assert after["bytes"] == 0 and f1["file_bytes"] == f0["file_bytes"]  # LMDB never shrinks the file
    assert f1["data_bytes"] < f0["data_bytes"] - before["bytes"] // 2
    assert f1["free_bytes"] > f0["free_bytes"] + before["bytes"] // 2  # the records' pages, free for reuse
    text = kv("stats", *path)[1]
    assert "data file" in text and "free for reuse" in text


def test_top_once_shows_the_rates_of_an_engine_writing(engine, kv, monkeypatch):
    """`kvstore top --once --json` against a store another process uses: the engine's lookups
    between the two samples (made while top waits: its sleep is where the engine works, so the
    test needs no timing) appear as requests/s and hit tokens/s from the persisted counters."""
    from tools.cli import top
    ns, ids, _ = DATASET["main"]
    waits = []

    def engine_works(seconds):
        waits.append(seconds)
        for _ in range(3):
            assert engine.ask("match", ns=ns, ids=ids)["blocks"] == 5
        engine.ask("flush")  # persists the engine's counters, as it does every few seconds

    monkeypatch.setattr(top.time, "sleep", engine_works)
    code, r, err = kv("top", "--config", engine.config, "--once", "--json", "--interval", "7")
    assert code == 0 and waits == [7.0], err
    assert round(r["requests_per_s"] * r["seconds"]) == 3
    assert round(sum(r["hit_tokens_per_s"].values()) * r["seconds"]) == 3 * 5 * B
    assert r["hit_rate"] == 1.0 and r["miss_tokens_per_s"] == 0
    assert r["disk"]["entries"] == TOTAL_BLOCKS and r["disk"]["budget"] == 4 << 20
    # Loads and stores in bytes: the engine loads "main" twice and stores a new 3-block chain.
    fresh = list(range(90_000, 90_000 + 3 * B))

    def engine_loads_and_stores(seconds):
        for _ in range(2):
            assert engine.ask("load", ns=ns, ids=ids)["blocks"] == 5
        assert engine.ask("put", ns="tenant-a", ids=fresh)["stored"] == 3  # flushed: counters persisted
    monkeypatch.setattr(top.time, "sleep", engine_loads_and_stores)
    code, r, err = kv("top", "--config", engine.config, "--once", "--json")
    assert code == 0, err
    assert round(sum(r["loaded_bytes_per_s"].values()) * r["seconds"]) == 2 * 5 * block_nbytes()
    assert round(r["stored_bytes_per_s"]["disk"] * r["seconds"]) == 3 * block_nbytes()
    monkeypatch.setattr(top.time, "sleep", lambda s: (engine.ask("match", ns=ns, ids=ids), engine.ask("flush")))
    code, text, _ = kv("top", "--config", engine.config, "--once")
    head, line = text.splitlines()
    assert head.split()[:3] == ["time", "req/s", "hit"] and line.split()[2] == "100.0%"


@pytest.mark.parametrize("argv", [["stats", "--path", "{store}"], ["ls", "--path", "{store}"], ["--help"]])
def test_reading_commands_start_without_torch(argv, open_store, tmp_path):
    """Importing torch takes over a second; commands that read only metadata never do (its
    placeholder in sys.modules stays unloaded: kvstore.lazy_torch), so they start fast."""
    store = open_store()
    store.put(list(range(B)), [make_block(0)])
    store.close()  # a store with a block layout in its settings: opening it needs the dtype's name only
    args = [a.format(store=tmp_path / "store") for a in argv]
    code = ("import sys\nfrom tools import cli\ntry:\n    rc = cli.main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print('RESULT', rc, 'torch._C' in sys.modules, type(sys.modules.get('torch')).__name__)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")})
    assert out.stdout.splitlines()[-1] == "RESULT 0 False _LazyModule", out.stderr


def test_ls_tree_shows_chains_and_their_forks(shared_engine, kv):
    """`ls --tree`: one node per run of blocks without a fork; "main" and "branch" share their
    first two blocks, then fork; `--key` of a block deep in "branch" shows the tree from its
    chain's first block."""
    keys = {name: block_keys(ns, ids, B) for name, (ns, ids, _) in DATASET.items()}
    code, data, err = kv("ls", "--config", shared_engine.config, "--tree", "--json")
    assert code == 0, err
    runs = {c["first"]: c for c in data["chains"]}
    assert data["total"] == 3 and set(runs) == {keys["old"][0].hex(), keys["main"][0].hex(), keys["other"][0].hex()}
    shared = runs[keys["main"][0].hex()]
    assert (shared["blocks"], shared["last"], shared["namespace"]) == (2, keys["main"][1].hex(), "tenant-a")
    forks = {c["first"]: c for c in shared["children"]}
    assert set(forks) == {keys["main"][2].hex(), keys["branch"][2].hex()}
    assert (forks[keys["main"][2].hex()]["blocks"], forks[keys["branch"][2].hex()]["blocks"]) == (3, 2)
    assert all(not c["children"] for c in forks.values())
    assert runs[keys["old"][0].hex()]["blocks"] == 4 and not runs[keys["old"][0].hex()]["children"]
    code, one, _ = kv("ls", "--config", shared_engine.config, "--tree", "--key", keys["branch"][3].hex(), "--json")
    assert code == 0 and [c["first"] for c in one["chains"]] == [keys["main"][0].hex()]
    text = kv("ls", "--config", shared_engine.config, "--tree")[1]
    assert "blocks 0-1 (2," in text and "2 forks" in text and "├─ " in text and "(1-3 of 3 chain(s))" in text


def _top_on_a_terminal(engine):
    """`kvstore top` in a child whose controlling terminal is a pseudo-terminal: (pid, master)."""
    pid, master = pty.fork()
    if pid == 0:  # the child: exec at once (the test process has threads)
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "tools.cli", "top", "--config", str(engine.config),
                                  "--interval", "0.2"])
    return pid, master


def _read_lines(master: int, want, engine) -> list[str]:
    """Lines from the terminal until ``want(lines)``; the engine serves a request between reads."""
    ns, ids, _ = DATASET["main"]
    buf, lines = b"", []
    while not want(lines):
        engine.ask("match", ns=ns, ids=ids)
        engine.ask("flush")  # persists its counters, which top samples
        ready = select.select([master], [], [], 60)[0]
        assert ready, f"top printed nothing for a minute: {buf!r}"
        buf += os.read(master, 4096)
        *done, buf = buf.split(b"\n")
        lines += [d.decode().rstrip("\r") for d in done]
    return lines


@pytest.mark.parametrize("stop, name", [(b"q", "q"), (b"\x03", "Ctrl-C")])
def test_top_on_a_terminal_refreshes_rates_and_stops_on_q_or_ctrl_c(engine, stop, name):
    """Under a pseudo-terminal, against an engine serving requests: top prints a line an
    interval with the engine's requests/s and hit rate, and exits 0 on q (no Enter) or Ctrl-C,
    leaving the terminal's mode as it found it."""
    pid, master = _top_on_a_terminal(engine)
    try:
        mode = termios.tcgetattr(master)
        lines = _read_lines(master, lambda ls: sum(_busy(line) for line in ls) >= 2, engine)
        assert lines[0].split()[:3] == ["time", "req/s", "hit"], lines
        os.write(master, stop)
        code, pid = _exit_code(pid, master), None  # _exit_code reaps the child either way
        assert code == 0, (name, lines)
        assert termios.tcgetattr(master)[3] == mode[3]  # local modes (echo, canonical) restored
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(master)


def _exit_code(pid: int, master: int) -> int:
    """The child's exit code, reading its terminal meanwhile (a full terminal would block it);
    a child still running after a minute is killed: -SIGKILL (it did not stop)."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if select.select([master], [], [], 0.1)[0]:
            try:
                os.read(master, 4096)
            except OSError:  # EIO: the child closed its side
                pass
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


def _busy(line: str) -> bool:
    """A data line of top showing requests/s > 0 at a 100% hit rate."""
    parts = line.split()
    return len(parts) > 2 and parts[0] != "time" and float(parts[1]) > 0 and parts[2] == "100.0%"
