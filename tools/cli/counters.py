"""The store's lifetime counters as the commands show them (stats: totals; top: rates)."""

from __future__ import annotations


def lifetime_counters(flat: dict[str, float]) -> dict:
    """Persisted counters (``name|label=value,...`` -> value; or their rates), grouped:
    evictions and dropped writes nested by tier, then reason; corrupt records by tier."""
    def series(name: str) -> list[tuple[dict[str, str], float]]:
        out = []
        for key, value in flat.items():
            n, _, labels = key.partition("|")
            if n == name:
                out.append((dict(kv.split("=", 1) for kv in labels.split(",") if "=" in kv), value))
        return out

    def by_tier_reason(name: str) -> dict[str, dict[str, float]]:
        nested: dict[str, dict[str, float]] = {}
        for labels, value in series(name):
            reasons = nested.setdefault(labels.get("tier", "?"), {})
            reasons[labels.get("reason", "?")] = reasons.get(labels.get("reason", "?"), 0) + value
        return nested

    def by_tier(name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in series(name):
            out[labels.get("tier", "?")] = out.get(labels.get("tier", "?"), 0) + value
        return out

    hits = by_tier("hit_tokens")
    hit, miss = sum(hits.values()), sum(v for _, v in series("miss_tokens"))
    evictions, dropped, corrupt = by_tier_reason("evictions"), by_tier_reason("dropped_writes"), by_tier("corrupt_records")
    remote_errors: dict[str, float] = {}
    for labels, value in series("remote_errors"):
        remote_errors[labels.get("reason", "?")] = remote_errors.get(labels.get("reason", "?"), 0) + value
    return {
        "requests": sum(v for _, v in series("requests")),
        "stored_blocks": by_tier("stored_blocks"),
        "loaded_bytes": by_tier("loaded_bytes"),
        "hit_tokens": hits, "hit_tokens_total": hit, "miss_tokens": miss,
        "hit_rate": hit / (hit + miss) if hit + miss else 0.0,
        "evictions": evictions, "evictions_total": sum(v for r in evictions.values() for v in r.values()),
        "dropped_writes": dropped, "dropped_writes_total": sum(v for r in dropped.values() for v in r.values()),
        "corrupt_records": corrupt, "corrupt_records_total": sum(corrupt.values()),
        "remote": {"hits": sum(v for _, v in series("remote_hits")),
                   "misses": sum(v for _, v in series("remote_misses")),
                   "errors": remote_errors},
    }
