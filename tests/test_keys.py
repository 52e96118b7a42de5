import os
import subprocess
import sys

import numpy as np
import pytest

from kvstore import keys


def test_partial_trailing_block_gets_no_key():
    assert len(keys.block_keys("ns", list(range(63)), 64)) == 0
    assert len(keys.block_keys("ns", list(range(64)), 64)) == 1
    assert len(keys.block_keys("ns", list(range(64 * 3 + 10)), 64)) == 3


def test_keys_are_chained_over_the_whole_prefix():
    a = list(range(256))
    b = a.copy()
    b[70] = 9999  # second block differs
    ka, kb = keys.block_keys("ns", a, 64), keys.block_keys("ns", b, 64)
    assert ka[0] == kb[0]
    assert all(x != y for x, y in zip(ka[1:], kb[1:]))  # everything after the change differs
    # the same block content at a different position has a different key
    assert keys.block_keys("ns", a[64:128], 64)[0] != ka[1]


def test_namespace_and_tenant_separate_keys():
    toks = list(range(128))
    assert keys.block_keys("a", toks, 64) != keys.block_keys("b", toks, 64)
    ns1 = keys.make_namespace("m", "L2:H2:D4", "bfloat16", tenant_salt="alice")
    ns2 = keys.make_namespace("m", "L2:H2:D4", "bfloat16", tenant_salt="bob")
    assert ns1 != ns2 and "alice" not in ns1
    assert keys.block_keys(ns1, toks, 64) != keys.block_keys(ns2, toks, 64)
    assert keys.make_namespace("m", "l", "bfloat16", tp_rank=0) != keys.make_namespace("m", "l", "bfloat16", tp_rank=1)


def test_numpy_list_and_array_inputs_agree():
    toks = list(range(1000, 1000 + 200))
    k = keys.block_keys("ns", toks, 64)
    assert keys.block_keys("ns", np.array(toks, dtype=np.int64), 64) == k
    assert keys.block_keys("ns", np.array(toks, dtype=np.uint32), 64) == k
    assert keys.block_keys("ns", toks, 64, max_blocks=2) == k[:2]


@pytest.mark.parametrize("bad, fragment", [
    ([1, 2, -3], "token_ids[2]"),
    ([1, 2.5], "token_ids[1]"),
    ([1, "x"], "token_ids[1]"),
    ([1, 1 << 32], "token_ids[1]"),
    (np.array([0.5, 1.0]), "integer ids"),
    (np.array([[1, 2]]), "1-D"),
    (np.array([1, -1]), "ids in"),
])
def test_bad_token_ids_raise_value_error_naming_the_problem(bad, fragment):
    with pytest.raises(ValueError) as e:
        keys.block_keys("ns", bad, 2)
    assert fragment in str(e.value)


def test_keys_are_stable_across_processes_and_hash_seeds():
    toks = list(range(5000, 5000 + 64 * 4))
    here = [k.hex() for k in keys.block_keys("model=x|v=1", toks, 64)]
    code = ("from kvstore import keys; "
            f"print(','.join(k.hex() for k in keys.block_keys('model=x|v=1', list(range(5000, {5000 + 64 * 4})), 64)))")
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        assert out.split(",") == here
    assert len(here[0]) == 32


def test_keys_follow_the_documented_formula_and_a_group_shares_its_first_keys_leading_bytes():
    import struct

    import xxhash
    g, lead = keys.GROUP_BLOCKS, keys.LEAD_BYTES
    n = 2 * g + 3  # two whole groups and the start of a third
    toks = list(range(300, 300 + 64 * n))
    k = xxhash.xxh3_128_digest(b"kvstore/namespace/v1\x00" + b"ns")
    expect = []
    for i in range(n):
        d = xxhash.xxh3_128_digest(k + struct.pack("<64I", *toks[64 * i:64 * i + 64]))
        k = d if i % g == 0 else expect[i - i % g][:lead] + d[lead:]
        expect.append(k)
    got = keys.block_keys("ns", toks, 64)
    assert got == expect
    # What the disk tier relies on: a group's keys sort together, the next group starts afresh.
    starts = {key[:lead] for key in got[::g]}
    assert len(starts) == 3
    assert all(got[i][:lead] == got[i - i % g][:lead] for i in range(n))
    assert len({key[lead:] for key in got}) == n
