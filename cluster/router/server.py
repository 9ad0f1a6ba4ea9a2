"""The router: a grpc.aio server for gptoss.v1 (and the OpenAI-compatible HTTP app) in front of the replicas.

`GptossServer(backend, settings, metrics)` is the whole server (services, health, reflection, auth, admission,
metrics) over any `cluster.router.backend.Backend`; `RouterImpl` is the body of the `Router` Ray Serve deployment,
which runs one `GptossServer` over a `ServeBackend` on the replica's event loop.

One path, two wire formats: `GptossServer.chat_events` / `generate_events` are the transport-neutral body of a Chat
or Generate call (a gptoss.v1 request in, its response messages out, `RouterError` for every failure). The gRPC
handlers below stream them as they are; `cluster.router.openai_http` (uvicorn on the same event loop, started when
`http_port` is set) converts OpenAI JSON bodies into the same request messages and renders the same responses.

Per request: authenticate (bearer token interceptor, health exempt) -> validate and render (harmony) -> admission
(bounded priority queue; RESOURCE_EXHAUSTED + `grpc-retry-pushback-ms` when full) -> a replica streams token ids ->
detokenize / parse harmony channels -> stream back. Deadlines (`timeout_seconds` and the gRPC deadline) travel to
the replica, which aborts the request when they pass; the router enforces them too (DEADLINE_EXCEEDED). A client
that cancels cancels the replica's request, which frees its KV blocks. A replica failing before the first token is
retried once on another replica; after that the client gets UNAVAILABLE.

Health (grpc.health.v1): service "" is SERVING while the server runs; "gptoss.v1.Inference" is SERVING while at
least one replica is ready and NOT_SERVING while none is (HTTP: GET /health, 200 or 503). `drain()` flips both to
NOT_SERVING first, then refuses new calls (UNAVAILABLE, HTTP 503) and lets running ones finish, bounded by a
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gptoss_cluster.cluster.replica import merge_deltas
from gptoss_cluster.cluster.router.admission import Admission, DeadlineExceeded, QueueFull
from gptoss_cluster.cluster.router.backend import Backend, BackendError
from gptoss_cluster.cluster.router.replica_choice import prefix_hashes
from gptoss_cluster.cluster.router.requests import Prepared, RequestError, Validator
from gptoss_cluster.cluster.router.streaming import ChatDelta, ChatStream, TextStream, chat_finish_reason
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc

logger = logging.getLogger("gptoss.router")

__all__ = ["GptossServer", "RouterImpl", "RouterSettings", "INFERENCE_SERVICE", "ADMIN_SERVICE",
           "PUSHBACK_TRAILER", "RouterError", "resolve_auth_token"]

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name
PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
PREFIX_BLOCKS = 32  # leading KV blocks hashed for replica affinity (512 tokens at block size 16)
_HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "tool_call": pb.FINISH_REASON_TOOL_CALL,
           "aborted": pb.FINISH_REASON_ABORTED}
_CHANNELS = {"analysis": pb.CHANNEL_ANALYSIS, "commentary": pb.CHANNEL_COMMENTARY, "final": pb.CHANNEL_FINAL}
_CANCEL_SLACK_S = 0.005  # a call cancelled this close to its deadline was cancelled by the deadline
_REPLICA_ERRORS = {"INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
                   "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
                   "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE, "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class RouterSettings:
    """Knobs of one router (cluster.app fills them from the application's arguments)."""

    served_model_name: str = ""
    host: str = "0.0.0.0"
    port: int = 50051
    http_port: int = 0  # the OpenAI-compatible HTTP server; 0: off
    http_host: str | None = None  # None: the gRPC host
    max_queued_requests: int = 1024
    max_inflight_per_replica: int | None = None  # None: each replica's max_ongoing_requests
    auth_token_env: str = "GPTOSS_AUTH_TOKEN"
    auth_token_file: str | None = None
    auth_token: str | None = None  # resolved token (never put it in a config: use the env var or file)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    max_message_bytes: int = 8 * 1024 * 1024
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    default_reasoning_effort: str = "medium"
    health_interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    # After the first token, pass a request's tokens on in deltas of at least this many (or its last): fewer
    # messages per token for the router, Serve and the client, at the cost of a coarser stream (vLLM's and
    # SGLang's --stream-interval). 1: every delta as it comes.
    stream_interval: int = 1
    # How Serve carries the per-request and token-channel calls to the replicas: "grpc" (Serve's gRPC transport
    # between deployments) or "ray" (Ray actor tasks); see cluster.router.backend.ServeBackend.
    replica_transport: str = "grpc"
    router_name: str = "router"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouterSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("auth_token")
        return out


def resolve_auth_token(settings: RouterSettings) -> str | None:
    """The bearer token the router requires: settings.auth_token, else the file, else $auth_token_env; None: off."""
    if settings.auth_token:
        return settings.auth_token
    if settings.auth_token_file:
        with open(settings.auth_token_file) as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"auth token file {settings.auth_token_file} is empty")
        return token
    if settings.auth_token_env:
        return os.environ.get(settings.auth_token_env, "").strip() or None
    return None


# ================================================================================================ auth
class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC but grpc.health.v1."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(_HEALTH_PREFIX):
            return await continuation(details)
        given = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode(errors="replace")
                break
        if given and hmac.compare_digest(given.encode(), self._expected):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        message = "missing bearer token (metadata 'authorization: Bearer <token>')" if not given else \
            "invalid bearer token"
        return _deny(handler, message)


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


# ================================================================================================ the server
class RouterError(Exception):
    """Why a call failed, whatever the transport: a gRPC status, a readable message and trailers (the pushback of
    RESOURCE_EXHAUSTED). gRPC aborts with them; HTTP maps the status to its own (cluster.router.openai_http)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.trailers = code, message, trailers

    @property
    def retry_after_ms(self) -> int | None:
        return next((int(v) for k, v in self.trailers if k == PUSHBACK_TRAILER), None)


class _Call:
    """One Generate / Chat call, for every transport (`GptossServer._observed`), as a context manager: counts it in
    flight (drain), turns the validator's RequestError into RouterError, and records its metrics with the status it
    ended with (a caller that went away: CANCELLED, or DEADLINE_EXCEEDED when that was its deadline). A class rather
    than two nested generator-based context managers: it runs on every call."""

    __slots__ = ("server", "timer", "prompt_tokens", "deadline")

    def __init__(self, server: GptossServer, timer: Any, deadline: float | None) -> None:
        self.server = server
        self.timer = timer
        self.prompt_tokens = 0
        self.deadline = deadline

    def __enter__(self) -> _Call:
        s = self.server
        if s.draining:
            self.timer.finish(grpc.StatusCode.UNAVAILABLE, prompt_tokens=self.prompt_tokens)
            raise RouterError(grpc.StatusCode.UNAVAILABLE, "the server is draining; retry on another router")
        s._inflight += 1
        s._idle.clear()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        s = self.server
        s._inflight -= 1
        if not s._inflight:
            s._idle.set()
        code = grpc.StatusCode.OK
        if isinstance(exc, RouterError):
            code = exc.code
        elif isinstance(exc, RequestError):
            self.timer.finish(exc.code, prompt_tokens=self.prompt_tokens)
            raise RouterError(exc.code, exc.message) from None
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            late = self.deadline is not None and time.monotonic() >= self.deadline - _CANCEL_SLACK_S
            code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
        self.timer.finish(code, prompt_tokens=self.prompt_tokens)


class GptossServer:
    """gptoss.v1 Inference + Admin, grpc.health.v1 and reflection over a Backend."""

    def __init__(self, backend: Backend, settings: RouterSettings | None = None, metrics: Any = None) -> None:
        self.backend = backend
        self.settings = settings or RouterSettings()
        self.metrics = metrics
        self.token = resolve_auth_token(self.settings)
        self.admission = Admission(self.settings.max_queued_requests, capacity=0)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.draining = False
        self.replicas: list[dict[str, Any]] = []
        self.ready_replicas = 0
        self._model: dict[str, Any] | None = None
        self._validator: Validator | None = None
        self._block_size = 16  # the served model's KV block size (prefix hashes), with the validator
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._poll_task: asyncio.Task[None] | None = None
        self._polled = asyncio.Event()
        self._metrics_server: Any = None
        self.http: Any = None  # cluster.router.openai_http.HttpServer while http_port is set
        if metrics is not None:
            self.admission.on_change = self._record_queue

    # ------------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> int:
        """Bind, start serving and the replica poll; returns the bound port."""
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),  # a taken port is an error, not a second server sharing it
        ]
        interceptors = [BearerAuthInterceptor(self.token)] if self.token else []
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_InferenceServicer_to_server(_Inference(self), server)
        pb_grpc.add_AdminServicer_to_server(_Admin(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{s.host}:{s.port}"
        if s.http_port:  # bound first: a taken port fails the start before anything serves
            from gptoss_cluster.cluster.router.openai_http import HttpServer

            self.http = HttpServer(self, s.http_host or s.host, s.http_port)
        if s.tls_cert_file or s.tls_key_file:
            if not (s.tls_cert_file and s.tls_key_file):
                raise ValueError("TLS needs both tls_cert_file and tls_key_file")
            with open(s.tls_key_file, "rb") as f:
                key = f.read()
            with open(s.tls_cert_file, "rb") as f:
                cert = f.read()
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = server.add_insecure_port(address)
        if not port:
            if self.http is not None:
                self.http.close()
                self.http = None
            raise OSError(f"cannot bind the gRPC server to {address}")
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(INFERENCE_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self.server, self.port = server, port
        if s.metrics_port and self.metrics is not None:
            from gptoss_cluster.cluster.metrics import start_metrics_server

            self._metrics_server = start_metrics_server(s.metrics_port, s.metrics_host, metrics=self.metrics,
                                                        exist_ok=True)
        if self.http is not None:
            await self.http.start()
        self._poll_task = asyncio.get_running_loop().create_task(self._poll_loop())
        logger.info("gRPC server on %s:%d (auth %s, tls %s)%s", s.host, port, "on" if self.token else "off",
                    "on" if s.tls_cert_file else "off",
                    f"; OpenAI-compatible HTTP on {self.http.host}:{self.http.port}" if self.http else "")
        return port

    @property
    def http_port(self) -> int | None:
        """The bound port of the OpenAI-compatible HTTP server (None: off)."""
        return None if self.http is None else self.http.port

    async def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Wait until a replica is ready (the Inference health service SERVING)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_replicas and self._validator is not None:
                return True
            self._polled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._polled.wait(), max(0.01, deadline - time.monotonic()))
        return False

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Health NOT_SERVING first, then refuse new calls and wait for running ones; True if all finished."""
        self.draining = True
        await self.health.enter_graceful_shutdown()
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
            self._poll_task = None
        if self.http is not None:
            await self.http.stop(grace_s)
            self.http = None
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None

    # ------------------------------------------------------------------------------------------------ replicas
    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("replica poll failed")
            self._polled.set()
            await asyncio.sleep(self.settings.health_interval_s)

    async def refresh(self) -> None:
        """Poll the replicas: readiness, admission capacity, health status, replica metrics."""
        stats = await self.backend.replica_stats()
        ready = [r for r in stats if r.get("state") == "RUNNING"]
        self.replicas = stats
        if ready and self._validator is None:
            try:
                self._set_model(await self.backend.model_info())
            except BackendError as exc:
                logger.warning("model info unavailable yet: %s", exc)
        self.ready_replicas = len(ready) if self._validator is not None else 0
        per = self.settings.max_inflight_per_replica
        self.admission.set_capacity(sum(per or int(r.get("max_ongoing_requests") or 1) for r in ready)
                                    if self.ready_replicas else 0)
        if not self.draining:
            status = health_pb2.HealthCheckResponse.SERVING if self.ready_replicas else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set(INFERENCE_SERVICE, status)
        if self.metrics is not None:
            counts: dict[str, int] = {}
            for r in stats:
                state = str(r.get("state", "unknown")).lower()
                counts[state] = counts.get(state, 0) + 1
            self.metrics.set_replica_states(counts)

    def _set_model(self, info: dict[str, Any]) -> None:
        info = dict(info)
        if self.settings.served_model_name:
            info["model"] = self.settings.served_model_name
        self._model = info
        self._validator = Validator(info, sampling_defaults=self.settings.sampling_defaults,
                                    default_reasoning_effort=self.settings.default_reasoning_effort)
        self._block_size = int(self._validator.model.get("kv_block_size") or 16)

    def _record_queue(self, admission: Admission) -> None:
        self.metrics.set_router_queue(router=self.settings.router_name, queued=admission.queued,
                                      capacity=admission.max_queued)

    @property
    def inflight(self) -> int:
        return self._inflight

    # ------------------------------------------------------------------------------------------------ per call
    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        if self.draining:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, "the server is draining; retry on another router")
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    def _observed(self, method: str, protocol: str, deadline: float | None) -> _Call:
        """One Generate / Chat call, for every transport (a context manager; see `_Call`)."""
        return _Call(self, _NULL_TIMER if self.metrics is None else self.metrics.request_timer(method, protocol),
                     deadline)

    def validator(self) -> Validator:
        if self._validator is None:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, "no model replica is ready yet")
        return self._validator

    @property
    def model(self) -> dict[str, Any]:
        """The served model's facts (a replica's model_info; empty until one answered)."""
        return dict(self._model or {})

    @property
    def model_name(self) -> str:
        return str((self._model or {}).get("model") or self.settings.served_model_name)

    async def generate_events(self, request: pb.GenerateRequest, *, timeout: float | None = None,
                              protocol: str = "grpc") -> AsyncIterator[pb.GenerateResponse]:
        """The body of Generate for any transport: GenerateResponse deltas, the last one with finish_reason and
        usage. `timeout`: seconds the caller grants (with the request's own timeout_seconds, the smaller wins).
        Raises RouterError; closing it early cancels the request on its replica."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._observed("Generate", protocol, deadline) as call:
            prep = self.validator().generate(request)
            call.prompt_tokens = len(prep.prompt_token_ids)
            text = TextStream(prep.stop, prep.min_tokens)
            # per token: locals instead of attribute lookups, and no empty logprobs list for every message
            feed, count, request_id, response = text.feed, call.timer.tokens, prep.request_id, pb.GenerateResponse
            async with contextlib.aclosing(self.replica_stream(prep, _left(deadline), call.timer)) as events:
                async for item in events:
                    finish = item.get("finish_reason")
                    drop_last = finish == "stop" and isinstance(item.get("stop_reason"), int)
                    kept, delta = feed(item["token_ids"], drop_last=drop_last)
                    count(len(kept))
                    if text.stopped:
                        finish = "stop"
                    if finish:
                        delta += text.finish()
                        yield response(
                            request_id=request_id, token_ids=kept, text=delta,
                            logprobs=_logprobs(item.get("logprobs"), len(kept)), finish_reason=_FINISH[finish],
                            usage=_usage(prep, text.num_tokens, item.get("usage")))
                        return
                    if kept or delta:
                        logprobs = item.get("logprobs")
                        if logprobs:
                            yield response(request_id=request_id, token_ids=kept, text=delta,
                                           logprobs=_logprobs(logprobs, len(kept)))
                        else:
                            yield response(request_id=request_id, token_ids=kept, text=delta)

    async def chat_events(self, request: pb.ChatRequest, *, timeout: float | None = None, protocol: str = "grpc"
                          ) -> AsyncIterator[pb.ChatResponse]:
        """The body of Chat for any transport: ChatResponse deltas (with the logprobs of their token_ids when the
        request asked for sampling.logprobs), the last one with finish_reason and usage. Arguments and errors as
        `generate_events`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._observed("Chat", protocol, deadline) as call:
            prep = self.validator().chat(request)
            call.prompt_tokens = len(prep.prompt_token_ids)
            chat = ChatStream(stops=prep.stop, min_tokens=prep.min_tokens)
            logprobs = _LogprobQueue()
            finish, usage, deltas = None, None, []
            async with contextlib.aclosing(self.replica_stream(prep, _left(deadline), call.timer)) as events:
                async for item in events:
                    before = chat.num_tokens
                    deltas = chat.feed(item["token_ids"])
                    call.timer.tokens(chat.num_tokens - before)
                    logprobs.push(item.get("logprobs"), chat.num_tokens - before)
                    if chat.stopped:
                        finish = "stop"
                    elif item.get("finish_reason"):
                        finish = chat_finish_reason(item["finish_reason"], item.get("stop_reason"))
                    usage = item.get("usage") or usage
                    if finish:
                        deltas += chat.finish()
                        break
                    for delta in deltas:
                        yield _chat_response(prep.request_id, delta, logprobs)
            last = deltas.pop() if deltas else ChatDelta(None)
            for delta in deltas:
                yield _chat_response(prep.request_id, delta, logprobs)
            final = _chat_response(prep.request_id, last, logprobs)
            final.finish_reason = _FINISH[finish or "stop"]
            final.usage.CopyFrom(_usage(prep, chat.num_tokens, usage, chat.reasoning_tokens))
            yield final

    async def replica_stream(self, prep: Prepared, timeout: float | None,
                             timer: Any) -> AsyncIterator[dict[str, Any]]:
        """Admission, then the replica's token events (errors become RouterError); retries once before the first
        token. `timeout`: the caller's seconds left (None: no bound but the request's own). Closing this generator
        cancels the request on its replica."""
        if prep.timeout_s is not None and (timeout is None or prep.timeout_s < timeout):
            timeout = prep.timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        wall_deadline = None if timeout is None else time.time() + timeout
        if not self.ready_replicas:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, "no model replica is ready")
        try:
            await self.admission.acquire(prep.priority, deadline)
        except QueueFull as exc:
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                              ((PUSHBACK_TRAILER, str(exc.retry_after_ms)),)) from None
        except DeadlineExceeded as exc:
            raise RouterError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        try:
            timer.dispatched()
            request = prep.replica_request(wall_deadline)
            assert self._validator is not None
            request["prefix_hashes"] = prefix_hashes(prep.prompt_token_ids, self._block_size, PREFIX_BLOCKS)
            exclude: list[str] = []
            interval = self.settings.stream_interval
            held: dict[str, Any] | None = None  # deltas taken but not yet passed on (stream_interval > 1)
            for attempt in range(2):
                request["exclude_replicas"] = exclude
                stream = self.backend.stream(request)
                replica_id = None
                started = False
                try:
                    while True:
                        try:
                            if deadline is None:
                                item = await anext(stream)
                            else:  # a timer in this task (asyncio.wait_for would start a task per item)
                                async with asyncio.timeout(deadline - time.monotonic()):
                                    item = await anext(stream)
                        except StopAsyncIteration:
                            raise BackendError(f"replica {replica_id} closed the stream early") from None
                        except TimeoutError:
                            raise RouterError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                              f"the deadline ({timeout:.3f} s) passed while generating") from None
                        if "accepted" in item:
                            replica_id = item.get("replica_id")
                            continue
                        if "error" in item:
                            err = item["error"]
                            code = _REPLICA_ERRORS.get(err.get("code"), grpc.StatusCode.INTERNAL)
                            if code == grpc.StatusCode.UNAVAILABLE and not started and attempt == 0:
                                raise BackendError(err.get("message", "replica unavailable"))
                            raise RouterError(code, err.get("message", "replica error"))
                        if not started:  # the first token goes out at once, whatever the stream interval
                            started = True
                            yield item
                        else:
                            held = item if held is None else merge_deltas(held, item)
                            if len(held["token_ids"]) < interval and not held.get("finish_reason"):
                                continue
                            item, held = held, None
                            yield item
                        if item.get("finish_reason"):
                            return
                except BackendError as exc:
                    if not started and attempt == 0:
                        logger.warning("replica %s failed before the first token (%s); retrying elsewhere",
                                       replica_id, exc)
                        if replica_id:
                            exclude.append(replica_id)
                        continue
                    raise RouterError(grpc.StatusCode.UNAVAILABLE, f"the replica serving this request failed: {exc}") \
                        from None
                finally:
                    await stream.aclose()
        finally:
            self.admission.release()


def _logprobs(items: Any, n: int) -> list[pb.TokenLogprob]:
    if not items:
        return []
    return [pb.TokenLogprob(token_id=lp["token_id"], logprob=lp["logprob"],
                            top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.get("top", ())])
            for lp in items[:n]]


def _usage(prep: Prepared, completion: int, replica_usage: Mapping[str, Any] | None,
           reasoning: int = 0) -> pb.Usage:
    cached = int((replica_usage or {}).get("cached_prompt_tokens") or 0)
    return pb.Usage(prompt_tokens=len(prep.prompt_token_ids), completion_tokens=completion,
                    cached_prompt_tokens=cached, reasoning_tokens=reasoning)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class _LogprobQueue:
    """Logprobs of the chat tokens fed so far, handed out in token order as deltas claim their token ids."""

    def __init__(self) -> None:
        self._items: list[pb.TokenLogprob] = []
        self._at = 0

    def push(self, items: Any, n: int) -> None:
        if items:
            self._items.extend(_logprobs(items, n))

    def pop(self, n: int) -> list[pb.TokenLogprob]:
        out = self._items[self._at:self._at + n]
        self._at += len(out)
        return out


class _NullTimer:
    generated = 0

    def dispatched(self) -> None: ...
    def tokens(self, n: int = 1) -> None: ...
    def finish(self, *_: Any, **__: Any) -> None: ...


_NULL_TIMER = _NullTimer()  # stateless: one for every call made without metrics


async def _abort(context: grpc.aio.ServicerContext, exc: RouterError | RequestError) -> None:
    await context.abort(exc.code, exc.message, trailing_metadata=tuple(getattr(exc, "trailers", ())))


class _Inference(pb_grpc.InferenceServicer):
    def __init__(self, server: GptossServer) -> None:
        self.s = server

    async def Generate(self, request: pb.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        try:
            # aclosing: a client that cancels while a response is being written still cancels the replica now
            async with contextlib.aclosing(self.s.generate_events(request, timeout=context.time_remaining())) as rs:
                async for response in rs:
                    yield response
        except RouterError as exc:
            await _abort(context, exc)

    async def Chat(self, request: pb.ChatRequest,  # noqa: N802
                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ChatResponse]:
        try:
            async with contextlib.aclosing(self.s.chat_events(request, timeout=context.time_remaining())) as rs:
                async for response in rs:
                    yield response
        except RouterError as exc:
            await _abort(context, exc)

    async def Tokenize(self, request: pb.TokenizeRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            with self.s._call():
                return pb.TokenizeResponse(token_ids=self.s.validator().tokenize(request))
        except (RouterError, RequestError) as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from None

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            with self.s._call():
                m = self.s.validator().model
                return pb.ModelInfo(
                    model=m["model"], num_layers=m["num_layers"], num_experts=m["num_experts"],
                    experts_per_token=m["experts_per_token"], hidden_size=m["hidden_size"],
                    vocab_size=m["vocab_size"], context_length=m["context_length"],
                    sliding_window=m["sliding_window"], shards_per_replica=m["shards_per_replica"],
                    num_replicas=self.s.ready_replicas, kv_block_size=m["kv_block_size"])
        except RouterError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from None


def _chat_response(request_id: str, delta: ChatDelta, logprobs: _LogprobQueue) -> pb.ChatResponse:
    out = pb.ChatResponse(request_id=request_id, channel=_CHANNELS.get(delta.channel or "", pb.CHANNEL_UNSPECIFIED),
                          text=delta.text, token_ids=delta.token_ids, logprobs=logprobs.pop(len(delta.token_ids)))
    if delta.tool_call is not None:
        tc = delta.tool_call
        out.tool_call.CopyFrom(pb.ToolCallDelta(index=tc["index"], id=tc["id"], name=tc["name"],
                                                arguments_delta=tc["arguments_delta"]))
    return out


class _Admin(pb_grpc.AdminServicer):
    def __init__(self, server: GptossServer) -> None:
        self.s = server

    async def ListReplicas(self, request: pb.ListReplicasRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.ListReplicasResponse:
        stats = await self.s.backend.replica_stats()
        out = pb.ListReplicasResponse()
        for r in sorted(stats, key=lambda r: str(r.get("replica_id"))):
            out.replicas.append(pb.ReplicaInfo(
                replica_id=str(r.get("replica_id", "")), state=str(r.get("state", "")),
                running_requests=int(r.get("num_running", 0)), waiting_requests=int(r.get("num_waiting", 0)),
                kv_usage_ratio=float(r.get("kv_usage", 0.0)), num_shards=int(r.get("num_shards", 1)),
                kv_blocks_total=int(r.get("kv_blocks_total", 0)), kv_blocks_free=int(r.get("kv_blocks_free", 0)),
                prefix_cache_hits=int(r.get("prefix_cache_hits", 0)),
                prefix_cache_queries=int(r.get("prefix_cache_queries", 0)),
                requests_total=int(r.get("requests_total", 0)), generated_tokens=int(r.get("tokens_total", 0)),
                outstanding_tokens=int(r.get("outstanding_tokens", 0))))
        return out


# ================================================================================================ Serve deployment
class RouterImpl:
    """The body of the `Router` Serve deployment: one GptossServer over the ModelReplica handle."""

    async def __init__(self, replica_handle: Any, settings: dict[str, Any]) -> None:
        from gptoss_cluster.cluster.metrics import Metrics
        from gptoss_cluster.cluster.router.backend import ServeBackend

        self.settings = RouterSettings.from_dict(settings)
        with contextlib.suppress(Exception):
            from ray import serve

            self.settings.router_name = serve.get_replica_context().replica_id.unique_id
        self.server = GptossServer(ServeBackend(replica_handle, transport=self.settings.replica_transport),
                                   self.settings, Metrics.for_process())
        await self.server.start()

    async def info(self) -> dict[str, Any]:
        s = self.server
        return {"port": s.port, "host": s.settings.host, "http_port": s.http_port, "ready_replicas": s.ready_replicas,
                "draining": s.draining, "inflight": s.inflight, "queued": s.admission.queued,
                "running": s.admission.running, "capacity": s.admission.capacity, "pid": os.getpid()}

    async def drain(self, timeout_s: float | None = None) -> bool:
        return await self.server.drain(timeout_s)

    async def check_health(self) -> None:
        if self.server.server is None and not self.server.draining:
            raise RuntimeError("the gRPC server is not running")

    async def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            await server.drain()
            await server.stop()
