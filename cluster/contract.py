"""The typed messages between the router and the model replicas: the one place their conversation is written down.

Both sides import this module and nothing of each other (`cluster/router/` never imports `cluster/replica.py`, nor
the other way round). Every message is a dataclass: a field that one side renames or forgets fails where the message
is built (TypeError), never as a silent zero where it is read. They cross processes pickled (Serve's gRPC transport
between deployments, or Ray actor tasks); `ReplicaLoad` also has a strict dict form, for Serve's routing stats.
A message is never changed once sent (`dataclasses.replace` makes a changed copy); the per-request and per-token
ones are not frozen only because a frozen dataclass takes several times as long to build.

A request's life, as the router sees it:

    router -> replica   ReplicaRequest                      the validated request (ModelReplica.submit)
    replica -> router   Accepted                            first, the answer to that call: the replica took it
                        Delta, Delta, ...                   its tokens, on the router's token channel; the last one
                                                            has a finish_reason (and usage); `Delta.merge` joins two
                        or ReplicaError                     why it ended without one (a code and a message)

and, polled: `ReplicaStats` (ListReplicas, readiness, admission capacity, the LoRA adapters it serves), `ModelInfo`
(the served model's facts) and `ReplicaLoad` (cheap load figures for the request router). LoRA adapters are loaded and
unloaded at run time on every replica with `LoadLora` / `UnloadLora`, each replica answering a `LoraResult`; a request
selects one by name (`ReplicaRequest.lora`), checked with `lora_name_problem`. The token channel
(`cluster/token_channel.py`) carries a router's deltas from a replica: `ChannelRoute` says where a request's go,
`ChannelOpen` opens a router's channel to a replica, which answers with batches of `(key, Delta | ReplicaError)` (or
`Misrouted`).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from gptoss_cluster.workers.constraint import Constraint
from gptoss_cluster.workers.sampling import SamplingParams

__all__ = ["MAX_LORA_NAME", "REPLICA_TRANSPORTS", "Accepted", "ChannelBatch", "ChannelOpen", "ChannelRoute",
           "ChannelStats", "Delta", "ErrorCode", "LoadLora", "LoraAdapter", "LoraResult", "Misrouted", "ModelInfo",
           "ReplicaError", "ReplicaEvent", "ReplicaLoad", "ReplicaRequest", "ReplicaState", "ReplicaStats",
           "TokenLogprob", "UnloadLora", "Usage", "from_dict", "lora_name_problem", "request_cost"]

# How a router's per-request and token-channel calls reach the replicas (RouterSettings.replica_transport): Serve's
# gRPC transport between deployments, or Ray actor tasks (cluster.router.serve_backend.ServeBackend).
REPLICA_TRANSPORTS = ("grpc", "ray")

# A LoRA adapter's name: what requests select it by (the OpenAI `model`, also in URL paths such as /v1/models/{id}),
# a metrics label and a log field, so it is kept to a safe alphabet (Hugging Face's "org/name" fits).
MAX_LORA_NAME = 128
_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")


class ErrorCode(enum.Enum):
    """Why a request failed, for every transport: named as the gRPC status the router answers with (the HTTP API
    maps the same names to its statuses). A replica uses INVALID_ARGUMENT, DEADLINE_EXCEEDED, UNAVAILABLE and
    INTERNAL; the router adds the rest."""

    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class ReplicaState(enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    UNHEALTHY = "UNHEALTHY"


def request_cost(prompt_tokens: int, max_tokens: int) -> int:
    """The tokens a request may occupy on its replica (prompt + max_tokens): the one load measure of the request
    router, the replica's outstanding tokens and the in-process backend."""
    return prompt_tokens + max_tokens


def lora_name_problem(name: str) -> str | None:
    """Why `name` cannot name a LoRA adapter, or None when it can."""
    if not name:
        return "the adapter name is empty"
    if len(name) > MAX_LORA_NAME:
        return f"the adapter name has {len(name)} characters; at most {MAX_LORA_NAME}"
    if not _LORA_NAME.fullmatch(name):
        return (f"the adapter name {name!r} must start with a letter or digit and hold only letters, digits and "
                f"'.', '_', '-', ':', '/'")
    return None


# ================================================================================================ one request
@dataclass(slots=True)
class ChannelRoute:
    """Where a request's deltas go: the token channel of router `router_id`, under `key` (unique in that router)."""

    router_id: str
    key: int


@dataclass(slots=True)
class ReplicaRequest:
    """A validated request, ready for the engine. `sampling` holds no stop strings (the router applies them to the
    text); `deadline` is wall-clock (time.time()) seconds; `eos_token_ids` None means the model's EOS (a chat sends
    harmony's stop tokens). `prefix_hashes` (the prompt's leading KV-block hashes) and `exclude_replicas` (the
    replicas a retry must avoid, and those that do not serve its adapter) are for the request router; `channel` is set
    by the router's transport; `trace_context` is the W3C trace context (`traceparent`, `tracestate`) of the router's
    span, when tracing; `lora` names the LoRA adapter that runs it (None: the base model)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 0
    deadline: float | None = None
    eos_token_ids: tuple[int, ...] | None = None
    constraint: Constraint | None = None
    prefix_hashes: tuple[bytes, ...] = ()
    exclude_replicas: tuple[str, ...] = ()
    channel: ChannelRoute | None = None
    trace_context: dict[str, str] | None = None
    lora: str | None = None

    @property
    def cost(self) -> int:
        return request_cost(len(self.prompt_token_ids), self.sampling.max_tokens)


@dataclass(slots=True)
class Accepted:
    """The replica took the request (the answer to its own call; deltas follow on the token channel)."""

    replica_id: str


@dataclass(slots=True)
class TokenLogprob:
    """The log-probability of a sampled token and the most likely alternatives at its position: (token id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclass(slots=True)
class Delta:
    """New tokens of one request. The last delta has `finish_reason` ("stop" | "length" | "aborted"), `stop_reason`
    (the stop token id, when one ended it) and `usage`; `logprobs` is None unless the request asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: Usage | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, then: Delta) -> Delta:
        """This delta followed by `then` as one: token ids and logprobs concatenated, the rest (finish and stop
        reason, usage) from `then`. The replica merges what queued up behind a slow reader, the router what it holds
        back for its stream interval; the result is the same as reading them one by one."""
        if self.logprobs is None and then.logprobs is None:
            logprobs = None
        else:
            logprobs = [*(self.logprobs or ()), *(then.logprobs or ())]
        return Delta([*self.token_ids, *then.token_ids], logprobs, then.finish_reason, then.stop_reason, then.usage)


@dataclass(slots=True)
class ReplicaError:
    """The request ended on the replica without finishing: INVALID_ARGUMENT (the engine refused it), NOT_FOUND (its
    LoRA adapter is not loaded there), DEADLINE_EXCEEDED, UNAVAILABLE (the replica is draining, or failed) or
    INTERNAL."""

    code: ErrorCode
    message: str


ReplicaEvent = Accepted | Delta | ReplicaError


# ================================================================================================ the token channel
@dataclass(frozen=True, slots=True)
class ChannelOpen:
    """The argument of a token-channel call: router `router_id` reads its deltas from replica `target_replica`."""

    router_id: str
    target_replica: str


@dataclass(frozen=True, slots=True)
class Misrouted:
    """Serve placed a channel call on another replica than it named: this one (the call ends at once)."""

    replica_id: str


# What a channel yields: first [] (the channel is open), then batches of (channel key, event) in each request's order.
ChannelBatch = list[tuple[int, Delta | ReplicaError]]


@dataclass(frozen=True, slots=True)
class ChannelStats:
    batches: int  # Serve items sent on channels (empty "open" items not counted)
    deltas: int  # request events they carried
    routers: int  # routers connected now


# ================================================================================================ LoRA adapters
@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """A LoRA adapter a replica serves: the name requests select it by, the PEFT directory it was loaded from, its
    rank (the largest over its modules) and `parent`, the served name of the model it adapts."""

    name: str
    path: str
    rank: int
    parent: str


@dataclass(frozen=True, slots=True)
class LoadLora:
    """Register the PEFT adapter at `path` (a directory every replica can read) under `name`."""

    name: str
    path: str


@dataclass(frozen=True, slots=True)
class UnloadLora:
    """Forget the adapter `name` (requests already running with it finish)."""

    name: str


@dataclass(frozen=True, slots=True)
class LoraResult:
    """One replica's answer to `LoadLora` / `UnloadLora`: `error` None when it did it (`adapter`: as loaded), else
    why not (INVALID_ARGUMENT: a bad adapter or name; NOT_FOUND: unloading a name it does not have)."""

    replica_id: str
    error: ReplicaError | None = None
    adapter: LoraAdapter | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ================================================================================================ replica state
@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The served model's facts, from a replica: first what the router checks requests against and hashes prompts
    with, then the rest of what GetModelInfo shows."""

    model: str
    vocab_size: int
    context_length: int
    kv_block_size: int
    eos_token_id: int
    max_ongoing_requests: int
    num_layers: int
    num_experts: int
    experts_per_token: int
    hidden_size: int
    sliding_window: int
    shards_per_replica: int
    adapters: tuple[LoraAdapter, ...] = ()  # the LoRA adapters the replica serves now


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """Cheap load figures of one replica (no call to its shards), for the request router: the tokens its requests may
    still occupy (`request_cost` less what they generated), its engine's running and waiting requests, and the share
    of KV blocks in use. Serve carries them as routing stats, a dict: `to_dict` / `from_dict`."""

    state: ReplicaState
    outstanding_tokens: int
    num_running: int
    num_waiting: int
    kv_usage: float

    def to_dict(self) -> dict[str, Any]:
        return {**_fields(self), "state": self.state.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplicaLoad:
        return from_dict(cls, {**data, "state": ReplicaState(data["state"])} if "state" in data else data)


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """One replica's identity, state and counters since it started (ModelReplica.stats; ListReplicas shows them)."""

    replica_id: str
    state: ReplicaState
    num_shards: int
    max_ongoing_requests: int
    load: ReplicaLoad
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which served from it
    requests_total: int
    tokens_total: int  # tokens generated
    health_error: str | None
    pid: int
    channels: ChannelStats | None = None  # the replica's token channels (set by the Serve deployment)
    adapters: tuple[LoraAdapter, ...] = ()  # the LoRA adapters it serves now (the router routes by them)


_T = TypeVar("_T")


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def from_dict(cls: type[_T], data: Mapping[str, Any]) -> _T:
    """`cls(**data)`, refusing unknown keys and missing ones by name (a renamed field must never read as a default)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    required = {f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(data) - names), sorted(required - set(data))
    if unknown or missing:
        raise ValueError(f"{cls.__name__}: " + "; ".join(
            part for part in (f"unknown field(s) {unknown}" if unknown else "",
                              f"missing field(s) {missing}" if missing else "") if part))
    return cls(**data)
