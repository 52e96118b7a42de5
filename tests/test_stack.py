"""The store is a loop over an injected tier stack: a new tier is a list entry, not an edit of
the store. Two disk tiers stacked show spill below disk with the encoded record as it is."""

import torch

from kvstore import KVStore, StoreConfig
from kvstore.codec import Codec
from kvstore.ledger import MemoryLedger
from kvstore.metrics import Metrics
from kvstore.tiers.disk import DiskTier, entry_cost

from .conftest import BLOCK_TOKENS as B, make_block


def test_a_block_evicted_from_disk_spills_to_the_tier_below_without_reencoding(tmp_path, clock):
    metrics = Metrics()
    costs = sorted(entry_cost(len(Codec("zstd").encode(make_block(i)))) for i in range(6))
    assert sum(costs[-3:]) < sum(costs[:4])  # warm holds three blocks, never four
    (tmp_path / "warm").mkdir()
    (tmp_path / "cold").mkdir()
    warm = DiskTier(tmp_path / "warm", sum(costs[-3:]), 3600.0, Codec("zstd"), metrics)
    cold = DiskTier(tmp_path / "cold", 1 << 24, 3600.0, Codec("none"), metrics)
    cold.name = "cold"
    store = KVStore(StoreConfig(path=tmp_path, block_tokens=B), clock=clock, metrics=metrics,
                    tiers=[warm, cold], ledger=MemoryLedger())
    try:
        prompts = [list(range(1000 * i, 1000 * i + B)) for i in range(6)]  # one block each
        blocks = [make_block(i) for i in range(6)]
        cold.capacity_bytes = 0  # cold takes nothing yet: what it gets later comes by spill
        for p, b in zip(prompts[:3], blocks[:3]):
            store.put(p, [b])
            assert store.flush(30)
            clock.advance(1)
        assert cold.usage().entries == 0
        cold.capacity_bytes = 1 << 24
        for p, b in zip(prompts[3:], blocks[3:]):  # each evicts the oldest of warm's three
            store.put(p, [b])
            assert store.flush(30)
            clock.advance(1)
        assert warm.usage().entries == 3 and cold.usage().entries == 6
        codecs = []
        for p in prompts:
            key = store.match(p, touch=False).all_keys[0]
            codecs.append(Codec.read_header(cold.read_record(key)[0])["codec"])
        # The spilled ones are warm's zstd records as they were; the later ones cold encoded.
        assert codecs == ["zstd"] * 3 + ["none"] * 3
        assert metrics.value("spilled_blocks", tier="disk") == 3
        for p, b in zip(prompts, blocks):
            m = store.match(p)
            assert m.num_blocks == 1
            assert torch.equal(store.get(m)[0], b)
        assert store.flush(30)  # the loop's promotions have landed; then one more, later
        clock.advance(1)
        store.get(store.match(prompts[0]))
        assert store.flush(30)
        assert store.match(prompts[0]).tiers == ("disk",)  # a hit below is promoted back up
    finally:
        store.close()
