"""SlabTier's leases: the write queues write a block from its RAM slot instead of a copy."""

import os

import torch

from kvstore.eviction import EntryMeta
from kvstore.tiers.base import BlockEntry
from kvstore.tiers.slab import SlabTier

from ..conftest import SHAPE, block_nbytes, make_block


def two_slots() -> SlabTier:
    tier = SlabTier("host", 2 * block_nbytes(), 3600.0)
    tier.configure(SHAPE, torch.bfloat16)
    return tier


def put(tier: SlabTier, i: int, now: float) -> list[bool]:
    key = bytes([i]) * 16
    return tier.put_many([BlockEntry(key, make_block(i), EntryMeta(1, 0, b"", now, now, block_nbytes()))], now)


def test_a_leased_slot_keeps_its_block_until_released_though_the_block_is_dropped():
    tier = two_slots()
    put(tier, 1, 1.0)
    put(tier, 2, 2.0)
    view, release = tier.lease(bytes([1]) * 16)
    assert torch.equal(view, make_block(1))
    assert put(tier, 3, 3.0) == [True]  # block 1 is the oldest, but leased: block 2 goes
    assert tier.contains_many([bytes([1]) * 16, bytes([2]) * 16], 3.0) == [True, False]
    assert tier.delete_many([bytes([1]) * 16]) == 1  # dropped, its slot still leased
    assert put(tier, 4, 4.0) == [True]  # takes block 3's slot, not block 1's
    assert torch.equal(view, make_block(1)), "a leased slot was overwritten"
    assert tier.usage().entries == 1
    release()
    assert put(tier, 5, 5.0) == [True] and tier.usage().entries == 2
    assert torch.equal(view, make_block(5)), "the released slot was not reused"


def test_every_lease_is_released_before_the_slot_is_reused():
    tier = two_slots()
    put(tier, 1, 1.0)
    (view, first), (_, second) = tier.lease(bytes([1]) * 16), tier.lease(bytes([1]) * 16)
    assert tier.delete_many([bytes([1]) * 16]) == 1
    first()
    first()  # a second call releases nothing more
    put(tier, 2, 2.0)
    put(tier, 3, 3.0)  # one free slot left after block 2: block 3 evicts block 2
    assert torch.equal(view, make_block(1))
    second()
    put(tier, 4, 4.0)
    assert tier.usage().entries == 2
    assert tier.lease(bytes([9]) * 16) is None  # not held


def test_a_forked_child_reuses_slots_its_parents_queues_leased():
    # The parent's write queues and their releases stay in the parent: in the child every slot
    # is usable, and the parent's lease still holds in the parent.
    tier = two_slots()
    put(tier, 1, 1.0)
    view, release = tier.lease(bytes([1]) * 16)
    tier.delete_many([bytes([1]) * 16])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = put(tier, 2, 2.0) + put(tier, 3, 3.0)
            os.write(w, b"1" if ok == [True, True] and tier.usage().entries == 2 else b"0")
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    assert got == b"1", "the child could not use the slot the parent leased"
    put(tier, 2, 2.0)
    put(tier, 3, 3.0)
    assert torch.equal(view, make_block(1)) and tier.usage().entries == 1
    release()
