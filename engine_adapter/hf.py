"""CachedLM: a Hugging Face transformers causal LM whose prompt prefixes come from a KVStore.

For each request: match the prompt's prefix in the store, rebuild a ``DynamicCache`` from the hit
blocks, prefill only the missed tokens, decode greedily, then store every new full block of
prompt and output so that the next turn of a chat hits its own earlier answer. Each request
reports DeepSeek- and OpenAI-style usage (``prompt_cache_hit_tokens``,
``prompt_cache_miss_tokens``, ``prompt_tokens_details.cached_tokens``) and its cost.

Exactness: prefill runs in passes that end on multiples of the block size (``prefill_chunk``),
which makes the KV of every complete block a pure function of its prefix; blocks of generated
tokens (computed one row at a time) are recomputed that way before they are stored. So output
with a hit is bit-identical to output without one. ``prefill_chunk=None`` prefills in one pass
(about 2x faster cold on CPU) and reuse is then accurate to ~4e-5 in logits instead.

The cache is best effort: a fault in the store is a logged, counted miss, never a failed request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import xxhash

from kvstore import KVStore, make_namespace
from kvstore.codec import dtype_name

from .generation import GenerationResult, argmax, greedy_generate, prefill
from .kv_blocks import KVLayout, blocks_from_cache, cache_from_blocks

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class Prices:
    """Input prices in currency units per million tokens (defaults: 0.1 a hit, 1 a miss)."""

    hit_per_mtok: float = 0.1
    miss_per_mtok: float = 1.0

    def cost(self, hit: int, miss: int) -> float:
        return (hit * self.hit_per_mtok + miss * self.miss_per_mtok) / 1e6


@dataclasses.dataclass
class Completion:
    """One request's result.

    Attributes:
        text: the generated text (special tokens removed).
        prompt_ids / output_ids: the token ids in and out.
        usage: prompt_tokens, completion_tokens, total_tokens, prompt_cache_hit_tokens,
            prompt_cache_miss_tokens, prompt_tokens_details.cached_tokens, cost.
        ttft_s: seconds from the call to the first token (store lookup included).
        total_s: seconds for the whole request, storing new blocks included.
        first_logits: float32 logits that chose the first output token.
        hit_tiers: how many hit blocks each store tier supplied.
    """

    text: str
    prompt_ids: list[int]
    output_ids: list[int]
    usage: dict[str, Any]
    ttft_s: float
    total_s: float
    first_logits: torch.Tensor
    hit_tiers: dict[str, int]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the model's weights (names, shapes, dtypes and bytes): the model identity."""
    h = xxhash.xxh3_64()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            t = p.detach().contiguous().cpu()
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class CachedLM:
    """A causal LM whose prompt prefixes are cached in ``store``.

    Args:
        model, tokenizer: from ``model_files.load_model`` (batch 1, CPU).
        store: the KVStore, or None to run without a cache (same code path, same numerics).
        model_id: identity for the namespace; defaults to a digest of the weights.
        tenant: tenant salt: tenants never share blocks.
        prices: for the ``cost`` usage field.
        prefill_chunk: see the module docstring; defaults to the store's block size.

    Raises:
        ValueError: the model's KV layout does not match the block layout the store was opened
            with, or ``prefill_chunk`` is not a multiple of the block size.
    """

    def __init__(self, model, tokenizer, store: KVStore | None = None, *, model_id: str | None = None,
                 tenant: str = "", prices: Prices = Prices(), prefill_chunk: int | None | str = "block"):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.layout = KVLayout.of(model)
        self.block_tokens = store.config.block_tokens if store is not None else 64
        self.prefill_chunk = self.block_tokens if prefill_chunk == "block" else prefill_chunk
        if self.prefill_chunk is not None and self.prefill_chunk % self.block_tokens:
            raise ValueError(f"prefill_chunk: expected a multiple of the block size "
                             f"{self.block_tokens} or None, got {self.prefill_chunk}")
        self.prices = prices
        self.namespace = make_namespace(model_id or model_fingerprint(model), self.layout.describe(),
                                        dtype_name(self.layout.dtype), tenant_salt=tenant)
        self.block_shape = self.layout.block_shape(self.block_tokens)
        if store is not None and store.block_shape is not None and (
                store.block_shape != self.block_shape or store.dtype != self.layout.dtype):
            raise ValueError(
                f"model KV layout {self.layout.describe()} needs blocks of shape {self.block_shape} "
                f"and dtype {dtype_name(self.layout.dtype)}, but the store at {store.config.path} "
                f"holds shape {store.block_shape} and dtype {dtype_name(store.dtype)}: use another "
                f"store path or a matching model"
            )
        if store is not None and store.block_shape is None:
            # A fresh store learns the layout now, not at its first put: blocks other machines
            # stored (the remote tier) load from the first request on.
            store.declare_layout(self.block_shape, self.layout.dtype)

    # -- requests ---------------------------------------------------------------------------
    def complete(self, prompt: str, max_new_tokens: int = 64) -> Completion:
        """Continues ``prompt`` (the caller controls the exact prefix).

        Raises:
            ValueError: the prompt is not a non-empty string.
        """
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt: expected a non-empty string, got {prompt!r}")
        ids = self.tokenizer(prompt)["input_ids"]
        return self.generate(list(ids), max_new_tokens)

    def chat(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 64) -> Completion:
        """Answers a conversation; the tokenizer's chat template builds the prompt.

        Raises:
            ValueError: ``messages`` is not a non-empty list of {"role", "content"} dicts.
        """
        self.check_messages(messages)
        ids = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=True)["input_ids"]
        return self.generate(list(ids), max_new_tokens)

    @staticmethod
    def check_messages(messages: Any) -> None:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} "
                             f"dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', "
                                 f"got {type(m).__name__}")
            if m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, "
                                 f"got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content: expected a string, got "
                                 f"{type(m.get('content')).__name__}")

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, *,
                 choose: Callable[[torch.Tensor], int] = argmax,
                 on_token: Callable[[int], bool] | None = None) -> Completion:
        """Completion of ``prompt_ids`` with prefix reuse (see the class docstring).

        ``choose`` picks each token from its logits (greedy by default; a seeded
        ``sampling.Sampler`` gives the same output with or without a hit); ``on_token`` sees
        each token as it is chosen and stops decoding by returning False (see
        ``generation.greedy_generate``).
        """
        if not prompt_ids:
            raise ValueError("prompt_ids: expected at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        t0 = time.perf_counter()
        blocks, tiers = self._lookup(prompt_ids)
        # At least one prompt token must run through the model to produce the first logits.
        usable = min(len(blocks), (len(prompt_ids) - 1) // self.block_tokens)
        if self.prefill_chunk is not None:
            usable -= usable % (self.prefill_chunk // self.block_tokens)
        hit = usable * self.block_tokens
        past = cache_from_blocks(blocks[:usable], self.layout, self.model.config, self.model.device) if usable else None
        t_lookup = time.perf_counter() - t0
        res = greedy_generate(self.model, prompt_ids, past, hit, max_new_tokens,
                              prefill_chunk=self.prefill_chunk, choose=choose, on_token=on_token)
        ttft = t_lookup + res.ttft_s
        self._save(prompt_ids, res, usable)
        n = len(prompt_ids)
        usage = {
            "prompt_tokens": n,
            "completion_tokens": len(res.token_ids),
            "total_tokens": n + len(res.token_ids),
            "prompt_cache_hit_tokens": hit,
            "prompt_cache_miss_tokens": n - hit,
            "prompt_tokens_details": {"cached_tokens": hit},
            "cost": self.prices.cost(hit, n - hit),
        }
        used_tiers: dict[str, int] = {}
        for t in tiers[:usable]:
            used_tiers[t] = used_tiers.get(t, 0) + 1
        return Completion(
            text=self.tokenizer.decode(res.token_ids, skip_special_tokens=True),
            prompt_ids=list(prompt_ids), output_ids=res.token_ids, usage=usage, ttft_s=ttft,
            total_s=time.perf_counter() - t0, first_logits=res.first_logits, hit_tiers=used_tiers,
        )

    # -- store side (best effort) ------------------------------------------------------------
    def fault(self, what: str, e: Exception) -> None:
        """Logs and counts a store fault that was served as a miss (``what``: the stage)."""
        log.warning("kvstore %s failed, served as a miss: %s: %s", what, type(e).__name__, e)
        if self.store is not None:
            self.store.metrics.add("adapter_faults", stage=what)

    def _lookup(self, ids: list[int]) -> tuple[list[torch.Tensor], tuple[str, ...]]:
        if self.store is None:
            return [], ()
        try:
            m = self.store.match(ids, namespace=self.namespace)
            blocks = self.store.get(m) if m.num_blocks else []
            if blocks and (tuple(blocks[0].shape) != self.block_shape or blocks[0].dtype != self.layout.dtype):
                raise ValueError(f"stored blocks have shape {tuple(blocks[0].shape)}, "
                                 f"the model needs {self.block_shape}")
            return blocks, m.tiers
        except Exception as e:  # best effort: a store fault never fails the request
            self.fault("lookup", e)
            return [], ()

    def _save(self, prompt_ids: list[int], res: GenerationResult, start_block: int) -> None:
        if self.store is None:
            return
        try:
            bt = self.block_tokens
            all_ids = prompt_ids + res.token_ids
            if self.prefill_chunk is None:
                # One-pass prefill: only prompt rows exist as prefill output; store those.
                n_full = len(prompt_ids) // bt
            else:
                n_full = len(all_ids) // bt
                canon = res.canonical_len
                if n_full * bt > canon:
                    # Rows past the last complete chunk came from a shorter pass or from
                    # one-token decode steps: recompute them the canonical way first.
                    cache = res.cache
                    cache.crop(canon - cache.get_seq_length())
                    prefill(self.model, all_ids[:n_full * bt], canon, cache, self.prefill_chunk)
            if n_full <= start_block:
                return
            blocks = blocks_from_cache(res.cache, self.layout, start_block * bt,
                                                n_full - start_block, bt)
            # The blocks own their storage and are not used again: hand them over uncopied.
            self.store.put(all_ids[:n_full * bt], blocks, namespace=self.namespace,
                           start_block=start_block, copy=False)
        except Exception as e:  # best effort: the answer is already computed
            self.fault("store", e)
