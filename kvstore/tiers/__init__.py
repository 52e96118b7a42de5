"""Tiers: one module per medium behind the ``Tier`` protocol in ``base``."""

from .base import BlockEntry, Evicted, Tier, TierUsage

__all__ = ["BlockEntry", "Evicted", "Tier", "TierUsage"]
