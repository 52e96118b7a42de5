"""WriteBehind's batches in front of a real disk tier."""

import threading
import time

import torch

from kvstore import writeback
from kvstore.codec import Codec
from kvstore.eviction import EntryMeta
from kvstore.metrics import Metrics
from kvstore.tiers.base import BlockEntry
from kvstore.tiers.disk import DiskTier
from kvstore.writeback import WriteBehind

from .conftest import make_block

SHAPE = (4, 2, 2, 64, 64)  # 128 KiB of float16


def test_a_large_put_is_written_in_batches_of_at_most_batch_max_bytes(tmp_path, monkeypatch):
    # Batches of 64 large blocks split a put of 128 as 64, 32, 16, ..., 1: the last commits ran
    # alone, and the records of one batch outgrew the writer's reused buffer.
    block = make_block(0, shape=SHAPE, dtype=torch.float16)
    monkeypatch.setattr(writeback, "BATCH_MAX_BYTES", 4 * block.nbytes)
    tier = DiskTier(tmp_path, 256 << 20, 3600.0, Codec())
    sizes, lock = [], threading.Lock()
    put_many = tier.put_many

    def spy(entries, now, on_evict=None):
        with lock:
            sizes.append(len(entries))
        return put_many(entries, now, on_evict)
    tier.put_many = spy
    wb = WriteBehind(tier, 64, SHAPE, torch.float16, threads=2, clock=time.time, metrics=Metrics())
    blocks = [make_block(i, shape=SHAPE, dtype=torch.float16) for i in range(20)]
    now = time.time()
    keys = [i.to_bytes(16, "little") for i in range(20)]
    assert wb.submit([BlockEntry(k, b, EntryMeta(1, i, keys[i - 1] if i else b"", now, now, b.nbytes))
                      for i, (k, b) in enumerate(zip(keys, blocks))]) == [True] * 20
    assert wb.flush(30)
    wb.close()
    assert sum(sizes) == 20 and max(sizes) == 4, f"batches of {sizes}"
    outs = [torch.empty_like(b) for b in blocks]
    assert tier.get_many(keys, outs, now) == [True] * 20
    assert all(torch.equal(o, b) for o, b in zip(outs, blocks))
    tier.close()


def test_small_blocks_still_go_in_batches_of_batch_bytes(tmp_path):
    # Small blocks cost a commit a batch, not CPU: the cap leaves their batches as they were.
    tier = DiskTier(tmp_path, 256 << 20, 3600.0, Codec())
    wb = WriteBehind(tier, 0, (1, 1, 1, 1, 32), torch.bfloat16, threads=1, clock=time.time,
                     metrics=Metrics())
    assert wb.batch == writeback.BATCH_BYTES // 64
    wb.close()
    tier.close()
