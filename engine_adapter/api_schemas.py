"""Request bodies of the OpenAI/DeepSeek-compatible server (pydantic) and its error objects.

Validation is strict where a client's mistake would otherwise pass silently: an unknown field,
``n`` other than 1, a value out of range each give HTTP 400 with an OpenAI-style error object
whose ``param`` names the field (``messages.1.content``) and whose message says what was
expected. Anthropic-style ``cache_control`` is accepted on a message or on a text content part.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["CacheControl", "ChatRequest", "CompletionRequest", "ContentPart", "Message", "api_error",
           "param_of", "validation_message", "CACHE_TTLS"]

# Anthropic's cache_control TTLs, in seconds.
CACHE_TTLS = {"5m": 300.0, "1h": 3600.0}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheControl(_Strict):
    """``{"type": "ephemeral", "ttl": "5m" | "1h"}``: pin the prompt up to here for the TTL."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] = "5m"


class ContentPart(_Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


class Message(BaseModel):
    # Extra keys (name, tool_call_id, reasoning_content, ...) go to the chat template as they are.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    cache_control: CacheControl | None = None

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)

    def breakpoints(self) -> list[tuple[int, float]]:
        """(char offset in ``text()`` where a cache_control ends, TTL seconds)."""
        out = []
        if isinstance(self.content, list):
            pos = 0
            for k, p in enumerate(self.content):
                pos += len(p.text) + (1 if k else 0)
                if p.cache_control is not None:
                    out.append((pos, CACHE_TTLS[p.cache_control.ttl]))
        if self.cache_control is not None:
            out.append((len(self.text()), CACHE_TTLS[self.cache_control.ttl]))
        return out


class StreamOptions(_Strict):
    include_usage: bool = False


PositiveInt = Annotated[int, Field(ge=1, le=1 << 20)]


class _Common(_Strict):
    model: str
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extra field: also explain where the prompt parts from the longest stored prefix.
    explain_cache_miss: bool = False

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: Any) -> Any:
        for s in [v] if isinstance(v, str) else v or []:
            if not s:
                raise ValueError("a stop string must not be empty")
        return v

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None


class CompletionRequest(_Common):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0, lt=1 << 32)]],
                                                            Field(min_length=1)]


def api_error(message: str, type_: str = "invalid_request_error", param: str | None = None,
              code: str | None = None) -> dict:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def param_of(loc: tuple) -> str:
    """``("body", "messages", 1, "content")`` -> ``"messages.1.content"`` (pydantic's union
    branch names, such as ``str`` or ``list[...]``, left out)."""
    parts = [str(p) for p in loc if p != "body"]
    parts = [p for p in parts if not (p[:1].islower() and ("[" in p or p in ("str", "int", "float",
                                                                              "constrained-str")))]
    return ".".join(parts)


def validation_message(errors: list[dict]) -> tuple[str, str]:
    """(param, message) for pydantic errors. The deepest field is named: for a value that fits
    no branch of a union (content: a string or a list of parts), the branch that got furthest
    says most."""
    errors = sorted(errors, key=lambda e: -len(param_of(tuple(e["loc"])).split(".")))
    first = param_of(tuple(errors[0]["loc"])) if errors else ""
    reasons = []
    for e in errors[:4]:
        where = param_of(tuple(e["loc"])) or "body"
        reasons.append(f"{where}: {e['msg']}" + (f" (got {e['input']!r:.60})" if "input" in e
                                                   and e.get("type") != "missing" else ""))
    return first, "; ".join(reasons)
