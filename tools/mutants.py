"""A mutation check of the reliability claims: each test that proves a claim must fail when the
mechanism behind the claim is removed.

Each mutation below is a small, named breakage of one mechanism: exact text replaced in one or
more source files. For each, the tool copies the source tree to a temporary directory (never
touching the working tree), applies the mutation there, checks that the copy is what Python
imports, and runs only the tests that guard it. A mutation is *killed* when a guard fails (or
runs past its time limit); it *survives* when they all pass.

    python -m tools.mutants              # every mutation, a table, exit 1 if any survived
    python -m tools.mutants --only NAME  # one (repeatable)
    python -m tools.mutants --json       # the results as JSON
    python -m tools.mutants --list       # names and what each breaks

Exit status 1 also when a mutation's target text is not found exactly once (a refactor moved
the code: retarget the mutation, never let it pass silently), when a guard fails on the
unmutated tree (a kill would prove nothing), or when the Python a mutation needs is missing
(the vLLM mutations run in .venv-vllm: ``make test-vllm`` builds it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvstore", "engine_adapter", "tools")
COPIED = (*PACKAGES, "tests", "pyproject.toml")
PYTHONS = {"default": None, "vllm": ".venv-vllm/bin/python"}  # None: the one running this tool


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    claim: str
    edits: tuple[tuple[str, str, str], ...]  # (file, exact text, replacement)
    guards: tuple[str, ...]  # pytest node ids or paths, run with -x
    keyword: str = ""  # pytest -k, narrowing the guards
    python: str = "default"
    timeout_s: int = 240


MUTATIONS = (
    Mutation(
        "no_reopen_after_fork",
        "a store used across fork() reopens LMDB in the child",
        (("kvstore/tiers/disk/env.py",
          "        if self._pid != os.getpid():\n            self._env.close()",
          "        if False:\n            self._env.close()"),),
        ("tests/test_pipeline.py",), keyword="forked"),
    Mutation(
        "no_reader_check",
        "reader slots of killed processes are cleared at open",
        (("kvstore/tiers/disk/env.py", "                env.reader_check()\n", "                pass\n"),),
        ("tests/test_pipeline.py",), keyword="stale_reader"),
    Mutation(
        "checksum_skipped",
        "a corrupt record is detected (checksums verified on every decode)",
        (("kvstore/codec.py", 'if xxhash.xxh3_64_digest(payload) != h["pxh"]:', "if False:"),
         ("kvstore/codec.py", 'if data_sum != h["xxh"]:', "if False:")),
        ("tests/test_codec.py",), keyword="damaged or single_byte_flip"),
    Mutation(
        "v1_records_unread",
        "records written by the version-1 encoder are still read",
        (("kvstore/codec.py", "READ_VERSIONS = (1, 2)", "READ_VERSIONS = (2,)"),),
        ("tests/test_codec.py",), keyword="version_1_encoder"),
    Mutation(
        "readahead_skipped",
        "a batch's cold records are requested from the kernel before they are decoded",
        (("kvstore/tiers/disk/readahead.py",
          "            _madvise_fn(first, min(CHUNK, end - first), _MADV_WILLNEED)", "            pass"),),
        ("tests/tiers/test_readahead.py",), keyword="will_need"),
    Mutation(
        "readahead_one_call",
        "a record larger than the device's readahead is requested whole (in pieces of CHUNK)",
        (("kvstore/tiers/disk/readahead.py",
          "            _madvise_fn(first, min(CHUNK, end - first), _MADV_WILLNEED)",
          "            _madvise_fn(first, end - first, _MADV_WILLNEED)\n            break"),),
        ("tests/tiers/test_readahead.py",), keyword="larger_than"),
    Mutation(
        "readahead_misses_partly_cached_records",
        "a record with its second page dropped from the page cache is requested again",
        (("kvstore/tiers/disk/readahead.py",
          "        if _cached(last) and (last <= head + _PAGE or _cached(head + _PAGE)):",
          "        if _cached(last):"),),
        ("tests/tiers/test_readahead.py",), keyword="skips_a_view_read_whole"),
    Mutation(
        "records_in_fresh_memory",
        "a writer encodes each batch's records into its one reused buffer",
        (("kvstore/tiers/disk/tier.py",
          "self.codec.encode_into(e.block, self._arena.take)",
          "self.codec.encode(e.block)"),),
        ("tests/tiers/test_disk.py",), keyword="reused_buffer"),
    Mutation(
        "sync_skips_the_newest_commit",
        "a sync goes to the disk for a durable commit no later commit carried",
        (("kvstore/tiers/disk/env.py",
          "self._synced = max(self._synced, t - 1)",
          "self._synced = max(self._synced, t)"),),
        ("tests/tiers/test_disk.py",), keyword="sync_goes"),
    Mutation(
        "flush_counters_after_the_tiers",
        "a flush's counters commit carries its blocks to the disk, so no extra sync",
        (("kvstore/store.py",
          "        self.persist_counters()\n        for tier in self.tiers:\n            tier.flush()\n",
          "        for tier in self.tiers:\n            tier.flush()\n        self.persist_counters()\n"),),
        ("tests/tiers/test_disk.py",), keyword="counters_commit"),
    Mutation(
        "small_blocks_read_around",
        "a store of small blocks maps its data file with MADV_RANDOM, through every remap",
        (("kvstore/tiers/disk/env.py",
          "            self._advise()  # LMDB mapped the file anew\n",
          ""),),
        ("tests/tiers/test_disk.py",), keyword="random_access"),
    Mutation(
        "write_batches_uncapped",
        "a large put is written in batches of at most BATCH_MAX_BYTES",
        (("kvstore/writeback.py",
          "max(1, BATCH_MAX_BYTES // block_bytes))",
          "1 << 30)"),),
        ("tests/test_writeback.py",), keyword="at_most_batch_max_bytes"),
    Mutation(
        "slow_tiers_copy_what_the_host_tier_holds",
        "the write queues write a block from its host-tier slot, not from a second copy",
        (("kvstore/store.py",
          "            if tier.slow and lender is not None and copy:",
          "            if False:"),),
        ("tests/test_pipeline.py",), keyword="host_tiers_slots"),
    Mutation(
        "leased_slot_reused",
        "a host-tier slot leased to a write queue is not reused before its release",
        (("kvstore/tiers/slab.py",
          "            if slot in self._leases:\n                self._retired.add(slot)",
          "            if False:\n                self._retired.add(slot)"),),
        ("tests/tiers/test_slab.py",), keyword="keeps_its_block"),
    Mutation(
        "lookups_before_decoding",
        "a disk load decodes while the next records are read, not after looking all of them up",
        (("kvstore/tiers/disk/tier.py",
          "                    while ahead - len(asked[0][1]) >= READ_AHEAD:  # the rest is asked ahead",
          "                    while False:"),),
        ("tests/tiers/test_readahead.py",), keyword="ahead_of_the_decoder"),
    Mutation(
        "byteplanes_extension_unused",
        "the codec's byte-plane loops run in the C extension that make setup builds",
        (("kvstore/byteplanes.py", "    from . import _byteplanes as _native\n",
          "    raise ImportError\n"),),
        ("tests/test_byteplanes.py",), keyword="extension_is_built"),
    Mutation(
        "low_planes_compressed",
        "format 2 stores the low (mantissa) byte planes raw",
        (("kvstore/codec.py", "raw_planes = list(range(planes // 2))", "raw_planes = []"),),
        ("tests/test_codec.py",), keyword="low_planes_raw"),
    Mutation(
        "eviction_parent_before_child",
        "a parent block is never evicted before its children",
        (("kvstore/eviction.py", "_RANK.pack(int(last_access * 1_000_000), _MAX_DEPTH - depth)",
          "_RANK.pack(int(last_access * 1_000_000), depth)"),
         ("kvstore/eviction.py", "for key in reversed(list(keys)):", "for key in list(keys):")),
        ("tests/test_eviction.py",)),
    Mutation(
        "idle_ttl_ignored",
        "expired entries are never served (idle TTL)",
        (("kvstore/eviction.py", "return pinned_until > now or now - last_access <= ttl_s",
          "return True"),),
        ("tests/test_store.py",), keyword="idle_ttl"),
    Mutation(
        "tenant_salt_dropped",
        "two tenants with different salts never share a block",
        (("kvstore/keys.py", "    if tenant_salt:\n", "    if False:\n"),),
        ("tests/test_keys.py",), keyword="tenant"),
    Mutation(
        "closed_store_keeps_its_staging",
        "a closed store gives its write-queue memory back at once, not when the GC collects it",
        (("kvstore/writeback.py", "        self._staging = self._staging[:0].clone()\n", "        pass\n"),),
        ("tests/test_store.py",), keyword="write_queue_memory"),
    Mutation(
        "keys_not_grouped",
        "the keys of a group of blocks share their first key's leading bytes (they sort together)",
        (("kvstore/keys.py", "            h = lead + h[LEAD_BYTES:]\n", "            pass\n"),),
        ("tests/test_keys.py",), keyword="group"),
    Mutation(
        "fallocate_skipped",
        "a full disk drops writes (no SIGBUS): the file is allocated before the map grows",
        (("kvstore/tiers/disk/env.py", "        os.posix_fallocate(fd, 0, nbytes)\n",
          "        pass\n"),),
        ("tests/reliability/test_full_disk.py",), keyword="drops_writes"),
    Mutation(
        "map_grows_only_when_full",
        "a batch larger than the map grows it before its transaction, which runs once",
        (("kvstore/tiers/disk/env.py",
          "            while room and not self._fits(room) and self._grow():\n",
          "            while False:\n"),),
        ("tests/tiers/test_disk.py",), keyword="overflows_the_map"),
    Mutation(
        "write_queue_never_drops",
        "put never waits for disk: a full write queue drops and counts the block",
        (("kvstore/writeback.py",
          "                if queued or not self._free or self._stop:\n",
          "                self._cond.wait_for(lambda: self._free or self._stop)\n"
          "                if queued or self._stop:\n"),),
        ("tests/test_pipeline.py",), keyword="full_write_queue", timeout_s=40),
    Mutation(
        "put_keeps_the_callers_buffer",
        "put copies the blocks it queues (unless handed over): the caller may reuse its buffers",
        (("kvstore/writeback.py",
          "                if e.block is not None and e.release is None and (copy or not plain_cpu(e.block)):\n",
          "                if e.block is not None and e.release is None and not plain_cpu(e.block):\n"),),
        ("tests/test_pipeline.py",), keyword="copy_false"),
    Mutation(
        "purge_skips_other_ram",
        "a purge in one process reaches the RAM tiers of the others",
        (("kvstore/store.py", "        if epoch == self._removals_seen:\n", "        if True:\n"),),
        ("tests/test_pipeline.py",), keyword="purge_from_another_process"),
    Mutation(
        "config_unknown_key_ignored",
        "unknown config keys raise ConfigError naming the key (no silent fallback)",
        (("kvstore/config.py", "        if unknown:\n            raise ConfigError(",
          "        if False:\n            raise ConfigError("),
         ("kvstore/config.py", "        return cls(**values)\n",
          "        return cls(**{k: v for k, v in values.items() if k in cls.keys()})\n")),
        ("tests/test_config.py",), keyword="random_config"),
    Mutation(
        "settings_mismatch_accepted",
        "a store created with one block size or layout refuses another",
        (("kvstore/settings.py", "        if key in config.explicit and mine != theirs:\n",
          "        if False:\n"),),
        ("tests/test_settings.py",), keyword="refuses or enforced_on_reopen"),
    Mutation(
        "stored_budget_ignored",
        "every process enforces the budget stored with the data",
        (("kvstore/tiers/disk/tier.py", '        db = self.env.dbs[b"settings"]\n        if db is None:\n',
          '        db = self.env.dbs[b"settings"]\n        if True:\n'),),
        ("tests/test_settings.py",), keyword="budgets_follow"),
    Mutation(
        "no_spill_below_disk",
        "a block evicted from disk goes to the tier below, as its encoded record",
        (("kvstore/store.py", "            if level + 1 >= len(self.tiers):\n",
          "            if True:\n"),),
        ("tests/test_stack.py",)),
    Mutation(
        "read_os_error_raises",
        "an I/O error on the disk tier's read path is a counted miss, never an exception",
        (("kvstore/tiers/disk/tier.py", "READ_FAULTS = (LMDBError, OSError)",
          "READ_FAULTS = (LMDBError,)"),),
        ("tests/test_store.py",), keyword="read_io_error"),
    Mutation(
        "purge_skips_ram_tiers",
        "a purged block is never served again (the purge reaches every tier)",
        (("kvstore/store.py",
          "removed.update(ev.key for ev in tier.purge(lambda k, m: k in gone, now, reason))",
          "removed.update(ev.key for ev in (tier.purge(lambda k, m: k in gone, now, reason) "
          "if tier.slow else ()))"),),
        ("tests/test_store.py", "tests/test_store_stateful.py"), keyword="purge or TwoTiers"),
    Mutation(
        "flush_does_not_wait",
        "acknowledged blocks survive SIGKILL (flush returns once they are committed)",
        (("kvstore/writeback.py",
          "            return self._cond.wait_for(lambda: not self._queue and not self._inflight, timeout)",
          "            return True"),),
        ("tests/reliability/test_crash_and_corruption.py",), keyword="sigkill", timeout_s=480),
    Mutation(
        "open_maps_less_than_the_file",
        "one process never shrinks the data file under another's map (opening)",
        (("kvstore/tiers/disk/env.py", "map_size=size or _NEW_MAP,", "map_size=_NEW_MAP,"),),
        ("tests/tiers/test_disk.py",), keyword="shrinks"),
    Mutation(
        "adopt_maps_less_than_the_file",
        "one process never shrinks the data file under another's map (adopting its growth)",
        (("kvstore/tiers/disk/env.py",
          'self._remap(max(self._env.info()["map_size"], (self.path / "data.mdb").stat().st_size))',
          'self._remap(self._env.info()["map_size"])'),),
        ("tests/tiers/test_disk.py",), keyword="shrinks"),
    Mutation(
        "tools_open_writable",
        "tools inspect a store without writing, also on a read-only mount",
        (("tools/cli/reading.py", "KVStore.open(cfg, readonly=not writable)",
          "KVStore.open(cfg, readonly=False)"),),
        ("tests/tools/test_readonly.py",)),
    Mutation(
        "hf_stores_decode_step_kv",
        "a hit gives the transformers adapter bit-identical logits (stored KV is recomputed in "
        "whole prefill chunks)",
        (("engine_adapter/hf.py", "                if n_full * bt > canon:\n",
          "                if False:\n"),),
        ("tests/engine_adapter/test_hf.py",), keyword="bit_identical", timeout_s=300),
    Mutation(
        "hf_hit_kv_rounded",
        "a hit gives the transformers adapter bit-identical logits (KV loaded unchanged)",
        (("engine_adapter/kv_blocks.py", "dim=2).to(layout.dtype)  # (2, H, T, D)",
          "dim=2).to(torch.bfloat16).to(layout.dtype)  # (2, H, T, D)"),),
        ("tests/engine_adapter/test_hf.py",), keyword="bit_identical", timeout_s=300),
    Mutation(
        "server_own_answers_retokenized",
        "the server feeds its own answers back as the ids it generated (turn N+1 hits turn N's answer)",
        (("engine_adapter/chat_prompt.py", 'ids = own(content) if m["role"] == "assistant" else None',
          "ids = None"),),
        ("tests/engine_adapter/test_server.py",), keyword="own_answers"),
    Mutation(
        "server_answer_log_unused",
        "the server's own answers outlive a restart (turn N+1 on a restarted server still hits them)",
        (("engine_adapter/server.py", "AnswerBook(settings.answer_book, Path(args.store) / ANSWER_LOG)",
          "AnswerBook(settings.answer_book, None)"),),
        ("tests/engine_adapter/test_server.py",), keyword="outlive_a_restart"),
    Mutation(
        "server_sigterm_skips_close",
        "a server stopped by SIGTERM drains its queued writes to disk and keeps its counters",
        (("engine_adapter/server.py", "        service.answers.close()\n        # Here", "        service.answers.close()\n        return\n        # Here"),),
        ("tests/engine_adapter/test_server.py",), keyword="restarted_server"),
    Mutation(
        "answer_log_unverified",
        "a torn or corrupt answer-log record is skipped, never read back as ids",
        (("engine_adapter/answers.py", "                    or xxhash.xxh64_intdigest(body) != digest):",
          "                    ):"),),
        ("tests/engine_adapter/test_answers.py",), keyword="corrupt"),
    Mutation(
        "server_sampling_unseeded",
        "with a seed, sampled output with a cache hit equals output without one",
        (("engine_adapter/sampling.py", "torch.multinomial(sorted_p, 1, generator=self._gen)",
          "torch.multinomial(sorted_p, 1)"),
         ("engine_adapter/sampling.py", "torch.multinomial(probs, 1, generator=self._gen)",
          "torch.multinomial(probs, 1)")),
        ("tests/engine_adapter/test_server.py",), keyword="seeded_sampling"),
    Mutation(
        "server_stream_usage_dropped",
        "stream_options.include_usage gives the usage in the last chunk",
        (("engine_adapter/server.py", "if req.stream_options is not None and req.stream_options.include_usage:",
          "if False:"),),
        ("tests/engine_adapter/test_server.py",), keyword="streaming"),
    Mutation(
        "server_tenant_salt_ignored",
        "two tenants never share blocks",
        (("engine_adapter/service.py", "tenant=tenant, prices=self.prices)", 'tenant="", prices=self.prices)'),),
        ("tests/engine_adapter/test_server.py",), keyword="tenants"),
    Mutation(
        "server_unknown_key_accepted",
        "with a key file, a request without a known key gets 401 and touches no cache",
        (("engine_adapter/tenants.py", "                return salt\n        return None\n",
          "                return salt\n        return \"\"\n"),),
        ("tests/engine_adapter/test_server.py",), keyword="tenants"),
    Mutation(
        "server_queue_unbounded",
        "a full request queue answers 429 at once",
        (("engine_adapter/engine_loop.py", "if self._waiting >= self.max_queue:", "if False:"),),
        ("tests/engine_adapter/test_server.py",), keyword="full_queue"),
    Mutation(
        "server_disconnect_ignored",
        "a client disconnect cancels its generation",
        (("engine_adapter/service.py", "return not (stops.stopped or job.cancelled)", "return not stops.stopped"),),
        ("tests/engine_adapter/test_server.py",), keyword="full_queue"),
    Mutation(
        "server_cache_control_not_pinned",
        "cache_control pins the prompt's blocks for the TTL (they survive eviction)",
        (("engine_adapter/service.py", "self.store.pin(ids[:pos], ttl, namespace=lm.namespace)",
          "self.store.pin(ids[:pos], 0, namespace=lm.namespace)"),),
        ("tests/engine_adapter/test_server.py",), keyword="pins"),
    Mutation(
        "remote_breaker_never_opens",
        "a dead or stalled remote server costs at most one timeout, then nothing per request",
        (("kvstore/tiers/remote.py", "        if reason in _BREAKING and self._up.is_set():",
          "        if False:"),),
        ("tests/tiers/test_remote.py",), keyword="stalled"),
    Mutation(
        "remote_fault_raises",
        "a connection reset in the middle of a remote batch is a counted miss, never an exception",
        (("kvstore/tiers/remote.py", "            out = fn()\n        except Exception as e:",
          "            out = fn()\n        except ValueError as e:"),),
        ("tests/tiers/test_remote.py",), keyword="reset_mid_batch"),
    Mutation(
        "remote_asked_on_put",
        "put() never waits on the remote server (it asks what the server holds on a writer thread)",
        (("kvstore/store.py", "held = self._held(level, new, now, ask_tier=not tier.networked)",
          "held = self._held(level, new, now)"),),
        ("tests/tiers/test_remote.py",), keyword="never_waits"),
    Mutation(
        "dashboard_remote_always_up",
        "the dashboard shows an unreachable remote server as unreachable",
        (("kvstore/prometheus.py", 'value=1 if status()["reachable"] else 0)', "value=1)"),),
        ("tests/tools/test_dashboard_remote.py",)),
    Mutation(
        "remote_record_not_verified",
        "a remote record is verified before use; a bad one is a counted miss, deleted",
        (("kvstore/tiers/remote.py", "                    self.codec.decode_payload(h, payload, out)\n",
          "                    out.view(-1).view(torch.uint8).numpy()[:] = 0\n"),),
        ("tests/tiers/test_tier_contract.py",), keyword="damaged and remote"),
    Mutation(
        "remote_verbatim_record_not_verified",
        "a verbatim remote record, read straight into the destination, is still checksummed",
        (("kvstore/tiers/remote.py", "                    Codec.check_verbatim(h, hasher)\n",
          "                    pass\n"),),
        ("tests/tiers/test_tier_contract.py",), keyword="damaged and remote"),
    Mutation(
        "remote_purge_does_not_reach_the_server",
        "kvstore purge removes the selected blocks from the remote tier too",
        (("kvstore/tiers/remote.py",
          '        return self._remove([(k, m) for k, m in self.entries() if select(k, m)], reason)',
          "        return []"),),
        ("tests/tiers/test_remote.py",), keyword="purge"),
    Mutation(
        "connector_load_errors_not_reported",
        "vLLM recomputes blocks the connector could not load (never wrong KV)",
        (("engine_adapter/vllm_transfer.py", "                self._load_errors.update(failed)\n",
          "                pass\n"),),
        ("tests/vllm/test_connector.py",), keyword="damaged", python="vllm", timeout_s=600),
    Mutation(
        "connector_load_in_the_step",
        "a running request keeps decoding while another request's prefix loads (loads run on "
        "the connector's threads, not in the engine step)",
        (("engine_adapter/vllm_transfer.py", "        self._loader.submit(self._load, job)\n",
          "        self._load(job)\n"),),
        ("tests/vllm/test_connector_async.py",), keyword="keeps_producing", python="vllm",
        timeout_s=600),
    Mutation(
        "connector_idle_step_spins",
        "while every request waits for a load, vLLM's loop waits for the connector's transfers "
        "instead of spinning (and starving the loader threads of the GIL)",
        (("engine_adapter/vllm_transfer.py",
          "            self._idle.wait_for(lambda: self._finished != seen, timeout)\n",
          "            pass\n"),),
        ("tests/vllm/test_transfer.py", "tests/vllm/test_connector_async.py"),
        keyword="idle_steps_wait or waits_instead_of_spinning", python="vllm", timeout_s=600),
    Mutation(
        "connector_idle_step_unmarked",
        "the scheduler marks steps with no tokens scheduled, so the connector knows no forward runs",
        (("engine_adapter/vllm_connector.py",
          "idle=scheduler_output.total_num_scheduled_tokens == 0)",
          "idle=False)"),),
        ("tests/vllm/test_connector_async.py",), keyword="waits_instead_of_spinning",
        python="vllm", timeout_s=600),
    Mutation(
        "connector_frees_blocks_while_saving",
        "vLLM frees a finished request's blocks only after the connector copied them out",
        (("engine_adapter/vllm_transfer.py",
          "            sent = {r for r in self._finishing if r not in self._saves_pending}\n",
          "            sent = set(self._finishing)\n"),),
        ("tests/vllm/test_transfer.py",), keyword="released_only_after", python="vllm"),
    Mutation(
        "connector_flush_in_the_step",
        "the vLLM connector's step never waits for a store commit (no flush in wait_for_save)",
        (("engine_adapter/vllm_connector.py", "        self._transfers.save([SaveJob(",
          "        self.store.flush()\n        self._transfers.save([SaveJob("),),
        ("tests/vllm/test_connector_async.py",), keyword="nothing_flushes", python="vllm",
        timeout_s=600),
    Mutation(
        "connector_block_size_unchecked",
        "the vLLM connector refuses a block_size that does not divide the store's block_tokens",
        (("engine_adapter/vllm_connector.py", "        if self.block_tokens % self.vllm_block_size:\n",
          "        if False:\n"),),
        ("tests/vllm/test_connector_config.py",), keyword="block_size", python="vllm"),
    Mutation(
        "connector_tenant_ignored",
        "two tenants of the vLLM connector never share a block",
        (("engine_adapter/vllm_connector.py", 'tenant_salt=own.get("tenant", "")', 'tenant_salt=""'),),
        ("tests/vllm/test_connector_config.py",), keyword="tenants", python="vllm"),
    Mutation(
        "connector_model_ignored",
        "two models behind the vLLM connector never share a block",
        (("engine_adapter/vllm_connector.py",
          'return make_namespace(model.replace("|", "/"), layout, dtype,',
          'return make_namespace("model", layout, dtype,'),),
        ("tests/vllm/test_connector_config.py",), keyword="tenants", python="vllm"),
    Mutation(
        "connector_bypass_ignored",
        "the vLLM connector bypasses (and counts) LoRA, multimodal and prompt-embeds requests",
        (("engine_adapter/vllm_connector.py", "        bypass = _bypass_reason(request)\n",
          "        bypass = None\n"),),
        ("tests/vllm/test_connector_config.py",), keyword="bypassed", python="vllm"),
    Mutation(
        "compact_ignores_open_stores",
        "compaction never swaps the data file under a process that has the store open",
        (("kvstore/tiers/disk/env.py", "                fcntl.flock(fd, fcntl.LOCK_SH)  # waits",
          "                pass  # waits"),),
        ("tests/tools/test_compact.py",), keyword="refused"),
    Mutation(
        "compact_copy_keeps_free_pages",
        "compaction gives the free pages of the data file back",
        (("kvstore/tiers/disk/env.py", "self._env.copy(str(tmp), compact=True)",
          "self._env.copy(str(tmp), compact=False)"),),
        ("tests/tools/test_compact.py",), keyword="shrinks"),
    Mutation(
        "ls_tree_forks_lost",
        "`ls --tree` shows where chains fork",
        (("tools/cli/ls.py", "        while len(children.get(keys[-1], ())) == 1:",
          "        while children.get(keys[-1], ()):"),),
        ("tests/tools/test_cli.py",), keyword="ls_tree"),
    Mutation(
        "top_ignores_q",
        "`kvstore top` on a terminal stops on q",
        (("tools/cli/top.py", 'os.read(fd, 1) in (b"q", b"Q")', "False"),),
        ("tests/tools/test_cli.py",), keyword="terminal"),
    Mutation(
        "top_ctrl_c_ignored",
        "`kvstore top` on a terminal stops on Ctrl-C as a normal exit",
        (("tools/cli/top.py",
          "            if woken in ready and signal.SIGINT in os.read(woken, 512):  # signal numbers",
          "            if False:"),),
        ("tests/tools/test_cli.py",), keyword="terminal"),
    Mutation(
        "loaded_bytes_not_counted",
        "`kvstore top` shows the bytes engines load per second",
        (("kvstore/store.py",
          '            self.metrics.add("loaded_bytes", source[:loaded].count(level) * raw, tier=self.tiers[level].name)',
          "            pass"),),
        ("tests/tools/test_cli.py",), keyword="top_once"),
    Mutation(
        "serve_metrics_own_counters",
        "the dashboard of kvstore serve-metrics shows every tile of a store an engine fills",
        (("tools/cli/serve_metrics.py", "process_counters=False,", "process_counters=True,"),),
        ("tests/tools/test_dashboard.py",), keyword="engine_fills"),
)


@dataclasses.dataclass
class Result:
    name: str
    status: str  # killed | SURVIVED | FAIL
    by: str  # the failing test, or why the check could not be made
    seconds: float


def _python(m: Mutation) -> str | None:
    rel = PYTHONS[m.python]
    if rel is None:
        return sys.executable
    exe = ROOT / rel
    return str(exe) if exe.exists() else None


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


def apply(m: Mutation, tree: Path) -> str | None:
    """Applies ``m`` under ``tree``; the reason it cannot be applied, or None."""
    for rel, old, new in m.edits:
        path = tree / rel
        text = path.read_text()
        n = text.count(old)
        if n != 1:
            return f"target text found {n} times in {rel}: {old.strip()[:60]!r}"
        path.write_text(text.replace(old, new))
    return None


def _env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def imported_from(python: str, tree: Path) -> str | None:
    """None if ``python`` run in ``tree`` imports every package from ``tree``; else what it got."""
    code = "import json, importlib; print(json.dumps({p: importlib.import_module(p).__file__ for p in %r}))" % (PACKAGES,)
    out = subprocess.run([python, "-c", code], cwd=tree, env=_env(tree), capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "import failed"
    wrong = {p: f for p, f in json.loads(out.stdout).items()
             if not Path(f).resolve().is_relative_to(tree.resolve())}
    return None if not wrong else f"imported from outside the copy: {wrong}"


def run_guards(m: Mutation, python: str, tree: Path, timeout_s: int) -> tuple[bool, str]:
    """(passed, the first failing test or a note)."""
    argv = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
            "-rf", *m.guards]
    if m.keyword:
        argv += ["-k", m.keyword]
    try:
        out = subprocess.run(argv, cwd=tree, env=_env(tree), capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout_s} s ({' '.join(m.guards)} -k {m.keyword!r})"
    text = out.stdout + out.stderr
    if out.returncode == 5:  # nothing collected or everything deselected
        return True, "NO TESTS SELECTED"
    if out.returncode == 0:
        return True, ""
    if out.returncode < 0:  # the mutation crashed the test process (SIGBUS on a full disk)
        return False, f"{signal.Signals(-out.returncode).name} in {' '.join(m.guards)} -k {m.keyword!r}"
    failed = [line.split()[1] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return False, failed[0] if failed else f"pytest exit {out.returncode}: {text.strip()[-300:]}"


def check(m: Mutation, baseline: bool) -> Result:
    t0 = time.monotonic()
    python = _python(m)
    if python is None:
        return Result(m.name, "FAIL", f"{PYTHONS[m.python]} missing (make test-vllm builds it)", 0.0)
    with tempfile.TemporaryDirectory(prefix=f"kvstore-mutant-{m.name}-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        if baseline:
            wrong = imported_from(python, tree)
            if wrong:
                return Result(m.name, "FAIL", wrong, time.monotonic() - t0)
            ok, why = run_guards(m, python, tree, m.timeout_s)
            if not ok or why:
                return Result(m.name, "FAIL", f"guards fail unmutated: {why}", time.monotonic() - t0)
        why = apply(m, tree)
        if why:
            return Result(m.name, "FAIL", why, time.monotonic() - t0)
        wrong = imported_from(python, tree)
        if wrong:
            return Result(m.name, "FAIL", wrong, time.monotonic() - t0)
        survived, by = run_guards(m, python, tree, m.timeout_s)
    if by == "NO TESTS SELECTED":
        return Result(m.name, "FAIL", "no guard test selected", time.monotonic() - t0)
    return Result(m.name, "SURVIVED" if survived else "killed", by, time.monotonic() - t0)


def render(results: list[Result]) -> str:
    w = max(len(r.name) for r in results)
    lines = [f"{'mutation':<{w}}  {'result':<8}  {'seconds':>7}  killed by / why"]
    for r in results:
        lines.append(f"{r.name:<{w}}  {r.status:<8}  {r.seconds:7.1f}  {r.by}")
    bad = [r for r in results if r.status != "killed"]
    lines.append(f"{len(results) - len(bad)} of {len(results)} killed"
                 + (f"; not killed: {', '.join(r.name for r in bad)}" if bad else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.mutants", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="NAME", help="run this mutation (repeatable)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the guards on the unmutated copy first")
    args = ap.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.claim} [{' '.join(m.guards)} -k {m.keyword!r}, python {m.python}]")
        return 0
    unknown = [n for n in args.only or () if n not in by_name]
    if unknown:
        ap.error(f"unknown mutation(s) {', '.join(unknown)}; see --list")
    chosen = [by_name[n] for n in args.only] if args.only else list(MUTATIONS)
    results = []
    for m in chosen:
        results.append(check(m, baseline=not args.no_baseline))
        if not args.json:
            r = results[-1]
            print(f"{r.name}: {r.status} {r.by} ({r.seconds:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        print(render(results))
    return 0 if all(r.status == "killed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
