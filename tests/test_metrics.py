"""Metrics are declared once (kvstore/metrics.py): recording anything undeclared fails."""

import pytest

from kvstore.metrics import DECLARED, Metrics, parse_flat


def test_undeclared_names_labels_and_values_are_refused():
    m = Metrics()
    with pytest.raises(ValueError, match="not a declared counter"):
        m.add("hit_tokenz", 1)
    with pytest.raises(ValueError, match="undeclared label 'tierr'"):
        m.add("hit_tokens", 1, tierr="disk")
    with pytest.raises(ValueError, match="reason='full'"):
        m.add("dropped_writes", 1, tier="disk", reason="full")
    with pytest.raises(ValueError, match="not a declared histogram"):
        m.observe("hit_tokens", 0.1)
    m.add("dropped_writes", 2, tier="disk", reason="queue_full")
    assert m.value("dropped_writes", tier="disk", reason="queue_full") == 2


def test_zero_series_cover_every_declared_reason_of_every_tier():
    series = DECLARED["dropped_writes"].zero_series(["host", "disk"])
    assert {"tier": "disk", "reason": "no_space"} in series
    assert len(series) == 2 * len(DECLARED["dropped_writes"].labels["reason"])


def test_flat_series_round_trip():
    m = Metrics()
    m.add("evictions", 3, tier="disk", reason="ttl")
    (flat, value), = m.flat().items()
    assert parse_flat(flat) == ("evictions", {"reason": "ttl", "tier": "disk"}) and value == 3
