"""Settings stored with the data: block size and layout are fixed when a store is created; the
disk budget, TTL and codec follow the stored value unless an opener names one (settings.py)."""

import subprocess
import sys

import pytest
import torch

from kvstore import KVStore, StoreConfig
from kvstore.errors import SettingsMismatchError

from .conftest import BLOCK_TOKENS as B, SHAPE, make_block


def test_a_store_made_with_one_block_size_refuses_another(tmp_path):
    path = tmp_path / "s"
    KVStore.open(StoreConfig(path=path, block_tokens=32, host_bytes=0)).close()
    with pytest.raises(SettingsMismatchError, match=r"block_tokens: .*created with block_tokens=32; "
                                                    r"the config asks for 64"):
        KVStore.open(StoreConfig(path=path, block_tokens=64))
    with KVStore.open(StoreConfig(path=path)) as s:  # naming none: the store's own
        assert s.config.block_tokens == 32


def test_the_block_layout_is_stored_at_the_first_put_and_enforced_on_reopen(tmp_path):
    path = tmp_path / "s"
    with KVStore.open(StoreConfig(path=path, block_tokens=B, host_bytes=0)) as s:
        s.put(list(range(B)), [make_block(1)])
    with KVStore.open(StoreConfig(path=path, host_bytes=0)) as s:
        assert s.block_shape == SHAPE and s.dtype == torch.bfloat16  # known before any put
        assert s.settings()["block_shape"] == list(SHAPE)
    with pytest.raises(SettingsMismatchError, match="dtype: .*created with dtype=bfloat16"):
        KVStore.open(StoreConfig(path=path, dtype="float16"))
    with pytest.raises(SettingsMismatchError, match="block_shape"):
        KVStore.open(StoreConfig(path=path, block_shape=(1, 2, 3)))


def test_budgets_follow_the_stored_value_unless_an_opener_names_one(tmp_path):
    path = tmp_path / "s"
    KVStore.open(StoreConfig(path=path, block_tokens=B, host_bytes=0, disk_bytes="8MiB",
                             disk_ttl_s=600)).close()
    a = KVStore.open(StoreConfig(path=path, host_bytes=0))  # no budget named: the stored one
    try:
        assert (a.config.disk_bytes, a.config.disk_ttl_s) == (8 << 20, 600)
        # Another process overrides the budget; this one enforces it from its next write on.
        subprocess.run([sys.executable, "-c", "import sys; from kvstore import KVStore, StoreConfig; "
                        "KVStore.open(StoreConfig(path=sys.argv[1], host_bytes=0, "
                        "disk_bytes='1MiB')).close()", str(path)], check=True, timeout=120)
        a.put(list(range(B)), [make_block(1)])
        assert a.flush(30)
        assert a.tier("disk").usage().budget == 1 << 20
        assert a.settings()["disk_bytes"] == 8 << 20  # what it opened with; the tier follows the store
    finally:
        a.close()
    with KVStore.open(StoreConfig(path=path), readonly=True) as r:
        assert r.settings()["disk_bytes"] == 1 << 20
