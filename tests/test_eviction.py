from kvstore.eviction import EntryMeta, LRUIndex, MonotonicClock, is_expired, lru_rank


def meta(depth, t, pinned=0.0):
    return EntryMeta(1, depth, b"p" * 16 if depth else b"", t, t, 10, 10, pinned)


def test_touching_a_path_keeps_parents_more_recent_than_children():
    idx = LRUIndex()
    chain = [bytes([i]) * 16 for i in range(4)]
    for d, k in enumerate(chain):
        idx.add(k, meta(d, 0.0))
    idx.touch_path(chain, 5.0)
    assert list(idx.victims(5.0)) == list(reversed(chain))  # deepest first


def test_rank_orders_by_time_then_depth():
    assert lru_rank(1.0, 0) > lru_rank(1.0, 3) > lru_rank(0.5, 0)


def test_expired_skips_pins_and_stops_at_fresh_entries():
    idx = LRUIndex()
    idx.add(b"a" * 16, meta(0, 0.0, pinned=100.0))
    idx.add(b"b" * 16, meta(0, 1.0))
    idx.add(b"c" * 16, meta(0, 50.0))
    assert idx.expired(now=20.0, ttl_s=10.0) == [b"b" * 16]
    assert not is_expired(meta(0, 0.0, pinned=100.0), 99.0, 1.0)
    assert is_expired(meta(0, 0.0, pinned=100.0), 101.0, 1.0)
    assert list(idx.victims(20.0)) == [b"b" * 16, b"c" * 16]


def test_monotonic_clock_never_goes_back():
    t = [10.0]
    c = MonotonicClock(lambda: t[0])
    assert c() == 10.0
    t[0] = 5.0
    assert c() == 10.0
