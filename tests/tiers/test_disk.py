"""DiskTier opened read-only, as a tool looking at a store an engine writes."""

import pytest

from kvstore.codec import Codec
from kvstore.errors import StoreOpenError
from kvstore.tiers.disk import DiskTier

from ..conftest import BLOCK_TOKENS as B, make_block


def test_a_read_only_tier_reads_what_a_store_wrote_and_writes_nothing(open_store, tmp_path):
    s = open_store(host_bytes=0)
    s.put(list(range(2 * B)), [make_block(1), make_block(2)])
    s.flush()
    s.close()
    files = {f.name: f.stat().st_size for f in (tmp_path / "store" / "disk").iterdir()}
    t = DiskTier(tmp_path / "store" / "disk", 1 << 30, 3600.0, Codec(), readonly=True)
    try:
        assert t.usage().entries == 2
        assert sorted(m.depth for _, m in t.entries()) == [0, 1]
        with pytest.raises(PermissionError, match="read-only"):
            t.put_many([], 0.0)
    finally:
        t.close()
    assert {f.name: f.stat().st_size for f in (tmp_path / "store" / "disk").iterdir()} == files


def test_a_read_only_tier_refuses_a_directory_without_a_store(tmp_path):
    with pytest.raises(StoreOpenError, match="cannot open the disk tier"):
        DiskTier(tmp_path, 1 << 30, 3600.0, Codec(), readonly=True)
