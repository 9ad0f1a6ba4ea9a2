"""Python client for the gptoss.v1 gRPC API (what `gptoss-cluster chat` / `generate --address` use).

    from gptoss_cluster.cluster.client import Client
    with Client("127.0.0.1:50051") as client:            # token from $GPTOSS_AUTH_TOKEN unless given
        for delta in client.chat("What is 2+2?", max_tokens=64):
            print(delta.channel, delta.text, end="")
        ids = client.tokenize(messages=[{"role": "user", "content": "hi"}])

`AsyncClient` has the same methods for asyncio (streams are async iterators). Messages are OpenAI-style dicts
(`role`, `content`, `reasoning`, `tool_calls`, `name`, `tool_call_id`), tools `{"name", "description",
"parameters"}` (or the wrapped `{"type": "function", "function": {...}}` form); sampling options are the fields of
`gptoss.v1.SamplingParams` as keywords; `adapter="name"` runs a request with a LoRA adapter (`load_lora`,
`unload_lora` and `list_loras` manage them on every replica). Errors are `grpc.RpcError`s with the server's status
code and message.

Structured outputs take OpenAI's shapes too:

    client.chat("Pick a color", response_format={"type": "json_schema",
                                                  "json_schema": {"name": "c", "schema": {"enum": ["red", "blue"]}}},
                max_reasoning_tokens=0)
    client.chat("Weather in Paris?", tools=[WEATHER], tool_choice="required")  # or {"type": "function", ...}

`response_format`: {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}},
{"type": "json_object"}, {"type": "regex", "regex": ...}, {"type": "grammar", "grammar": ...} or {"type": "text"};
`tool_choice`: "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}} | a tool's name
("get_weather", "browser.search", "python").
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "Client", "TOKEN_ENV", "chat_messages", "function_tools", "response_format_message",
           "sampling_params", "tool_choice_message"]

TOKEN_ENV = "GPTOSS_AUTH_TOKEN"
_EFFORT = {None: pb.REASONING_EFFORT_UNSPECIFIED, "low": pb.REASONING_EFFORT_LOW,
           "medium": pb.REASONING_EFFORT_MEDIUM, "high": pb.REASONING_EFFORT_HIGH}
_SAMPLING_FIELDS = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}
CHANNEL_NAMES = {pb.CHANNEL_UNSPECIFIED: "", pb.CHANNEL_ANALYSIS: "analysis", pb.CHANNEL_COMMENTARY: "commentary",
                 pb.CHANNEL_FINAL: "final"}
FINISH_NAMES = {pb.FINISH_REASON_UNSPECIFIED: "", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                pb.FINISH_REASON_TOOL_CALL: "tool_call", pb.FINISH_REASON_ABORTED: "aborted"}


# ------------------------------------------------------------------------------------------------ message builders
def sampling_params(**options: Any) -> pb.SamplingParams:
    unknown = set(options) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; known: {sorted(_SAMPLING_FIELDS)}")
    return pb.SamplingParams(**{k: v for k, v in options.items() if v is not None})


def chat_messages(messages: str | Sequence[Mapping[str, Any]]) -> list[pb.ChatMessage]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    out = []
    for m in messages:
        calls = []
        for c in m.get("tool_calls") or ():
            fn = c.get("function", c)
            args = fn.get("arguments", "")
            calls.append(pb.ToolCall(id=c.get("id", ""), name=fn.get("name", ""),
                                     arguments=args if isinstance(args, str) else json.dumps(args)))
        out.append(pb.ChatMessage(role=m.get("role", ""), content=m.get("content") or "", name=m.get("name") or "",
                                  reasoning=m.get("reasoning") or "", tool_calls=calls,
                                  tool_call_id=m.get("tool_call_id") or ""))
    return out


def function_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[pb.FunctionTool]:
    out = []
    for t in tools or ():
        fn = t.get("function", t)
        params = fn.get("parameters")
        out.append(pb.FunctionTool(name=fn.get("name", ""), description=fn.get("description") or "",
                                   parameters_json=params if isinstance(params, str) else
                                   (json.dumps(params) if params is not None else ""),
                                   strict=bool(fn.get("strict", False))))
    return out


def response_format_message(value: Mapping[str, Any] | pb.ResponseFormat | None) -> pb.ResponseFormat | None:
    """An OpenAI-style response_format dict -> gptoss.v1.ResponseFormat (None: free text)."""
    if value is None or isinstance(value, pb.ResponseFormat):
        return value
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return pb.ResponseFormat(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema") or {}
        schema = spec.get("schema")
        if schema is None:
            raise ValueError("response_format json_schema needs json_schema.schema")
        return pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(
            name=spec.get("name") or "", schema_json=schema if isinstance(schema, str) else json.dumps(schema),
            strict=bool(spec.get("strict", False)), description=spec.get("description") or ""))
    if kind in ("regex", "grammar"):
        text = value.get(kind)
        if not isinstance(text, str):
            raise ValueError(f"response_format of type {kind!r} needs the {kind} as a string under {kind!r}")
        return pb.ResponseFormat(**{kind: text})
    raise ValueError(f"response_format type must be one of text, json_object, json_schema, regex, grammar; "
                     f"got {kind!r}")


def tool_choice_message(value: str | Mapping[str, Any] | pb.ToolChoice | None) -> pb.ToolChoice | None:
    """"auto" | "none" | "required" | {"type": "function", "function": {"name": ...}} | a tool name -> ToolChoice."""
    if value is None or isinstance(value, pb.ToolChoice):
        return value
    if isinstance(value, str):
        modes = {"auto": pb.ToolChoice.MODE_AUTO, "none": pb.ToolChoice.MODE_NONE,
                 "required": pb.ToolChoice.MODE_REQUIRED}
        return pb.ToolChoice(mode=modes[value]) if value in modes else pb.ToolChoice(name=value)
    name = (value.get("function") or value).get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool_choice {dict(value)!r} names no tool (expected {{'type': 'function', "
                         "'function': {'name': ...}}})")
    return pb.ToolChoice(name=name)


def generate_request(prompt: str | Sequence[int], *, request_id: str = "", priority: int = 0,
                     timeout_seconds: float | None = None, adapter: str | None = None,
                     **sampling: Any) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, sampling=sampling_params(**sampling), priority=priority)
    if adapter is not None:
        req.adapter = adapter
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    if timeout_seconds is not None:
        req.timeout_seconds = timeout_seconds
    return req


def chat_request(messages: str | Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
                 reasoning_effort: str | None = None, builtin_tools: Sequence[str] = (), request_id: str = "",
                 priority: int = 0, timeout_seconds: float | None = None,
                 response_format: Mapping[str, Any] | pb.ResponseFormat | None = None,
                 tool_choice: str | Mapping[str, Any] | pb.ToolChoice | None = None,
                 max_reasoning_tokens: int | None = None, adapter: str | None = None,
                 **sampling: Any) -> pb.ChatRequest:
    if isinstance(builtin_tools, str):  # "browser" would otherwise become ["b", "r", ...]
        builtin_tools = [builtin_tools]
    req = pb.ChatRequest(request_id=request_id, messages=chat_messages(messages), tools=function_tools(tools),
                         reasoning_effort=_EFFORT[reasoning_effort], sampling=sampling_params(**sampling),
                         priority=priority, builtin_tools=list(builtin_tools))
    if timeout_seconds is not None:
        req.timeout_seconds = timeout_seconds
    rf = response_format_message(response_format)
    if rf is not None:
        req.response_format.CopyFrom(rf)
    choice = tool_choice_message(tool_choice)
    if choice is not None:
        req.tool_choice.CopyFrom(choice)
    if max_reasoning_tokens is not None:
        req.max_reasoning_tokens = max_reasoning_tokens
    if adapter is not None:
        req.adapter = adapter
    return req


def tokenize_request(text: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None, *,
                     tools: Sequence[Mapping[str, Any]] | None = None,
                     reasoning_effort: str | None = None) -> pb.TokenizeRequest:
    if (text is None) == (messages is None):
        raise ValueError("give text or messages")
    if text is not None:
        return pb.TokenizeRequest(text=text)
    return pb.TokenizeRequest(chat=pb.ChatMessages(messages=chat_messages(messages)), tools=function_tools(tools),
                              reasoning_effort=_EFFORT[reasoning_effort])


# ------------------------------------------------------------------------------------------------ channels
def _token(token: str | None) -> str | None:
    if token is None:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    return token or None


def _options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]


def _credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    return grpc.ssl_channel_credentials(root_certificates) if tls or root_certificates else None


class _ClientBase:
    """The channel, bearer-token metadata and stubs that both clients set up the same way."""

    _channels: Any  # the module that opens the channel: grpc (blocking) or grpc.aio; the stubs serve both

    def __init__(self, address: str, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.address = address
        self.timeout = timeout
        creds = _credentials(tls, root_certificates)
        opts = _options(max_message_bytes)
        self.channel = (self._channels.secure_channel(address, creds, opts) if creds else
                        self._channels.insecure_channel(address, opts))
        token = _token(token)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)


class Client(_ClientBase):
    """Blocking client (one channel)."""

    _channels = grpc

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, prompt: str | Sequence[int], **options: Any) -> Iterator[pb.GenerateResponse]:
        return self.inference.Generate(generate_request(prompt, **options), timeout=self.timeout,
                                       metadata=self.metadata)

    def chat(self, messages: str | Sequence[Mapping[str, Any]], **options: Any) -> Iterator[pb.ChatResponse]:
        return self.inference.Chat(chat_request(messages, **options), timeout=self.timeout, metadata=self.metadata)

    def tokenize(self, text: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
                 **options: Any) -> list[int]:
        return list(self.inference.Tokenize(tokenize_request(text, messages, **options), timeout=self.timeout,
                                            metadata=self.metadata).token_ids)

    def model_info(self) -> pb.ModelInfo:
        return self.inference.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def list_replicas(self) -> list[pb.ReplicaInfo]:
        return list(self.admin.ListReplicas(pb.ListReplicasRequest(), timeout=self.timeout,
                                            metadata=self.metadata).replicas)

    def load_lora(self, name: str, path: str) -> pb.LoraAdapterResponse:
        """Register the PEFT adapter directory `path` (as the replicas see it) as `name` on every replica."""
        return self.admin.LoadLoraAdapter(pb.LoadLoraAdapterRequest(name=name, path=path), timeout=self.timeout,
                                          metadata=self.metadata)

    def unload_lora(self, name: str) -> pb.LoraAdapterResponse:
        return self.admin.UnloadLoraAdapter(pb.UnloadLoraAdapterRequest(name=name), timeout=self.timeout,
                                            metadata=self.metadata)

    def list_loras(self) -> pb.ListLoraAdaptersResponse:
        return self.admin.ListLoraAdapters(pb.ListLoraAdaptersRequest(), timeout=self.timeout, metadata=self.metadata)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """'SERVING' / 'NOT_SERVING' / 'SERVICE_UNKNOWN' of a grpc.health.v1 service ('' is the server)."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class AsyncClient(_ClientBase):
    """asyncio client (one grpc.aio channel); create it inside the running loop."""

    _channels = grpc.aio

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def generate(self, prompt: str | Sequence[int], **options: Any) -> AsyncIterator[pb.GenerateResponse]:
        return self.inference.Generate(generate_request(prompt, **options), timeout=self.timeout,
                                       metadata=self.metadata)

    def chat(self, messages: str | Sequence[Mapping[str, Any]], **options: Any) -> AsyncIterator[pb.ChatResponse]:
        return self.inference.Chat(chat_request(messages, **options), timeout=self.timeout, metadata=self.metadata)

    async def tokenize(self, text: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
                       **options: Any) -> list[int]:
        response = await self.inference.Tokenize(tokenize_request(text, messages, **options), timeout=self.timeout,
                                                 metadata=self.metadata)
        return list(response.token_ids)

    async def model_info(self) -> pb.ModelInfo:
        return await self.inference.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout,
                                                 metadata=self.metadata)

    async def list_replicas(self) -> list[pb.ReplicaInfo]:
        response = await self.admin.ListReplicas(pb.ListReplicasRequest(), timeout=self.timeout,
                                                 metadata=self.metadata)
        return list(response.replicas)

    async def load_lora(self, name: str, path: str) -> pb.LoraAdapterResponse:
        return await self.admin.LoadLoraAdapter(pb.LoadLoraAdapterRequest(name=name, path=path),
                                                timeout=self.timeout, metadata=self.metadata)

    async def unload_lora(self, name: str) -> pb.LoraAdapterResponse:
        return await self.admin.UnloadLoraAdapter(pb.UnloadLoraAdapterRequest(name=name), timeout=self.timeout,
                                                  metadata=self.metadata)

    async def list_loras(self) -> pb.ListLoraAdaptersResponse:
        return await self.admin.ListLoraAdapters(pb.ListLoraAdaptersRequest(), timeout=self.timeout,
                                                 metadata=self.metadata)

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        response = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
