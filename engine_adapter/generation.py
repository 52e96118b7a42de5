"""Generation for the transformers adapter: chunked prefill and a hand-written decode loop
(greedy, or any token chooser such as sampling.Sampler) that can resume from a cache rebuilt
from blocks (kv_blocks.cache_from_blocks).

Exactness: a cache rebuilt from blocks reproduces an uncached run bit for bit
only if both runs prefill in the same absolute chunks (``prefill_chunk`` of
:func:`greedy_generate`) and only blocks inside complete prefill chunks of a
prompt are reused (``GenerationResult.canonical_len``).  The reason is that
CPU kernels give a token's K/V ulp-level differences depending on the shape
of the forward pass that computed it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

__all__ = ["GenerationResult", "argmax", "default_eos_ids", "greedy_generate", "prefill"]


def argmax(logits: torch.Tensor) -> int:
    """Greedy choice; ties resolve to the lowest token id."""
    return int(torch.argmax(logits))


@dataclass
class GenerationResult:
    """Outcome of :func:`greedy_generate`.

    Attributes:
        token_ids: generated tokens, including the stop token if one was hit.
        first_logits: float32 logits (1-D, vocab size) that chose ``token_ids[0]``.
        cache: KV cache covering ``input_ids + token_ids[:-1]``: the whole
            prompt and every generated token except the last, which was never
            fed back.  Its length is ``len(input_ids) + len(token_ids) - 1``.
        ttft_s: seconds from the call to the first token being chosen.
        total_s: seconds for the whole call.
        prefill_tokens: tokens actually computed in the prefill,
            ``len(input_ids) - past_len``.
        canonical_len: cache positions ``[0, canonical_len)`` hold K/V that is
            a pure function of the token prefix (complete prefill chunks):
            ``len(input_ids) // prefill_chunk * prefill_chunk`` when chunked,
            else 0.  Only these positions are safe to store as exact blocks.
    """

    token_ids: list[int]
    first_logits: torch.Tensor
    cache: DynamicCache
    ttft_s: float
    total_s: float
    prefill_tokens: int
    canonical_len: int


def default_eos_ids(model: PreTrainedModel) -> frozenset[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _forward_step(model: PreTrainedModel, ids: list[int], start_pos: int, cache: DynamicCache) -> torch.Tensor:
    """Run ``ids`` at positions ``start_pos..`` through the model, extending ``cache``; return last logits."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    # transformers 5.x dropped `cache_position`; position_ids alone place the
    # tokens (RoPE) and, together with the cache length, build the causal mask.
    position_ids = torch.arange(start_pos, start_pos + len(ids), dtype=torch.long, device=model.device).unsqueeze(0)
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,  # only the last row is needed; skips a (T x vocab) matmul
    )
    # On the host (a no-op on CPU): the next token is needed there anyway, and samplers draw
    # from a CPU generator, so a seed's draws do not depend on where the model runs.
    return out.logits[0, -1].cpu()


def prefill(
    model: PreTrainedModel,
    input_ids: Sequence[int],
    start: int,
    cache: DynamicCache,
    prefill_chunk: int | None = None,
) -> torch.Tensor:
    """Runs ``input_ids[start:]`` through the model at positions ``start..``, extending ``cache``.

    ``cache`` must hold exactly ``input_ids[:start]``. With ``prefill_chunk``, forward passes end
    on absolute multiples of it (``start`` must be one), so a chunk's inputs (its tokens plus the
    cache before it) are the same whether or not earlier chunks came from a rebuilt cache.

    Returns:
        The logits of the last position.
    """
    ids = list(input_ids)
    if prefill_chunk is not None and start % prefill_chunk:
        raise ValueError(f"start ({start}) must be a multiple of prefill_chunk ({prefill_chunk})")
    if not 0 <= start < len(ids):
        raise ValueError(f"start ({start}) must be in [0, len(input_ids)={len(ids)})")
    pos = start
    with torch.inference_mode():
        while pos < len(ids):
            end = len(ids) if prefill_chunk is None else min(len(ids), (pos // prefill_chunk + 1) * prefill_chunk)
            logits = _forward_step(model, ids[pos:end], pos, cache)
            pos = end
    return logits


def greedy_generate(
    model: PreTrainedModel,
    input_ids: Sequence[int],
    past: DynamicCache | None = None,
    past_len: int = 0,
    max_new_tokens: int = 32,
    eos_token_ids: Iterable[int] | None = None,
    prefill_chunk: int | None = None,
    *,
    choose: Callable[[torch.Tensor], int] = argmax,
    on_token: Callable[[int], bool] | None = None,
) -> GenerationResult:
    """Decode from ``input_ids`` (greedily by default), optionally resuming from a cache of its
    prefix.

    Args:
        model: causal LM from :func:`load_model` (batch 1, CPU).
        input_ids: the full prompt, including any part covered by ``past``.
        past: cache holding exactly ``input_ids[:past_len]``, e.g. from
            :func:`cache_from_blocks`.  It is extended in place and returned
            as ``result.cache``; pass a fresh one per call.
        past_len: number of prompt tokens covered by ``past``; must be
            ``< len(input_ids)`` since the last prompt token must be computed
            to produce logits.
        max_new_tokens: upper bound on generated tokens (>= 1).
        eos_token_ids: generation stops after emitting one of these; defaults
            to the model's ``generation_config.eos_token_id``.
        prefill_chunk: if set, prefill in forward passes that end on absolute
            multiples of this many tokens (``past_len`` must be one).  See
            exactness below.
        choose: picks each token from the last position's logits (default
            :func:`argmax`); a seeded sampler keeps the output a function of the
            logits alone, so it stays exact with a rebuilt cache.
        on_token: called with each chosen token; returning False stops decoding
            after that token (a stop string, a client that went away).

    Only ``input_ids[past_len:]`` is prefilled, at positions ``past_len..``;
    decoding then feeds one token at a time.  Ties in argmax resolve to the
    lowest token id.

    Exactness: CPU kernels are not row-independent.  A token's K/V (and hence
    everything after it) depends at the ulp level on the shape of the forward
    pass that computed it: the attention kernel's result for early rows
    changes with the total sequence length, and matmuls with fewer than ~12
    rows, as in decoding, take a different code path.  With ``prefill_chunk``
    set (to a multiple of the block size), the K/V of every complete chunk of
    the prompt is a pure function of the tokens up to the chunk's end (see
    ``GenerationResult.canonical_len``), so blocks cut from those positions
    and reused with the same ``prefill_chunk`` give results bit-identical to
    an uncached run with that ``prefill_chunk``.  This was verified across
    torch thread counts, but assumes the same model, dtype, torch build and
    CPU instruction set.  Without chunking, reuse was measured accurate to
    only ~4e-5 in logits.  Rows of generated tokens (computed one at a time) are never
    canonical, and short chunks cost speed: a 4k-token prompt prefills about
    2x slower in 64-token chunks and 1.3x slower in 256-token chunks than
    in one pass.
    """
    t0 = time.perf_counter()
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if past is None:
        if past_len != 0:
            raise ValueError("past_len must be 0 without past")
        cache = DynamicCache(config=model.config)
    else:
        if past.get_seq_length() != past_len:
            raise ValueError(f"past holds {past.get_seq_length()} tokens but past_len is {past_len}")
        cache = past
    if not 0 <= past_len < len(input_ids):
        raise ValueError(f"past_len ({past_len}) must be in [0, len(input_ids)={len(input_ids)})")
    stop = default_eos_ids(model) if eos_token_ids is None else frozenset(eos_token_ids)

    if prefill_chunk is not None:
        if prefill_chunk <= 0:
            raise ValueError("prefill_chunk must be positive")
        if past_len % prefill_chunk:
            raise ValueError(f"past_len ({past_len}) must be a multiple of prefill_chunk ({prefill_chunk})")

    with torch.inference_mode():
        logits = prefill(model, input_ids, past_len, cache, prefill_chunk)
        first_logits = logits.float().clone()
        token = choose(logits)
        ttft = time.perf_counter() - t0
        generated = [token]
        go_on = on_token is None or on_token(token)
        pos = len(input_ids)
        while go_on and len(generated) < max_new_tokens and token not in stop:
            logits = _forward_step(model, [token], pos, cache)
            token = choose(logits)
            generated.append(token)
            go_on = on_token is None or on_token(token)
            pos += 1

    return GenerationResult(
        token_ids=generated,
        first_logits=first_logits,
        cache=cache,
        ttft_s=ttft,
        total_s=time.perf_counter() - t0,
        prefill_tokens=len(input_ids) - past_len,
        canonical_len=0 if prefill_chunk is None else len(input_ids) // prefill_chunk * prefill_chunk,
    )
