"""Why prompt B does (not) hit the blocks prompt A left: the pure comparison of two prompts'
block chains, shared by ``kvstore explain`` (tools/explain.py loads prompt files and renders the
report) and the engine adapter's server (its ``explain_cache_miss`` field).

``compare`` gives both block chains, the first block that differs, the tokens around the first
differing token, how many tokens B would hit after A, and for chat prompts the message and field
where they part, including a field the template renders in one prompt and drops in the other
(the classic case: ``reasoning_content`` of an earlier assistant turn). It takes prompts already
tokenized (``Prompt``) and touches no tokenizer, file or store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .keys import block_keys

__all__ = ["Prompt", "Span", "compare", "locate_fields"]

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


def locate_fields(text: str, messages: list[dict]) -> list[Span]:
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


def _line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    return f"line {line}, column {pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"
