"""The KV cache of a transformers model as fixed-size token blocks: its layout (shape and
dtype), cutting a ``DynamicCache`` into blocks, and gluing blocks back into a cache.

Block layout: one block holds the keys and values of ``block_tokens``
consecutive tokens for every layer, as one contiguous tensor of shape
``(num_layers, 2, num_kv_heads, block_tokens, head_dim)`` where index 0 of the
second axis is keys and 1 is values.  Blocks are exact copies of the cache
tensors (same dtype); storing them in any other dtype loses exactness.

Only batch size 1 and models whose every layer is plain full attention are
supported: sliding-window or linear-attention layers do not keep one K/V row
per past token, so they cannot be cut into position-addressed blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer

__all__ = ["KVLayout", "blocks_from_cache", "cache_from_blocks"]


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of one model's KV cache, i.e. of the blocks cut from it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    model_type: str = "unknown"

    @classmethod
    def of(cls, model: PreTrainedModel) -> KVLayout:
        """Read the layout from ``model.config``; dtype is the model's parameter dtype.

        Raises:
            ValueError: some layer is not plain full attention.
        """
        config = model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise ValueError(f"only full-attention models are supported, got layer types {set(layer_types)}")
        if getattr(config, "sliding_window", None) is not None:
            raise ValueError("sliding-window attention caches cannot be cut into blocks")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=model.dtype,
            model_type=config.model_type,
        )

    def block_shape(self, block_tokens: int) -> tuple[int, int, int, int, int]:
        """``(num_layers, 2, num_kv_heads, block_tokens, head_dim)``; axis 1 is (keys, values)."""
        return (self.num_layers, 2, self.num_kv_heads, block_tokens, self.head_dim)

    def block_nbytes(self, block_tokens: int) -> int:
        """Size in bytes of one block."""
        n = 1
        for d in self.block_shape(block_tokens):
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    def describe(self) -> str:
        """Stable text such as ``"llama:L30:H3:D64:float32"`` for cache namespacing.

        It identifies the cache *shape* only: two models with equal layouts
        but different weights describe identically, so a namespace must also
        hash the model's identity (e.g. its weights file).
        """
        dtype_name = str(self.dtype).removeprefix("torch.")
        return f"{self.model_type}:L{self.num_layers}:H{self.num_kv_heads}:D{self.head_dim}:{dtype_name}"


def _check_cache(cache: DynamicCache, layout: KVLayout) -> None:
    if len(cache.layers) != layout.num_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers, layout expects {layout.num_layers}")
    for i, layer in enumerate(cache.layers):
        # Exact type: subclasses (sliding window, quantized, ...) do not hold
        # one plain K/V row per token.
        if type(layer) is not DynamicLayer:
            raise ValueError(f"cache layer {i} is {type(layer).__name__}, only DynamicLayer is supported")


@torch.no_grad()
def blocks_from_cache(
    cache: DynamicCache,
    layout: KVLayout,
    start_token: int,
    num_blocks: int,
    block_tokens: int,
) -> list[torch.Tensor]:
    """Copy tokens ``[start_token, start_token + num_blocks * block_tokens)`` out of ``cache``.

    Returns ``num_blocks`` tensors of ``layout.block_shape(block_tokens)`` and
    ``layout.dtype``.  Each owns its own contiguous storage (no view into the
    cache or into a sibling block), so serializing one never drags the others
    along and later cache growth cannot alter it.

    Raises:
        ValueError: batch size is not 1, the range exceeds the cache, or the
            cache's shape or dtype differs from ``layout`` (blocks are never
            silently converted: a converted block is no longer exact).
    """
    if start_token < 0 or num_blocks < 0 or block_tokens <= 0:
        raise ValueError("start_token and num_blocks must be >= 0 and block_tokens > 0")
    _check_cache(cache, layout)
    end = start_token + num_blocks * block_tokens
    seq_len = cache.get_seq_length()
    if end > seq_len:
        raise ValueError(f"requested tokens up to {end} but cache holds {seq_len}")
    expected = (1, layout.num_kv_heads, seq_len, layout.head_dim)
    for i, layer in enumerate(cache.layers):
        for t in (layer.keys, layer.values):
            if tuple(t.shape) != expected or t.dtype != layout.dtype:
                raise ValueError(
                    f"cache layer {i} holds {tuple(t.shape)} {t.dtype}, layout expects {expected} {layout.dtype}"
                )
    blocks = []
    for b in range(num_blocks):
        s = start_token + b * block_tokens
        e = s + block_tokens
        # torch.stack allocates a fresh contiguous tensor: exactly one copy.
        blocks.append(
            torch.stack([torch.stack((layer.keys[0, :, s:e], layer.values[0, :, s:e])) for layer in cache.layers])
        )
    return blocks


@torch.no_grad()
def cache_from_blocks(
    blocks: Sequence[torch.Tensor],
    layout: KVLayout,
    model_config: PreTrainedConfig,
    device: torch.device | str | None = None,
) -> DynamicCache:
    """Concatenate ``blocks`` (in token order, each of ``block_shape``) into a batch-1 cache.

    The returned cache covers positions ``[0, sum of block lengths)`` and is
    ready to pass as ``past_key_values`` (see :func:`greedy_generate`).  Its
    tensors are on ``device`` (the model's; default: the blocks') and in
    ``layout.dtype`` (the model's dtype); blocks in another
    dtype are converted, which is only exact when no precision is lost.
    Blocks may have different ``block_tokens`` but must agree on every other
    dimension.

    Raises:
        ValueError: no blocks, or a block's shape does not match ``layout``.
    """
    if not blocks:
        raise ValueError("cache_from_blocks needs at least one block")
    for i, blk in enumerate(blocks):
        if blk.dim() != 5 or tuple(blk.shape) != layout.block_shape(blk.shape[3]):
            raise ValueError(
                f"block {i} has shape {tuple(blk.shape)}, expected {layout.block_shape(-1)} (-1: any token count)"
            )
    data = []
    for layer in range(layout.num_layers):
        kv = torch.cat([blk[layer].to(device, non_blocking=True) for blk in blocks], dim=2).to(layout.dtype)  # (2, H, T, D)
        data.append((kv[0].unsqueeze(0), kv[1].unsqueeze(0)))
    # Passing the config makes the cache pick the layer classes the model
    # itself would create, so a mismatch surfaces here rather than mid-forward.
    return DynamicCache(ddp_cache_data=data, config=model_config)
