"""What the HTTP server does with one request, on the engine thread: build the prompt ids, run
``CachedLM`` with a seeded sampler, stop strings and cancellation, pin ``cache_control``
breakpoints, remember the answer's ids, and report the usage.

The prefix reuse itself is ``CachedLM``'s (hf.py); this module adds what an API request needs
around it. Every method here runs on the engine thread (engine_loop.py), one request at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from kvstore import KVStore
from kvstore.explain import Prompt, Span, compare

from .api_schemas import ChatRequest, CompletionRequest
from .answers import AnswerBook
from .chat_prompt import Rendered, render_chat
from .engine_loop import Job
from .generation import default_eos_ids
from .hf import CachedLM, Prices, model_fingerprint
from .sampling import Sampler

__all__ = ["Outcome", "RequestError", "Service"]

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """The request cannot be served as given: HTTP 400 naming ``param``."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


@dataclasses.dataclass
class Outcome:
    """One served request.

    Attributes:
        text: the answer (cut before a stop string).
        finish_reason: "stop" (end token or stop string), "length" (max_tokens) or
            "cancelled" (the client went away).
        usage: OpenAI/DeepSeek usage fields, cost, and ``prompt_cache_pinned_tokens`` when the
            request carried cache_control.
        ttft_s, total_s: seconds from the request's arrival.
        prompt_ids, output_ids: the token ids in and out.
        own_answers: assistant messages fed back as their generated ids.
        explanation: with ``explain_cache_miss``, where the prompt parts from the longest prefix
            an earlier request stored (see ``Service._explain``).
    """

    text: str
    finish_reason: str
    usage: dict[str, Any]
    ttft_s: float
    total_s: float
    prompt_ids: list[int]
    output_ids: list[int]
    own_answers: int = 0
    explanation: dict | None = None


class _Stops:
    """Incremental detokenization with stop strings: what may be shown so far, and where a
    stop string cut the text."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            full, self.stopped = full[:cut], True
        self.text = full

    def shown(self, final: bool) -> str:
        """The text safe to show: a trailing partial character, or what could still become a
        stop string, is held back until ``final``."""
        if final or self.stopped:
            return self.text
        t = self.text.rstrip("\ufffd")
        return t[:len(t) - self.hold] if self.hold else t


class Service:
    """The model, its tokenizer and the store, served to API requests.

    Args:
        model, tokenizer: from ``model_files.load_model``.
        store: the open store.
        model_name: the id clients name in ``model``.
        prices: for the usage's ``cost``.
        default_max_tokens: when a request names none.
        answers: the server's own answers (a fresh ``AnswerBook`` by default).
    """

    RECENT = 32  # stored sequences kept per tenant to explain a miss against

    def __init__(self, model: Any, tokenizer: Any, store: KVStore, model_name: str, *,
                 prices: Prices = Prices(), default_max_tokens: int = 256,
                 answers: AnswerBook | None = None):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.model_name, self.prices, self.default_max_tokens = model_name, prices, default_max_tokens
        self.answers = answers if answers is not None else AnswerBook()
        self.model_id = model_fingerprint(model)
        self.eos = default_eos_ids(model)
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
        self._lms: dict[str, CachedLM] = {}
        # Each tenant's last RECENT stored sequences (prompt + output), for explain_cache_miss.
        self._recent: dict[str, collections.deque[list[int]]] = {}

    def lm(self, tenant: str) -> CachedLM:
        """The adapter for ``tenant`` (its own namespace: tenants never share blocks)."""
        lm = self._lms.get(tenant)
        if lm is None:
            lm = self._lms[tenant] = CachedLM(self.model, self.tokenizer, self.store, model_id=self.model_id,
                                              tenant=tenant, prices=self.prices)
        return lm

    # -- prompts ----------------------------------------------------------------------------
    def chat_prompt(self, req: ChatRequest, tenant: str) -> tuple[Rendered, list[dict], list[tuple[int, float]]]:
        """(the rendered prompt, the messages as the template saw them, [(token position, ttl)]
        of the cache_control breakpoints)."""
        messages, marks, ttls = [], [], []
        for i, m in enumerate(req.messages):
            d = dict(m.model_extra or {})
            d.update(role=m.role, content=m.text())
            messages.append(d)
            for off, ttl in m.breakpoints():
                marks.append((i, off))
                ttls.append(ttl)
        try:
            r = render_chat(self.tokenizer, messages, lambda text: self.answers.lookup(tenant, text), marks)
        except ValueError as e:
            raise RequestError("messages", str(e).removeprefix("messages: ")) from None
        return r, messages, [(r.marks[mk], ttl) for mk, ttl in zip(marks, ttls)]

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, str):
            return list(self.tokenizer(req.prompt)["input_ids"])
        vocab = len(self.tokenizer)
        bad = next((t for t in req.prompt if t >= vocab), None)
        if bad is not None:
            raise RequestError("prompt", f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        return list(req.prompt)

    # -- running ----------------------------------------------------------------------------
    def run(self, job: Job, req: ChatRequest | CompletionRequest, tenant: str, arrived: float,
            emit: Callable[[str], None] | None = None, on_start: Callable[[], None] | None = None) -> Outcome:
        """Serves ``req`` for ``tenant``.

        Args:
            job: its engine job (cancellation).
            arrived: ``time.perf_counter()`` at the request's arrival.
            emit: called with each new piece of text as it becomes safe to show (streaming).
            on_start: called once the prompt is built and accepted, before the model runs.

        Raises:
            RequestError: bad input found only now (the template failed, a prompt too long for
                the model, a token id outside the vocabulary).
        """
        chat = isinstance(req, ChatRequest)
        own, breakpoints, rendered, messages = 0, [], None, None
        if chat:
            rendered, messages, breakpoints = self.chat_prompt(req, tenant)
            ids, own = rendered.ids, rendered.own_answers
        else:
            ids = self.completion_prompt(req)
        max_new = (getattr(req, "max_completion_tokens", None) or req.max_tokens or self.default_max_tokens)
        if len(ids) + max_new > self.context:
            param = "max_tokens" if len(ids) < self.context else ("messages" if chat else "prompt")
            raise RequestError(param, f"the prompt has {len(ids)} tokens; with max_tokens {max_new} that "
                                      f"exceeds the model's context of {self.context} tokens")
        if on_start is not None:
            on_start()
        lm = self.lm(tenant)
        why = None
        if req.explain_cache_miss:
            try:
                why = self._explain(tenant, lm, ids, rendered, messages, req)
            except Exception as e:  # an extra: its failure must not fail the request
                log.exception("explain_cache_miss failed")
                why = {"summary": f"no explanation: {type(e).__name__}: {e}", "compared_with_tokens": 0}
        sampler = Sampler(req.temperature, req.top_p, req.seed)
        stops = _Stops(self.tokenizer, req.stops())
        first: list[float] = []
        sent = [0]

        def on_token(token: int) -> bool:
            if not first:
                first.append(time.perf_counter())
            if token not in self.eos:
                stops.add(token)
            if emit is not None:
                shown = stops.shown(final=False)
                if len(shown) > sent[0]:
                    emit(shown[sent[0]:])
                    sent[0] = len(shown)
            return not (stops.stopped or job.cancelled)

        c = lm.generate(ids, max_new, choose=sampler, on_token=on_token)
        self._recent.setdefault(tenant, collections.deque(maxlen=self.RECENT)).append(ids + c.output_ids)
        text = stops.shown(final=True)
        if emit is not None and len(text) > sent[0]:
            emit(text[sent[0]:])
        if job.cancelled:
            reason = "cancelled"
        elif stops.stopped or (c.output_ids and c.output_ids[-1] in self.eos):
            reason = "stop"
        else:
            reason = "length"
        usage = dict(c.usage)
        if breakpoints:
            usage["prompt_cache_pinned_tokens"] = self._pin(lm, ids, breakpoints)
        if chat and reason != "cancelled":
            self.answers.remember(tenant, text, self._answer_ids(stops, text))
        now = time.perf_counter()
        return Outcome(text, reason, usage, (first[0] if first else now) - arrived, now - arrived, ids,
                       c.output_ids, own, why)

    def _explain(self, tenant: str, lm: CachedLM, ids: list[int], rendered: Rendered | None,
                 messages: list[dict] | None, req: ChatRequest | CompletionRequest) -> dict:
        """Where this prompt parts from the longest prefix an earlier request of the tenant left
        (its prompt and output, as stored): kvstore.explain's comparison, in short."""
        earlier = max(self._recent.get(tenant, ()), key=lambda seq: _common(seq, ids), default=None)
        if earlier is None:
            return {"summary": "no earlier request of this tenant since the server started: nothing to "
                               "compare with", "compared_with_tokens": 0}
        if rendered is not None:
            b = Prompt("this request", "chat", ids, rendered.text, rendered.offsets, messages,
                       [Span(i, messages[i]["role"], "content", s, e) for i, s, e in rendered.spans])
        elif isinstance(req.prompt, str):
            enc = self.tokenizer(req.prompt, return_offsets_mapping=True)
            b = Prompt("this request", "text", ids, req.prompt, [tuple(o) for o in enc["offset_mapping"]])
        else:
            b = Prompt("this request", "ids", ids)
        a = Prompt("the earlier request (prompt and output)", "ids", list(earlier))
        r = compare(a, b, lm.block_tokens, lm.namespace, context=2,
                    decode=lambda t: self.tokenizer.decode([t]))
        where = (r["chat"] or {}).get("where_b")
        return {"summary": r["summary"], "compared_with_tokens": len(earlier),
                "common_prefix_tokens": r["common_prefix_tokens"],
                "first_different_token": r["first_different_token"],
                "first_different_block": r["first_different_block"],
                "stored_prefix_hit_tokens": r["b_after_a"]["hit_tokens"], "where": where}


    def _answer_ids(self, stops: _Stops, text: str) -> list[int]:
        """The generated ids that decode to exactly ``text`` (the end token is the template's to
        write; a stop string cut the ids at the token before it), or [] when none do."""
        ids = stops.ids
        for k in range(len(ids), -1, -1):
            decoded = self.tokenizer.decode(ids[:k], skip_special_tokens=True)
            if decoded == text:
                return ids[:k]
            if len(decoded) < len(text):
                return []
        return []

    def _pin(self, lm: CachedLM, ids: list[int], breakpoints: list[tuple[int, float]]) -> int:
        """Pins the stored blocks up to each breakpoint; returns the tokens pinned (best effort:
        a store fault pins nothing and is counted)."""
        pinned = 0
        try:
            for pos, ttl in breakpoints:
                n = self.store.pin(ids[:pos], ttl, namespace=lm.namespace)
                pinned = max(pinned, n * lm.block_tokens)
                self.store.metrics.add("server_pinned_blocks", n)
        except Exception as e:  # best effort, like every store call on the request path
            lm.fault("store", e)
        return pinned


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
