"""``kvstore explain A B``: why prompt B does (not) hit the blocks prompt A left in the cache.

A prompt file is one of (detected from its content, or forced with ``fmt``):
- text: the file's bytes as UTF-8, tokenized as the engine tokenizes a completion prompt;
- token ids: a JSON list of integers, or ``{"input_ids" | "prompt_token_ids": [...]}``;
- chat: a JSON list of ``{"role", "content", ...}`` messages, or ``{"messages": [...]}`` (an
  OpenAI-style request body; content may be a list of text parts, joined as vLLM joins them), rendered with the tokenizer's chat template. A generation prompt
  is added unless the last message is the assistant's (then it is the stored conversation).

The report gives both block chains, the first block that differs, the tokens around the first
differing token, how many tokens B would hit after A, and for chat prompts the message and field
where they part, including a field the template renders in one prompt and drops in the other
(the classic case: ``reasoning_content`` of an earlier assistant turn).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvstore import KVStoreError
from kvstore.keys import block_keys

FORMATS = ("auto", "text", "ids", "chat")
# Fields searched for in a rendered chat, in the order templates usually emit them.
_FIELD_ORDER = ("name", "reasoning_content", "thinking", "content", "tool_call_id")


@dataclasses.dataclass
class Span:
    """Where one string field of one message sits in a rendered chat (``start`` None: absent)."""

    message: int
    role: str
    field: str
    start: int | None
    end: int | None


@dataclasses.dataclass
class Prompt:
    """A prompt as the engine sees it, plus what is needed to explain a difference."""

    source: str
    kind: str  # "text", "ids" or "chat"
    ids: list[int]
    text: str | None = None  # the text tokenized (rendered template for chat)
    offsets: list[tuple[int, int]] | None = None  # char span of each token in ``text``
    messages: list[dict] | None = None
    spans: list[Span] | None = None


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


def _locate_fields(text: str, messages: list[dict]) -> list[Span]:
    """Finds each message's string fields in ``text``, in message order.

    Each message is searched from where the previous one's fields ended, so a short value also
    found earlier in the template text is not mistaken for it.
    """
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        role = str(m.get("role", "?"))
        fields = sorted((k for k, v in m.items() if k != "role" and isinstance(v, str) and v),
                        key=lambda k: (_FIELD_ORDER.index(k) if k in _FIELD_ORDER else len(_FIELD_ORDER), k))
        end = cursor
        for f in fields:
            pos = text.find(m[f], cursor)
            if pos < 0:
                spans.append(Span(i, role, f, None, None))
                continue
            spans.append(Span(i, role, f, pos, pos + len(m[f])))
            end = max(end, pos + len(m[f]))
        cursor = end
    return spans


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
    return Prompt(path, kind, ids, text, offsets, data, _locate_fields(text, data))


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


# -- comparing --------------------------------------------------------------------------------
def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return None if len(a) == len(b) else n


def _where(p: Prompt, pos: int | None) -> dict | None:
    """The message/field at char ``pos`` of a rendered chat."""
    if p.spans is None or pos is None:
        return None
    found = [s for s in p.spans if s.start is not None]
    for s in found:
        if s.start <= pos < s.end:
            return {"message": s.message, "role": s.role, "field": s.field, "offset": pos - s.start,
                    "in": "field"}
    after = [s for s in found if s.start > pos]
    if after:  # template text (role header, separators, <think> tags) before the next field
        s = min(after, key=lambda s: s.start)
        return {"message": s.message, "role": s.role, "field": s.field, "offset": None,
                "in": "template text before"}
    return {"message": len(p.messages) - 1, "role": p.messages[-1].get("role"), "field": None,
            "offset": None, "in": "template text after the last message"}


def _char_at(p: Prompt, token: int) -> int | None:
    if p.offsets is None or token >= len(p.offsets):
        return None if p.text is None or p.offsets is None else len(p.text)
    return p.offsets[token][0]


def _rendered_fields(p: Prompt, i: int) -> set[str]:
    return {s.field for s in p.spans if s.message == i and s.start is not None}


def _chat_diagnosis(a: Prompt, b: Prompt, token: int | None) -> dict:
    """Where the prompts part in their messages (either or both may be chats)."""
    def where(p: Prompt) -> dict | None:  # a prompt that ended at the split goes on nowhere
        if p.spans is None or token is None or token >= len(p.ids):
            return None
        return _where(p, _char_at(p, token))

    out: dict[str, Any] = {"where_a": where(a), "where_b": where(b), "first_different_message": None,
                           "changed_fields": [], "template_dropped": []}
    if a.kind != "chat" or b.kind != "chat":
        return out
    ma, mb = a.messages, b.messages
    first_msg = next((i for i in range(min(len(ma), len(mb))) if ma[i] != mb[i]), None)
    if first_msg is None and len(ma) != len(mb):
        first_msg = min(len(ma), len(mb))
    out["first_different_message"] = first_msg
    if first_msg is not None and first_msg < min(len(ma), len(mb)):
        x, y = ma[first_msg], mb[first_msg]
        out["changed_fields"] = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
    # Identical messages the template renders differently: a field shown in one, dropped in the other.
    for i in range(min(len(ma), len(mb))):
        if ma[i] != mb[i]:
            continue
        fa, fb = _rendered_fields(a, i), _rendered_fields(b, i)
        for f in sorted(fa ^ fb):
            out["template_dropped"].append({"message": i, "role": ma[i].get("role"), "field": f,
                                            "rendered_in": "A" if f in fa else "B"})
    return out


def _same_text_at_split(a: Prompt, b: Prompt, token: int) -> bool:
    """Whether the first different tokens of A and B cover the same text (tokenized differently)."""
    if a.offsets is None or b.offsets is None or token >= min(len(a.offsets), len(b.offsets)):
        return False
    (sa, ea), (sb, eb) = a.offsets[token], b.offsets[token]
    k = max(ea - sa, eb - sb)  # the longer token's text must be in both
    return k > 0 and a.text[sa:sa + k] == b.text[sb:sb + k]


def _summary(a: Prompt, b: Prompt, token: int | None, chat: dict | None, bt: int) -> str:
    if token is None:
        return "A and B are the same tokens"
    if token in (len(a.ids), len(b.ids)):
        short, long = ("A", "B") if token == len(a.ids) else ("B", "A")
        tail = token % bt
        return (f"{long} starts with all of {short}" + (
            f"; the last {tail} token(s) of {short} fill no whole block, so they are never cached"
            if tail else ""))
    if chat is not None and a.kind == b.kind == "chat":
        w = chat["where_a"] or {}
        i = w.get("message")
        j = chat["first_different_message"]
        drop = next((d for d in chat["template_dropped"] if d["message"] == i), None)
        if drop is None and chat["template_dropped"] and (j is None or i is None or i < j):
            drop = chat["template_dropped"][0]
        if drop is not None:
            other = "B" if drop["rendered_in"] == "A" else "A"
            return (f"messages[{drop['message']}] ({drop['role']}) is the same in A and B, but the chat "
                    f"template renders its {drop['field']} in {drop['rendered_in']} and drops it in "
                    f"{other}: every token after it misses")
        if j is not None and i is not None and i < j:
            return (f"messages[0..{j - 1}] are the same, but the chat template renders messages[{i}] "
                    f"differently (it depends on later messages or on the generation prompt)")
        if j is not None and j < min(len(a.messages), len(b.messages)):
            fields = ", ".join(chat["changed_fields"]) or "?"
            return f"messages[{j}] ({a.messages[j].get('role')}) differs in {fields}"
        if j is not None:
            return f"the chats part after messages[{j - 1}] (one has more messages)"
    elif chat is not None:
        # One chat against stored token ids: typically a turn's prompt + the output the engine
        # generated, against the next request, whose history carries the reply as the client kept it.
        side, w = ("B", chat["where_b"]) if b.kind == "chat" else ("A", chat["where_a"])
        if w is not None and w["in"] == "field" and w["role"] == "assistant":
            other = "A" if side == "B" else "B"
            return (f"{side}'s messages[{w['message']}].{w['field']} (assistant) is not what {other} holds "
                    f"there (e.g. the reply the engine generated and stored differs from the one the "
                    f"client sent back): every token after it misses")
    if _same_text_at_split(a, b, token):
        return "same text, tokenized differently (e.g. stored output ids that re-tokenizing does not reproduce)"
    if a.text is not None and b.text is not None:
        ca, cb = _char_at(a, token), _char_at(b, token)
        if ca is not None and cb is not None and a.text[ca:].split() == b.text[cb:].split():
            return "the prompts differ only in whitespace from here on"
    return f"the prompts differ from token {token} (block {token // bt})"


def _with_text(p: Prompt, decode: Callable[[int], str] | None) -> Prompt:
    """A token-id prompt with its decoded text and offsets (token by token), when a tokenizer is at hand."""
    if p.text is not None or decode is None:
        return p
    pieces = [decode(t) for t in p.ids]
    offsets, pos = [], 0
    for piece in pieces:
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    return dataclasses.replace(p, text="".join(pieces), offsets=offsets)


def compare(a: Prompt, b: Prompt, block_tokens: int, namespace: str, *, context: int = 8,
            decode: Callable[[int], str] | None = None,
            held: Callable[[list[bytes]], list[bool]] | None = None) -> dict:
    """The explanation of B against A, as plain JSON-able values.

    Args:
        block_tokens: tokens per block.
        namespace: namespace of the block keys shown (the divergence does not depend on it).
        context: tokens shown on each side of the first difference.
        decode: token id -> text, when a tokenizer is at hand.
        held: block keys -> whether a store holds each (with a store).
    """
    bt = block_tokens
    a, b = _with_text(a, decode), _with_text(b, decode)
    ka, kb = block_keys(namespace, a.ids, bt), block_keys(namespace, b.ids, bt)
    token = _first_difference(a.ids, b.ids)
    common = min(len(a.ids), len(b.ids)) if token is None else token
    # Chained keys are equal exactly up to the first block holding a different token.
    hit_blocks = next((i for i, (x, y) in enumerate(zip(ka, kb)) if x != y), min(len(ka), len(kb)))
    chat = _chat_diagnosis(a, b, token) if "chat" in (a.kind, b.kind) else None
    around = None
    if token is not None:
        lo = max(0, token - context)
        rows = []
        for pos in range(lo, min(max(len(a.ids), len(b.ids)), token + context + 1)):
            row = {"pos": pos, "a": a.ids[pos] if pos < len(a.ids) else None,
                   "b": b.ids[pos] if pos < len(b.ids) else None}
            if decode is not None:
                row["a_text"] = None if row["a"] is None else decode(row["a"])
                row["b_text"] = None if row["b"] is None else decode(row["b"])
            rows.append(row)
        around = {"token": token, "block": token // bt, "offset_in_block": token % bt, "tokens": rows}
        if a.text is not None and b.text is not None:
            ca, cb = _char_at(a, token), _char_at(b, token)
            if ca is not None and cb is not None:
                around["text_a"] = a.text[max(0, ca - 80):ca + 80]
                around["text_b"] = b.text[max(0, cb - 80):cb + 80]
                around["char_a"], around["char_b"] = ca, cb
                around["line_col_a"], around["line_col_b"] = _line_col(a.text, ca), _line_col(b.text, cb)
                around["context_chars"] = min(ca, 80), min(cb, 80)
    report: dict[str, Any] = {
        "block_tokens": bt, "namespace": namespace,
        "a": _describe(a, ka, bt), "b": _describe(b, kb, bt),
        "first_different_token": token, "first_different_block": None if token is None else token // bt,
        "common_prefix_tokens": common,
        "b_after_a": {"hit_tokens": hit_blocks * bt, "hit_blocks": hit_blocks,
                      "miss_tokens": len(b.ids) - hit_blocks * bt, "prompt_tokens": len(b.ids)},
        "divergence": around, "chat": chat,
        "summary": _summary(a, b, token, chat, bt),
        "blocks": _chain_rows(ka, kb, hit_blocks),
    }
    if held is not None:
        ha, hb = held(ka), held(kb)
        lead = next((i for i, h in enumerate(hb) if not h), len(hb))
        report["store"] = {"a_held": sum(ha), "b_held": sum(hb), "b_hits_now_blocks": lead,
                           "b_hits_now_tokens": lead * bt}
        for row in report["blocks"]:
            i = row["block"]
            row["a_held"] = ha[i] if i < len(ha) else None
            row["b_held"] = hb[i] if i < len(hb) else None
    return report


def _describe(p: Prompt, keys: list[bytes], bt: int) -> dict:
    d = {"source": p.source, "kind": p.kind, "tokens": len(p.ids), "full_blocks": len(keys),
         "partial_block_tokens": len(p.ids) % bt}
    if p.messages is not None:
        d["messages"] = len(p.messages)
    return d


def _chain_rows(ka: list[bytes], kb: list[bytes], shared: int) -> list[dict]:
    rows = []
    for i in range(max(len(ka), len(kb))):
        a = ka[i].hex() if i < len(ka) else None
        b = kb[i].hex() if i < len(kb) else None
        state = "same" if i < shared else ("first difference" if i == shared and a and b
                                            else "differs (chained)" if a and b else "only in " + ("A" if a else "B"))
        rows.append({"block": i, "a": a, "b": b, "state": state})
    return rows


# -- text -------------------------------------------------------------------------------------
def _show(s: str) -> str:
    """A string with its escapes visible (newlines, tabs) but without repr's quotes."""
    return repr(s)[1:-1]


def _line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    return f"line {line}, column {pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"


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
