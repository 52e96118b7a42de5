"""The transformers adapter's model mechanics under their old single name, for code written
against it: the pieces now live in one module a job.

- model_files: find, convert and load a model and its tokenizer;
- kv_blocks: the KV layout, cache -> blocks and blocks -> cache;
- generation: chunked prefill and greedy decoding that resumes from a cache.

New code imports those modules; nothing in this repository imports this one.
"""

from .generation import GenerationResult, greedy_generate, prefill
from .kv_blocks import KVLayout, blocks_from_cache, cache_from_blocks
from .model_files import DEFAULT_ATTN_IMPLEMENTATION, default_convert_dir, default_model_path, load_default_model, load_model

__all__ = [
    "DEFAULT_ATTN_IMPLEMENTATION", "GenerationResult", "KVLayout", "blocks_from_cache", "cache_from_blocks",
    "default_convert_dir", "default_model_path", "greedy_generate", "load_default_model", "load_model", "prefill",
]
