"""gptoss.v1 over gRPC: a grpc.aio server translating calls into the router core and its errors into statuses.

`GrpcService(core, token)` serves Inference (Generate, Chat, Tokenize, GetModelInfo) and Admin (ListReplicas,
LoadLoraAdapter, UnloadLoraAdapter, ListLoraAdapters) over
`cluster.router.core.RouterCore`, plus grpc.health.v1 and reflection. A `RouterError` aborts the call with the status
of the same name (RESOURCE_EXHAUSTED with the `grpc-retry-pushback-ms` trailer); nothing else is decided here.

Health: service "" is SERVING while the server runs; "gptoss.v1.Inference" follows the core's readiness (SERVING
while a replica is ready) until `enter_graceful_shutdown` turns both NOT_SERVING for good (draining). Auth: with a
token, every RPC but grpc.health.v1 needs `authorization: Bearer <token>` (UNAUTHENTICATED otherwise).
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gptoss_cluster.cluster.contract import LoraAdapter, LoraResult, ReplicaStats
from gptoss_cluster.cluster.router.core import RouterCore
from gptoss_cluster.cluster.router.errors import RouterError
from gptoss_cluster.cluster.router.settings import RouterSettings
from gptoss_cluster.cluster.tracing import trace_context_of
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc

__all__ = ["ADMIN_SERVICE", "INFERENCE_SERVICE", "PUSHBACK_TRAILER", "GrpcService"]

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name
PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
_HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"


class GrpcService:
    """The grpc.aio server of one router (bound by `start`)."""

    def __init__(self, core: RouterCore, token: str | None) -> None:
        self.core = core
        self.token = token
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self, settings: RouterSettings) -> int:
        """Bind `settings.host:port` (TLS with both files set) and serve; returns the bound port."""
        s = settings
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
        interceptors: list[grpc.aio.ServerInterceptor] = [BearerAuthInterceptor(self.token)] if self.token else []
        interceptors.append(UndecodableRequestInterceptor())
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_InferenceServicer_to_server(_Inference(self.core), server)
        pb_grpc.add_AdminServicer_to_server(_Admin(self.core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{s.host}:{s.port}"
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
            raise OSError(f"cannot bind the gRPC server to {address}")
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(INFERENCE_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self.server, self.port = server, port
        return port

    async def set_ready(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(INFERENCE_SERVICE, status)

    async def enter_graceful_shutdown(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None


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

    return _with_behavior(handler, unary, streaming)


def _with_behavior(handler: grpc.RpcMethodHandler, unary: Any, streaming: Any,
                   request_deserializer: Any = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serializers as `handler` whose behavior is `unary` (one response) or
    `streaming` (a response stream), as the kind needs; `request_deserializer` replaces the handler's when given."""
    kw = {"request_deserializer": request_deserializer or handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


# ================================================================================================ bad bytes
class _Undecodable:
    """What the request deserializer hands on when the bytes are no valid message (e.g. a string that is not UTF-8)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    """A request that does not decode is INVALID_ARGUMENT with the reason. grpc.aio answers a deserializer's
    exception with UNKNOWN ("Unexpected <class 'DecodeError'>"), which tells a client nothing it can act on."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # every gptoss.v1 method takes one request message; streams in are left as they are
        decode = handler.request_deserializer

        def deserializer(data: bytes) -> Any:
            try:
                return decode(data)
            except DecodeError as exc:
                return _Undecodable(f"the request message could not be decoded: {exc}")

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            async for response in handler.unary_stream(request, context):
                yield response

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return await handler.unary_unary(request, context)

        return _with_behavior(handler, unary, streaming, deserializer)


# ================================================================================================ the servicers
@contextlib.asynccontextmanager
async def _answering(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """A RouterError inside aborts the call with the status of the same name (RESOURCE_EXHAUSTED: with the
    pushback trailer)."""
    try:
        yield
    except RouterError as exc:
        trailers = () if exc.retry_after_ms is None else ((PUSHBACK_TRAILER, str(exc.retry_after_ms)),)
        await context.abort(grpc.StatusCode[exc.code.name], exc.message, trailing_metadata=trailers)


def _streaming(body: str) -> Any:
    """A streaming RPC whose responses are those of the core's `body` method (`generate_events`, `chat_events`),
    under the call's deadline. aclosing: a client that cancels while a response is being written still cancels the
    replica's request at once."""

    async def handler(self: _Inference, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # the caller's W3C trace context, from the metadata (read only when tracing)
        trace_context = None if self.core.tracer is None else trace_context_of(context.invocation_metadata() or ())
        events = getattr(self.core, body)(request, timeout=context.time_remaining(), trace_context=trace_context)
        async with _answering(context), contextlib.aclosing(events):
            async for response in events:
                yield response

    return handler


class _Inference(pb_grpc.InferenceServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    Generate = _streaming("generate_events")  # noqa: N815
    Chat = _streaming("chat_events")  # noqa: N815

    async def Tokenize(self, request: pb.TokenizeRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        async with _answering(context):
            return pb.TokenizeResponse(token_ids=await self.core.tokenize(request))
        raise AssertionError("unreachable: the call was aborted")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async with _answering(context):
            with self.core.call():
                m = self.core.validator().model
                return pb.ModelInfo(
                    model=m.model, num_layers=m.num_layers, num_experts=m.num_experts,
                    experts_per_token=m.experts_per_token, hidden_size=m.hidden_size, vocab_size=m.vocab_size,
                    context_length=m.context_length, sliding_window=m.sliding_window,
                    shards_per_replica=m.shards_per_replica, num_replicas=self.core.ready_replicas,
                    kv_block_size=m.kv_block_size, adapters=[_adapter(a) for a in self.core.adapter_list()])
        raise AssertionError("unreachable: the call was aborted")


class _Admin(pb_grpc.AdminServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def ListReplicas(self, request: pb.ListReplicasRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.ListReplicasResponse:
        return pb.ListReplicasResponse(replicas=[_replica_info(r) for r in await self.core.list_replicas()])

    async def LoadLoraAdapter(self, request: pb.LoadLoraAdapterRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> pb.LoraAdapterResponse:
        async with _answering(context):
            adapter, results = await self.core.load_lora(request.name, request.path)
            return pb.LoraAdapterResponse(adapter=_adapter(adapter), replicas=[_lora_result(r) for r in results])
        raise AssertionError("unreachable: the call was aborted")

    async def UnloadLoraAdapter(self, request: pb.UnloadLoraAdapterRequest,  # noqa: N802
                                context: grpc.aio.ServicerContext) -> pb.LoraAdapterResponse:
        async with _answering(context):
            results = await self.core.unload_lora(request.name)
            return pb.LoraAdapterResponse(replicas=[_lora_result(r) for r in results])
        raise AssertionError("unreachable: the call was aborted")

    async def ListLoraAdapters(self, request: pb.ListLoraAdaptersRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> pb.ListLoraAdaptersResponse:
        replicas = await self.core.list_replicas()
        names: dict[str, LoraAdapter] = {}
        for r in replicas:
            for a in r.adapters:
                names.setdefault(a.name, a)
        parent = self.core.model_name
        return pb.ListLoraAdaptersResponse(
            adapters=[_adapter(a, parent) for _, a in sorted(names.items())],
            replicas=[pb.ReplicaLoraAdapters(replica_id=r.replica_id, adapters=[_adapter(a, parent)
                                                                                for a in r.adapters])
                      for r in replicas])


def _adapter(a: LoraAdapter, parent: str | None = None) -> pb.LoraAdapter:
    return pb.LoraAdapter(name=a.name, path=a.path, rank=a.rank, parent=parent or a.parent)


def _lora_result(r: LoraResult) -> pb.ReplicaLoraResult:
    if r.error is None:
        return pb.ReplicaLoraResult(replica_id=r.replica_id, ok=True)
    return pb.ReplicaLoraResult(replica_id=r.replica_id, ok=False, error_code=r.error.code.name,
                                error=r.error.message)


def _replica_info(r: ReplicaStats) -> pb.ReplicaInfo:
    return pb.ReplicaInfo(
        replica_id=r.replica_id, state=r.state.value, running_requests=r.load.num_running,
        waiting_requests=r.load.num_waiting, kv_usage_ratio=r.load.kv_usage, num_shards=r.num_shards,
        kv_blocks_total=r.kv_blocks_total, kv_blocks_free=r.kv_blocks_free, prefix_cache_hits=r.prefix_cache_hits,
        prefix_cache_queries=r.prefix_cache_queries, requests_total=r.requests_total,
        generated_tokens=r.tokens_total, outstanding_tokens=r.load.outstanding_tokens)
