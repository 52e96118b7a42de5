"""Chat messages -> prompt token ids, with the server's own answers fed back as the exact ids it
generated.

Why: a chat that re-sends the model's answer as text gets it re-tokenized by the chat template,
often into other ids than the ones generated (and stored), so the cached prefix breaks right
after the earlier prompt. Here an assistant message whose text is one this server generated
(``answers.AnswerBook``) is rendered as those ids; everything else goes through the template as usual.

How: the template renders the whole conversation as text; each message's content is located in
it in order (``str.find`` from where the previous one ended); the text between own answers is
tokenized as the template would (no special tokens added: the template writes them), and each
own answer is replaced by its ids. With no own answer this is exactly the template's own
tokenization (tests check it). A content the template does not render verbatim is not found and
simply gets no splice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Rendered", "render_chat"]


@dataclasses.dataclass
class Rendered:
    """A rendered chat.

    Attributes:
        ids: the prompt's token ids.
        text: the template's text.
        own_answers: how many assistant messages were fed back as their generated ids.
        marks: for each requested (message index, char offset in its content), the number of
            prompt tokens up to that point (a token that straddles it is not counted).
        spans: (message index, start, end) of each located content in ``text``.
        offsets: each token's (start, end) in ``text`` (an own answer's tokens: by their
            decoded lengths).
    """

    ids: list[int]
    text: str
    own_answers: int
    marks: dict[tuple[int, int], int]
    spans: list[tuple[int, int, int]]
    offsets: list[tuple[int, int]]


def render_chat(tokenizer: Any, messages: Sequence[dict], own: Callable[[str], list[int] | None],
                marks: Sequence[tuple[int, int]] = ()) -> Rendered:
    """Renders ``messages`` (each ``{"role", "content": str}``) with a generation prompt.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        own: text -> the ids this server generated it as (``AnswerBook.lookup`` for a tenant),
            asked for assistant messages only.
        marks: positions (message index, char offset in that message's content) whose token
            position is wanted (``cache_control`` breakpoints).

    Raises:
        ValueError: the chat template failed on these messages (its message says why).
    """
    try:
        text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # jinja errors, templates that reject a message: the client's input
        raise ValueError(f"messages: the chat template failed: {type(e).__name__}: {e}") from None
    # Locate each content in order; own answers become fixed-id pieces.
    spans, pieces, cursor, last = [], [], 0, 0  # pieces: (start, end, ids or None)
    for i, m in enumerate(messages):
        content = m["content"]
        pos = text.find(content, cursor) if content else -1
        if pos < 0:
            continue
        spans.append((i, pos, pos + len(content)))
        ids = own(content) if m["role"] == "assistant" else None
        if ids:
            pieces.append((last, pos, None))
            pieces.append((pos, pos + len(content), ids))
            last = pos + len(content)
        cursor = pos + len(content)
    pieces.append((last, len(text), None))
    char_marks = {}
    for i, off in marks:
        span = next((s for s in spans if s[0] == i), None)
        if span is not None:
            char_marks[(i, off)] = min(span[1] + off, span[2])
    out: list[int] = []
    offsets: list[tuple[int, int]] = []
    found = dict.fromkeys(marks, 0)
    for start, end, fixed in pieces:
        if fixed is not None:
            for mk, c in char_marks.items():
                if c >= end:
                    found[mk] = len(out) + len(fixed)
            out.extend(fixed)
            pos = start
            for t in fixed:
                step = len(tokenizer.decode([t], skip_special_tokens=True))
                offsets.append((min(pos, end), min(pos + step, end)))
                pos += step
            continue
        if start == end:
            continue
        enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
        for mk, c in char_marks.items():
            if c >= start:
                found[mk] = len(out) + sum(1 for (_, e) in enc["offset_mapping"] if start + e <= c)
        out.extend(enc["input_ids"])
        offsets.extend((start + a, start + b) for a, b in enc["offset_mapping"])
    return Rendered(out, text, sum(1 for p in pieces if p[2] is not None), found, spans, offsets)
