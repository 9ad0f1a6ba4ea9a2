"""The router's OpenAI-compatible HTTP API: a FastAPI app on uvicorn, in the router's process and event loop.

Routes: POST /v1/chat/completions, /v1/responses, /v1/completions; GET /v1/models, /v1/models/{id}, /health. A body
becomes a
gptoss.v1 request (cluster.router.openai_convert) and runs through the router core's `chat_events` /
`generate_events` (cluster.router.core): the same validation, admission, replica choice, retries, deadlines and
metrics (protocol="http") as a gRPC call. The deltas come back in OpenAI's shapes (cluster.router.openai_render),
whole or as server-sent events.

- Models: a body's `model` is the served model (or empty: the base model too) or the name of a LoRA adapter the
  replicas serve, which then runs the request, as in vLLM; anything else is 404 `model_not_found`. GET /v1/models
  lists the base model and every adapter (`parent`: the base model's id).

- Auth: the router's bearer token (`Authorization: Bearer ...`) on everything but /health.
- Errors: OpenAI's `{"error": {message, type, param, code}}`; a RouterError's code picks the HTTP status (400,
  401, 404, 429 with Retry-After, 503, 504, else 500); body validation errors are 400 as well (not FastAPI's 422), and
  so are bodies that are not JSON, not UTF-8, or hold text that is not valid Unicode (a lone surrogate).
- Each route converts its body before anything else reads it: the conversion is what checks its text.
- A stream sends its headers once the first delta exists, so that failures before it (bad request, queue full, no
  replica) are plain HTTP errors. A client that goes away, mid-stream or while waiting for a whole answer, cancels its
  replica request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gptoss_cluster.cluster.contract import ErrorCode
from gptoss_cluster.cluster.router import openai_convert as convert
from gptoss_cluster.cluster.router.core import RouterCore
from gptoss_cluster.cluster.router.errors import RouterError
from gptoss_cluster.cluster.router.openai_render import (
    ChatCompletion,
    ResponsesStream,
    TextCompletion,
    error_body,
    error_code,
    http_status,
)
from gptoss_cluster.cluster.tracing import trace_context_of
from gptoss_cluster.workers.harmony import get_tokenizer

logger = logging.getLogger("gptoss.router.http")

__all__ = ["HttpServer", "build_app"]

T = TypeVar("T")
_OPEN_PATHS = ("/health",)
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class _ClientGone(Exception):
    """The client disconnected before its answer was ready (its request was cancelled)."""


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# ================================================================================================ the app
def build_app(core: RouterCore, token: str | None) -> FastAPI:
    """The FastAPI app over one router core (`token`: the bearer token every route but /health needs; the core's
    settings give the body size limit)."""
    app = FastAPI(title="gptoss-cluster", docs_url=None, redoc_url=None)
    app.add_middleware(_Guard, token=token, max_body=core.settings.max_message_bytes)
    tokenizer = get_tokenizer()
    started = int(time.time())

    def trace_context(request: Request) -> dict[str, str] | None:
        """The caller's W3C trace context, from the headers (read only when tracing)."""
        return None if core.tracer is None else trace_context_of(request.headers)

    def model_not_found(name: str) -> _ApiError:
        adapters = ", ".join(sorted(core.adapters))
        return _ApiError(404, f"the model {name!r} does not exist; this server serves {core.model_name!r}"
                         + (f" and the LoRA adapters {adapters}" if adapters else ""),
                         "invalid_request_error", "model", "model_not_found")

    def select_model(name: str, request_message: Any) -> str:
        """The model a body names (what its answer reports): the served model, or a LoRA adapter, which
        `request_message` is then set to run with; 404 model_not_found for anything else."""
        served = core.model_name
        if not name or not served or name == served:  # no replica yet: the core answers 503
            return served
        if name not in core.adapters:
            raise model_not_found(name)
        request_message.adapter = name
        return name

    def model_card(name: str, parent: str | None, root: str | None) -> dict[str, Any]:
        context = core.model.context_length if core.model is not None else None
        return {"id": name, "object": "model", "created": started, "owned_by": "gptoss-cluster", "root": root,
                "parent": parent, "max_model_len": context}

    def model_cards() -> list[dict[str, Any]]:
        base = core.model_name
        return [model_card(base, None, base)] + [model_card(a.name, base, a.path) for a in core.adapter_list()]

    @app.post("/v1/chat/completions")
    async def chat_completions(body: convert.ChatCompletionRequest, request: Request) -> Response:
        request_message = convert.chat_request(body)
        model = select_model(body.model, request_message)
        render = ChatCompletion(model, tokenizer, logprobs=bool(body.logprobs),
                                include_usage=body.include_usage)
        events = core.chat_events(request_message, protocol="http", trace_context=trace_context(request))
        return await _answer(request, events, render, body.stream)

    @app.post("/v1/responses")
    async def responses(body: convert.ResponsesRequest, request: Request) -> Response:
        request_message = convert.responses_request(body)
        model = select_model(body.model, request_message)
        text = body.text or {"format": {"type": "text"}}
        render = ResponsesStream(model, {
            "instructions": body.instructions, "tools": body.tools or [], "tool_choice": body.tool_choice or "auto",
            "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
            "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None}, "text": text})
        events = core.chat_events(request_message, protocol="http", trace_context=trace_context(request))
        return await _answer(request, events, render, body.stream)

    @app.post("/v1/completions")
    async def completions(body: convert.CompletionRequest, request: Request) -> Response:
        request_message = convert.completion_request(body)
        model = select_model(body.model, request_message)
        render = TextCompletion(model, tokenizer, logprobs=body.logprobs is not None,
                                include_usage=body.include_usage)
        events = core.generate_events(request_message, protocol="http", trace_context=trace_context(request))
        return await _answer(request, events, render, body.stream)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        for card in model_cards():
            if card["id"] == model_id:
                return card
        raise model_not_found(model_id)

    @app.get("/health")
    async def health() -> Response:
        if core.draining:
            return _error(503, "the server is draining", "service_unavailable_error")
        if not core.ready_replicas:
            return _error(503, "no model replica is ready", "service_unavailable_error")
        return JSONResponse({"status": "ok", "ready_replicas": core.ready_replicas})

    # ------------------------------------------------------------------------------------------------ errors
    @app.exception_handler(RouterError)
    async def router_error(_: Request, exc: RouterError) -> Response:
        status, type_ = http_status(exc.code)
        headers = None
        if exc.code is ErrorCode.RESOURCE_EXHAUSTED and exc.retry_after_ms is not None:
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_ms / 1000)))}
        param = "model" if exc.code is ErrorCode.NOT_FOUND else None  # a LoRA adapter unloaded meanwhile
        return _error(status, exc.message, type_, param, code=error_code(exc.code), headers=headers)

    @app.exception_handler(convert.InvalidRequest)
    async def invalid_request(_: Request, exc: convert.InvalidRequest) -> Response:
        return _error(400, exc.message, "invalid_request_error", exc.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # FastAPI's: loc is ("body", character offset), not a field
            at = first.get("loc", ("body", "?"))[-1]
            reason = first.get("ctx", {}).get("error", "JSON decode error")
            return _error(400, f"the body is not valid JSON: {reason} (at character {at})", "invalid_request_error")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                            for e in errors[:5])
        return _error(400, message or "invalid request body", "invalid_request_error", param)

    @app.exception_handler(_ApiError)
    async def api_error(_: Request, exc: _ApiError) -> Response:
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's 400 for a body its JSON decoder cannot read
            message = f"the body is not valid UTF-8 JSON: {exc.__cause__}"
        return _error(exc.status_code, message, kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        logger.exception("HTTP request failed", exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.exception_handler(_ClientGone)
    async def client_gone(_: Request, __: _ClientGone) -> Response:
        return Response(status_code=499)

    return app


class _Guard:
    """Pure ASGI middleware (streams pass through untouched): the bearer token, and the body size limit."""

    def __init__(self, app: Any, token: str | None, max_body: int) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.expected is not None:
            given = headers.get(b"authorization", b"")
            if not (given and hmac.compare_digest(given, self.expected)):
                message = "invalid bearer token" if given else "missing bearer token (header 'Authorization: Bearer " \
                                                               "<token>')"
                return await _error(401, message, "invalid_request_error", code="invalid_api_key")(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return await _error(413, f"the body has {int(length)} bytes; the limit is {self.max_body}",
                                "invalid_request_error")(scope, receive, send)
        return await self.app(scope, receive, send)


# ================================================================================================ streaming
class _EventStream(StreamingResponse):
    media_type = "text/event-stream"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette stops iterating when the client goes away but leaves the generator to the garbage collector;
            # closing it now cancels the replica request at once.
            await self.body_iterator.aclose()  # type: ignore[union-attr]


async def _answer(request: Request, events: AsyncIterator[Any], render: Any, stream: bool | None) -> Response:
    """Server-sent events, or the whole answer once done (either way cancelled if the client goes away)."""
    if stream:
        return await _stream(request, events, render.stream)
    return JSONResponse(await _until_disconnect(request, render.collect(events)))


async def _stream(request: Request, events: AsyncIterator[Any],
                  render: Callable[[AsyncIterator[Any]], AsyncIterator[str]]) -> Response:
    """Wait for the first delta (errors before it are HTTP errors), then stream everything as SSE."""
    try:
        first = await _until_disconnect(request, anext(events))
    except BaseException:
        await events.aclose()
        raise
    return _EventStream(render(_resume(first, events)), headers=_SSE_HEADERS)


async def _resume(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    async with contextlib.aclosing(rest):
        yield first
        async for item in rest:
            yield item


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled if the client disconnects first (then _ClientGone)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise _ClientGone()
        return task.result()
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ================================================================================================ the server
class HttpServer:
    """uvicorn serving `build_app(core, token)` on the current event loop. The socket is bound in the constructor (a
    taken port fails at once); `start` serves, `stop` closes (running streams get `grace_s` to finish)."""

    def __init__(self, core: RouterCore, token: str | None, host: str, port: int) -> None:
        import uvicorn

        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise OSError(f"cannot bind the HTTP server to {host}:{port}: {exc.strerror or exc}") from None
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(build_app(core, token), lifespan="off", log_config=None, access_log=False,
                                timeout_keep_alive=30)
        config.load()
        self._uvicorn = uvicorn.Server(config)
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from uvicorn.lifespan.off import LifespanOff

        # startup + main_loop rather than serve(): serve() takes over SIGINT/SIGTERM on the main thread, and this
        # runs inside a Ray actor (or a test's loop) whose signals are not ours.
        self._uvicorn.lifespan = LifespanOff(self._uvicorn.config)
        await self._uvicorn.startup(sockets=[self._sock])
        self._loop_task = asyncio.get_running_loop().create_task(self._uvicorn.main_loop())

    def close(self) -> None:
        self._sock.close()

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._loop_task is None:
            self.close()
            return
        self._uvicorn.should_exit = True
        await self._loop_task
        self._loop_task = None
        self._uvicorn.config.timeout_graceful_shutdown = max(0.1, grace_s)
        await self._uvicorn.shutdown(sockets=[self._sock])
