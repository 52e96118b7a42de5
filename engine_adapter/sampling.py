"""Seeded sampling: temperature and nucleus (top-p) choice of the next token.

A ``Sampler`` draws from its own ``torch.Generator`` seeded by the request, one draw per token,
so the tokens it picks are a function of the seed and the logits alone. The logits with a cache
hit are bit-identical to those without one (generation.py), so the output is too: nothing here
depends on how much of the prompt was cached.
"""

from __future__ import annotations

import secrets

import torch

from .generation import argmax

__all__ = ["Sampler"]


class Sampler:
    """Chooses a token from logits: greedy at ``temperature == 0``, else a seeded draw.

    Args:
        temperature: >= 0; 0 is greedy (argmax, ties to the lowest id).
        top_p: in (0, 1]: sample from the smallest set of most likely tokens whose
            probability reaches ``top_p``.
        seed: the generator's seed; None draws one at random (the output then varies).

    Raises:
        ValueError: a value out of range, naming it.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None):
        if not temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self._gen = torch.Generator().manual_seed(self.seed % (1 << 64))

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return argmax(logits)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            # Sorting is stable so equal probabilities keep id order: the kept set is a
            # function of the logits alone.
            sorted_p, order = torch.sort(probs, descending=True, stable=True)
            before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the more likely tokens
            sorted_p = torch.where(before < self.top_p, sorted_p, torch.zeros_like(sorted_p))
            return int(order[torch.multinomial(sorted_p, 1, generator=self._gen)])
        return int(torch.multinomial(probs, 1, generator=self._gen))
