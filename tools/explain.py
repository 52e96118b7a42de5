"""``kvstore explain A B``: why prompt B does (not) hit the blocks prompt A left in the cache.

A prompt file is one of (detected from its content, or forced with ``fmt``):
- text: the file's bytes as UTF-8, tokenized as the engine tokenizes a completion prompt;
- token ids: a JSON list of integers, or ``{"input_ids" | "prompt_token_ids": [...]}``;
- chat: a JSON list of ``{"role", "content", ...}`` messages, or ``{"messages": [...]}`` (an
  OpenAI-style request body; content may be a list of text parts, joined as vLLM joins them), rendered with the tokenizer's chat template. A generation prompt
  is added unless the last message is the assistant's (then it is the stored conversation).

The comparison itself (``compare``) is kvstore.explain's, shared with the engine adapter's
server; this module loads prompt files, finds their tokenizer, and renders the report as text.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvstore import KVStoreError
from kvstore.explain import Prompt, Span, compare, locate_fields

__all__ = ["FORMATS", "Prompt", "Span", "compare", "load_prompt", "load_tokenizer", "namespace_model", "render",
           "tokenizer_source"]

FORMATS = ("auto", "text", "ids", "chat")


# -- loading ----------------------------------------------------------------------------------
# The roles of OpenAI-style chat messages (what vLLM's chat endpoint accepts).
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _detect(path: str, raw: str, fmt: str) -> tuple[str, Any]:
    """``(kind, payload)``: payload is the text, the id list or the message list."""
    if fmt == "text":
        return "text", _text(path, raw)
    try:
        data = json.loads(raw)
    except ValueError as e:
        # A .json file, or one that opens like JSON, was meant as JSON: reading it as text would
        # explain the wrong prompt.
        if fmt != "auto" or path.endswith(".json") or raw.lstrip()[:1] in ("[", "{"):
            where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise KVStoreError(f"{path}: not valid JSON ({where}); to read it as text, pass --format text") from None
        return "text", _text(path, raw)
    if isinstance(data, dict):
        for key in ("input_ids", "prompt_token_ids"):
            if key in data:
                data = data[key]
                break
        else:
            if "messages" in data:
                data = data["messages"]
            elif isinstance(data.get("prompt"), str) and fmt in ("auto", "text"):
                return "text", _text(path, data["prompt"])
    if data == [] or data == "":
        raise KVStoreError(f"{path}: an empty prompt")
    if isinstance(data, list) and data and all(isinstance(t, int) and not isinstance(t, bool) for t in data):
        kind = "ids"
    elif isinstance(data, list) and data and all(isinstance(m, dict) and "role" in m for m in data):
        kind = "chat"
    elif fmt == "auto" and isinstance(data, str):
        return "text", _text(path, data)
    else:
        raise KVStoreError(f"{path}: JSON, but neither a list of token ids, a list of chat messages "
                           f"with 'role', nor an object with input_ids, messages or prompt")
    if fmt not in ("auto", kind):
        raise KVStoreError(f"{path}: holds {kind}, not {fmt}")
    if kind == "chat":
        return kind, [_message(path, i, m) for i, m in enumerate(data)]
    if any(not 0 <= t < 1 << 32 for t in data):
        raise KVStoreError(f"{path}: token ids must lie in [0, 2**32)")
    return kind, data


def _text(path: str, text: str) -> str:
    if not text.strip():
        raise KVStoreError(f"{path}: an empty prompt (only white space)")
    return text


def _message(path: str, i: int, m: dict) -> dict:
    """Message ``i`` checked, with OpenAI content parts (``[{"type": "text", "text": ...}]``)
    joined into one string as vLLM's chat endpoint joins them for a text-only template."""
    role = m["role"]
    if role not in ROLES:
        raise KVStoreError(f"{path}: messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}")
    content = m.get("content", "")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                got = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise KVStoreError(f"{path}: messages[{i}].content[{j}]: expected a text part "
                                   f'{{"type": "text", "text": ...}}, got {got!r}')
            texts.append(part["text"])
        return {**m, "content": "\n".join(texts)}
    if not isinstance(content, (str, type(None))):
        raise KVStoreError(f"{path}: messages[{i}].content: expected a string or a list of text parts")
    return m


def check_vocabulary(p: Prompt, tokenizer: Any) -> None:
    """Raises KVStoreError if a token id of ``p`` lies beyond ``tokenizer``'s vocabulary."""
    size = len(tokenizer)
    for pos, t in enumerate(p.ids):
        if t >= size:
            raise KVStoreError(f"{p.source}: token id {t} at position {pos} is beyond the tokenizer's "
                               f"vocabulary (ids 0 to {size - 1})")


def load_prompt(path: str, tokenizer: Callable[[], Any], fmt: str = "auto",
                chat_template: str | None = None) -> Prompt:
    """Reads and tokenizes one prompt file.

    Args:
        path: the file.
        tokenizer: returns the tokenizer when first needed (loading one takes seconds).
        fmt: one of FORMATS.
        chat_template: a Jinja template that replaces the tokenizer's own.

    Raises:
        KVStoreError: unreadable file, unrecognised content, or a tokenizer that fails.
    """
    try:
        raw = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise KVStoreError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise KVStoreError(f"{path}: not UTF-8 text") from None
    kind, data = _detect(path, raw, fmt)
    if kind == "ids":
        return Prompt(path, kind, list(data))
    tok = tokenizer()
    if kind == "text":
        enc = tok(data, return_offsets_mapping=True)
        return Prompt(path, kind, list(enc["input_ids"]), data, [tuple(o) for o in enc["offset_mapping"]])
    gen = data[-1].get("role") != "assistant"
    try:
        text = tok.apply_chat_template(data, tokenize=False, add_generation_prompt=gen,
                                       chat_template=chat_template)
        ids = tok.apply_chat_template(data, tokenize=True, add_generation_prompt=gen,
                                      chat_template=chat_template)
    except Exception as e:  # jinja errors, templates that reject a message: all the user's input
        raise KVStoreError(f"{path}: the chat template failed: {type(e).__name__}: {e}") from None
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    # Offsets are only trusted when re-tokenizing the rendered text gives the template's ids.
    offsets = [tuple(o) for o in enc["offset_mapping"]] if list(enc["input_ids"]) == ids else None
    return Prompt(path, kind, ids, text, offsets, data, locate_fields(text, data))


def load_tokenizer(source: str | os.PathLike) -> Any:
    """The tokenizer in directory ``source`` (or of the model named ``source``, from the local
    Hugging Face cache only: never the network).

    Raises:
        KVStoreError: no tokenizer could be loaded from there.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in files):
        raise KVStoreError(f"cannot load a tokenizer from {source}: the directory holds none of "
                           f"{', '.join(files)}")
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as e:
        # The libraries' messages run to many lines of advice; the first one says what failed.
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise KVStoreError(f"cannot load a tokenizer from {source}: {type(e).__name__}: {first}") from None


# A weights digest (xxh3-64 hex, engine_adapter.hf.model_fingerprint): an identity, not a name.
_DIGEST = re.compile(r"[0-9a-f]{16}")
# vLLM's identity (engine_adapter.vllm_connector): NAME@REVISION#DIGEST-OF-THE-HF-CONFIG.
_VLLM_MODEL = re.compile(r"(?P<name>.+)@[^@#]*#[0-9a-f]{16}")


def namespace_model(namespace: str) -> str | None:
    """The model identity recorded in a namespace made by ``kvstore.keys.make_namespace``
    (its leading ``model=`` field), or None for a namespace of another form."""
    first = namespace.split("|", 1)[0]
    if not first.startswith("model="):
        return None
    return first.removeprefix("model=") or None


def tokenizer_source(model: str) -> str | None:
    """Where the tokenizer of a recorded model identity loads from: the model name or directory
    the engine was given (vLLM records ``NAME@REVISION#CONFIG-DIGEST``; a ``model_id`` passed
    to an adapter is taken as it is), or None when the identity is only a digest of the weights
    (the transformers adapter's default), which names no tokenizer."""
    if _DIGEST.fullmatch(model):
        return None
    m = _VLLM_MODEL.fullmatch(model)
    return m["name"] if m else model


# -- text -------------------------------------------------------------------------------------
def _show(s: str) -> str:
    """A string with its escapes visible (newlines, tabs) but without repr's quotes."""
    return repr(s)[1:-1]


def render(r: dict, *, max_rows: int = 12) -> str:
    """The report as text for a terminal."""
    bt = r["block_tokens"]
    lines = []
    for name in ("a", "b"):
        d = r[name]
        what = f"{d['messages']} messages, chat" if d["kind"] == "chat" else d["kind"]
        lines.append(f"{name.upper()}  {d['source']}  ({what}): {d['tokens']} tokens = {d['full_blocks']} "
                     f"full block(s) of {bt} + {d['partial_block_tokens']} never cached")
    lines.append(f"namespace  {r['namespace']}")
    if r.get("tokenizer"):
        lines.append(f"tokenizer  {r['tokenizer']['source']}  ({r['tokenizer']['from']})")
    lines.append("")
    lines.append(f"why        {r['summary']}")
    h = r["b_after_a"]
    lines.append(f"B after A  {h['hit_tokens']} of {h['prompt_tokens']} prompt tokens hit "
                 f"({h['hit_blocks']} block(s)), {h['miss_tokens']} miss")
    if "store" in r:
        s = r["store"]
        lines.append(f"store now  A: {s['a_held']}/{r['a']['full_blocks']} blocks held; "
                     f"B: {s['b_held']}/{r['b']['full_blocks']} held, would hit {s['b_hits_now_tokens']} tokens")
        if s.get("other_namespaces"):
            lines.append(f"           (in this namespace; {len(s['other_namespaces'])} other namespace(s) hold "
                         f"some of these blocks too: pick one with --namespace)")
    chat = r["chat"]
    if chat is not None:
        for side in ("a", "b"):
            w = chat[f"where_{side}"]
            if w is not None:
                field = f".{w['field']}" if w["field"] else ""
                at = f" at char {w['offset']}" if w["offset"] is not None else ""
                loc = (f"messages[{w['message']}]{field} ({w['role']}){at}" if w["in"] == "field"
                       else f"{w['in']} messages[{w['message']}]{field} ({w['role']})")
                lines.append(f"{side.upper()} goes on  in {loc}")
        for d in chat["template_dropped"]:
            lines.append(f"template   messages[{d['message']}].{d['field']} ({d['role']}) is rendered "
                         f"only in {d['rendered_in']}")
    lines.append("")
    lines.append("block chains (key prefixes)")
    rows = r["blocks"]
    shown = _collapse(rows, max_rows)
    has_store = "store" in r
    lines.append(f"  {'block':>5}  {'tokens':>13}  {'A':<12}  {'B':<12}  state")
    for row in shown:
        if row is None:
            lines.append("    ...")
            continue
        i = row["block"]
        held = ""
        if has_store:
            marks = [f"{s}{'+' if row[f'{s.lower()}_held'] else '-'}" for s in "AB"
                     if row[f"{s.lower()}_held"] is not None]
            held = "  held " + " ".join(marks)
        lines.append(f"  {i:>5}  {f'{i * bt}-{(i + 1) * bt - 1}':>13}  {(row['a'] or '-')[:12]:<12}  "
                     f"{(row['b'] or '-')[:12]:<12}  {row['state']}{held}")
    if not rows:
        lines.append("  (no full block in either prompt: nothing can hit)")
    div = r["divergence"]
    if div is not None:
        lines.append("")
        lines.append(f"first different token: {div['token']} (block {div['block']}, "
                     f"token {div['offset_in_block']} of it)")
        lines.append(f"  {'pos':>7}  {'A':<30}  {'B':<30}")
        for t in div["tokens"]:
            mark = ">" if t["pos"] == div["token"] else " "
            cells = []
            for side in ("a", "b"):
                tid, txt = t[side], t.get(f"{side}_text")
                cells.append("-" if tid is None else f"{tid} {txt!r}" if txt is not None else str(tid))
            lines.append(f"{mark} {t['pos']:>7}  {cells[0]:<30.30}  {cells[1]:<30.30}")
        if "text_a" in div:
            lines.append("text at the split (|>>| marks it)")
            for side in ("a", "b"):
                k = div["context_chars"][0 if side == "a" else 1]
                txt = div[f"text_{side}"]
                lines.append(f"  {side.upper()} ({div[f'line_col_{side}']}): {_show(txt[:k])}|>>|{_show(txt[k:])}")
    return "\n".join(lines)


def _collapse(rows: list[dict], max_rows: int) -> list[dict | None]:
    """Keeps the first and last two blocks, those around the split; None marks a gap."""
    if len(rows) <= max_rows:
        return rows
    split = next((i for i, r in enumerate(rows) if r["state"] != "same"), len(rows))
    keep = {0, 1, len(rows) - 2, len(rows) - 1} | set(range(split - 2, split + 3))
    out: list[dict | None] = []
    for i, r in enumerate(rows):
        if i in keep:
            out.append(r)
        elif out and out[-1] is not None:
            out.append(None)
    return out
