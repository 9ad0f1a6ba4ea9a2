"""The router's core, the same for every transport: replicas, validation, admission, dispatch, draining.

`RouterCore(backend, settings, metrics)` holds what a call needs and nothing of how it arrived. The gRPC service
(`cluster.router.grpc_service`) and the OpenAI HTTP app (`cluster.router.openai_http`) are thin translations on top
of it: a gptoss.v1 request message in, its response messages out, `RouterError` (a transport-neutral code) for every
failure.

Per Generate / Chat call (`generate_events`, `chat_events`): validate and render (harmony) ->
`dispatch.replica_deltas` (admission: a bounded priority queue, RESOURCE_EXHAUSTED with a retry hint when full; the
backend's replica choice, one retry before the first token, the deadline, the stream interval) -> detokenize, stop
strings, harmony channels (`streaming`) -> response messages. Deadlines (the caller's, and the request's
`timeout_seconds`) travel to the replica, which aborts the request when they pass; the router enforces them too. A
caller that goes away (closing the generator) cancels the replica's request, which frees its KV blocks. With a
`tracer` that is on, each call records its spans (`cluster.router.spans`), continuing the caller's W3C context
(`trace_context`: from gRPC metadata or HTTP headers) and handing its own to the replica in the request.

Replicas are polled every `health_interval_s` (`refresh`): readiness, the model's facts, admission capacity, the LoRA
adapters each one serves; each poll tells `on_ready` whether a replica is ready (the gRPC health service follows it).

LoRA adapters: a request names one (`adapter`; the served model's name or nothing: the base model). The router knows
which ready replica serves which adapter (from the last poll, and at once from its own `load_lora` / `unload_lora`,
which apply to every replica and are recorded for the replicas that start later, `Backend.adapter_registry`): an
adapter none serves is NOT_FOUND, and a request is routed among the replicas that serve its adapter (the others are
excluded, `ReplicaRequest.exclude_replicas`). Its prompt's prefix hashes are salted with the adapter
(`workers.block_hash.lora_salt`), as the engine's prefix cache keys them, so prefix affinity sends it where its own
cached blocks are. `drain()` refuses new calls (UNAVAILABLE) and waits, bounded, for the running ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

from gptoss_cluster.cluster.contract import (
    Delta,
    ErrorCode,
    LoadLora,
    LoraAdapter,
    LoraResult,
    ModelInfo,
    ReplicaError,
    ReplicaState,
    ReplicaStats,
    UnloadLora,
    lora_name_problem,
)
from gptoss_cluster.cluster.router.admission import Admission
from gptoss_cluster.cluster.router.backend import Backend, BackendError
from gptoss_cluster.cluster.router.dispatch import replica_deltas
from gptoss_cluster.cluster.router.errors import RouterError
from gptoss_cluster.cluster.router.requests import Prepared, Validator
from gptoss_cluster.cluster.router.responses import FINISH, ChatLogprobs, chat_response, logprobs, usage
from gptoss_cluster.cluster.router.settings import RouterSettings
from gptoss_cluster.cluster.router.spans import RequestTrace
from gptoss_cluster.cluster.router.streaming import ChatDelta, ChatStream, TextStream, chat_finish_reason
from gptoss_cluster.cluster.tracing import Tracer
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from gptoss_cluster.workers.block_hash import lora_salt, prefix_hashes

__all__ = ["PREFIX_BLOCKS", "RouterCore"]

logger = logging.getLogger("gptoss.router")

PREFIX_BLOCKS = 32  # leading KV blocks hashed for replica affinity (512 tokens at block size 16)
_CANCEL_SLACK_S = 0.005  # a call cancelled this close to its deadline was cancelled by the deadline
_OK = "OK"  # the metrics' status of a call that succeeded


class RouterCore:
    """What every call goes through, over one `Backend`; see the module docstring."""

    def __init__(self, backend: Backend, settings: RouterSettings | None = None, metrics: Any = None,
                 tracer: Tracer | None = None) -> None:
        self.backend = backend
        self.settings = settings or RouterSettings()
        self.metrics = metrics
        # None unless spans are exported: then a call's tracing costs one `is None` check
        self.tracer = tracer if tracer is not None and tracer.enabled else None
        self.admission = Admission(self.settings.max_queued_requests, capacity=0)
        self.draining = False
        self.replicas: list[ReplicaStats] = []
        self.ready_replicas = 0
        self.model: ModelInfo | None = None  # the served model's facts (a replica's, under the served name)
        self.adapters: dict[str, LoraAdapter] = {}  # the LoRA adapters some ready replica serves, by name
        self._adapter_replicas: dict[str, set[str]] = {}  # adapter name -> ids of the ready replicas serving it
        self.on_ready: Callable[[bool], Awaitable[None]] | None = None  # told after every poll, unless draining
        self._validator: Validator | None = None
        self._inflight = 0  # calls running (any method): drain waits for them
        self._idle = asyncio.Event()
        self._idle.set()
        self._poll_task: asyncio.Task[None] | None = None
        self._polled = asyncio.Event()
        if metrics is not None:
            self.admission.on_change = self._record_queue

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start polling the replicas (inside the event loop)."""
        if self._poll_task is None:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_loop())

    async def stop(self) -> None:
        """Stop polling."""
        task, self._poll_task = self._poll_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Wait until a replica is ready and the model's facts are known."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_replicas and self._validator is not None:
                return True
            self._polled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._polled.wait(), max(0.01, deadline - time.monotonic()))
        return False

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new calls and wait for the running ones; True if all finished within the timeout."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout_s if timeout_s is None else timeout_s)
        return self._idle.is_set()

    @property
    def inflight(self) -> int:
        return self._inflight

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
        """Poll the replicas: readiness, the model's facts, admission capacity, replica metrics."""
        stats = await self.backend.replica_stats()
        ready = [r for r in stats if r.state is ReplicaState.RUNNING]
        self.replicas = stats
        self._set_adapters(ready)
        if ready and self._validator is None:
            try:
                self._set_model(await self.backend.model_info())
            except BackendError as exc:
                logger.warning("model info unavailable yet: %s", exc)
        self.ready_replicas = len(ready) if self._validator is not None else 0
        per = self.settings.max_inflight_per_replica
        self.admission.set_capacity(sum(per or r.max_ongoing_requests for r in ready) if self.ready_replicas else 0)
        if not self.draining and self.on_ready is not None:
            await self.on_ready(bool(self.ready_replicas))
        if self.metrics is not None:
            counts: dict[str, int] = {}
            for r in stats:
                counts[r.state.value.lower()] = counts.get(r.state.value.lower(), 0) + 1
            self.metrics.set_replica_states(counts)

    def _set_model(self, info: ModelInfo) -> None:
        if self.settings.served_model_name:
            info = dataclasses.replace(info, model=self.settings.served_model_name)
        self.model = info
        self._validator = Validator(info, sampling_defaults=self.settings.sampling_defaults,
                                    default_reasoning_effort=self.settings.default_reasoning_effort)

    def _set_adapters(self, ready: list[ReplicaStats]) -> None:
        on: dict[str, set[str]] = {}
        adapters: dict[str, LoraAdapter] = {}
        for replica in ready:
            for adapter in replica.adapters:
                on.setdefault(adapter.name, set()).add(replica.replica_id)
                adapters.setdefault(adapter.name, adapter)
        self.adapters, self._adapter_replicas = adapters, on

    def _record_queue(self, admission: Admission) -> None:
        self.metrics.set_router_queue(router=self.settings.router_name, queued=admission.queued,
                                      capacity=admission.max_queued)

    def validator(self) -> Validator:
        if self._validator is None:
            raise RouterError(ErrorCode.UNAVAILABLE, "no model replica is ready yet")
        return self._validator

    @property
    def model_name(self) -> str:
        return self.model.model if self.model is not None else self.settings.served_model_name

    # ------------------------------------------------------------------------------------------------ calls
    def _enter(self) -> None:
        if self.draining:
            raise RouterError(ErrorCode.UNAVAILABLE, "the server is draining; retry on another router")
        self._inflight += 1
        self._idle.clear()

    def _exit(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """A call that is neither Generate nor Chat (Tokenize, GetModelInfo): refused while draining, counted."""
        self._enter()
        try:
            yield
        finally:
            self._exit()

    def _observed(self, method: str, protocol: str, deadline: float | None,
                  trace_context: Mapping[str, str] | None) -> _Call:
        timer = _NULL_TIMER if self.metrics is None else self.metrics.request_timer(method, protocol)
        if self.tracer is None:
            return _Call(self, timer, deadline)
        trace = RequestTrace(self.tracer, timer, method, protocol, trace_context)
        return _Call(self, trace, deadline, trace)  # the trace stands in front of the timer

    async def tokenize(self, request: pb.TokenizeRequest) -> list[int]:
        with self.call():
            return self.validator().tokenize(request)

    async def list_replicas(self) -> list[ReplicaStats]:
        """Every replica's statistics, asked now (answered while draining too: operators watch a drain with it)."""
        return sorted(await self.backend.replica_stats(), key=lambda r: r.replica_id)

    # ------------------------------------------------------------------------------------------------ LoRA adapters
    def adapter_list(self) -> list[LoraAdapter]:
        """The adapters some ready replica serves, by name, each with the served model as its parent."""
        return [dataclasses.replace(a, parent=self.model_name) for _, a in sorted(self.adapters.items())]

    async def load_lora(self, name: str, path: str) -> tuple[LoraAdapter, list[LoraResult]]:
        """Register the PEFT adapter at `path` as `name` on every replica: (the adapter, each replica's result).
        Raises RouterError: INVALID_ARGUMENT (a bad name, the served model's name, or every replica refused it),
        UNAVAILABLE (no replica answered)."""
        with self.call():
            problem = lora_name_problem(name)
            if problem is not None:
                raise RouterError(ErrorCode.INVALID_ARGUMENT, f"name: {problem}")
            if name == self.model_name:
                raise RouterError(ErrorCode.INVALID_ARGUMENT, f"name: {name!r} is the served model's name")
            if not path:
                raise RouterError(ErrorCode.INVALID_ARGUMENT, "path is empty: give the PEFT adapter directory")
            results = await self.backend.load_lora(LoadLora(name, path))
            adapter = next((r.adapter for r in results if r.ok and r.adapter is not None), None)
            _raise_if_none_did(results, "load the adapter")
            assert adapter is not None  # a replica that loaded it says what it loaded
            await self._record_adapter(name, path)  # after the broadcast: a replica syncing meanwhile never races it
            for r in results:
                if r.ok:
                    self._adapter_replicas.setdefault(name, set()).add(r.replica_id)
            self.adapters[name] = adapter
            return dataclasses.replace(adapter, parent=self.model_name), results

    async def unload_lora(self, name: str) -> list[LoraResult]:
        """Forget the adapter on every replica: each replica's result. Raises RouterError: NOT_FOUND (no replica has
        it), UNAVAILABLE (no replica answered)."""
        with self.call():
            results = await self.backend.unload_lora(UnloadLora(name))
            if any(r.ok or (r.error is not None and r.error.code is ErrorCode.NOT_FOUND) for r in results):
                await self._record_adapter(name, None)  # the replicas answered: none shall have it, later ones too
            _raise_if_none_did(results, "unload the adapter")
            self.adapters.pop(name, None)  # requests that arrive from now on are NOT_FOUND, whatever the next poll
            self._adapter_replicas.pop(name, None)
            return results

    async def _record_adapter(self, name: str, path: str | None) -> None:
        """Record an adapter change for the replicas that start later (`Backend.adapter_registry`); a registry that
        fails is logged: the replicas running now already have the change."""
        registry = self.backend.adapter_registry
        if registry is None:
            return
        try:
            await registry.record(name, path)
        except Exception as exc:
            logger.warning("the LoRA adapter registry did not record %s of %r: %s",
                           "the unload" if path is None else "the load", name, exc)

    async def generate_events(self, request: pb.GenerateRequest, *, timeout: float | None = None,
                              protocol: str = "grpc", trace_context: Mapping[str, str] | None = None
                              ) -> AsyncIterator[pb.GenerateResponse]:
        """The body of Generate: GenerateResponse deltas, the last one with finish_reason and usage. `timeout`:
        seconds the caller grants (with the request's own timeout_seconds, the smaller wins); `trace_context`: the
        caller's W3C trace context (`traceparent`, `tracestate`), continued when tracing. Raises RouterError;
        closing it early cancels the request on its replica."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._observed("Generate", protocol, deadline, trace_context) as call:
            prep = call.validated(self.validator().generate(request))
            trace = call.trace
            text = TextStream(prep.stop, prep.min_tokens)
            # per token: locals instead of attribute lookups, and no empty logprobs list for every message
            feed, count, request_id, response = text.feed, call.timer.tokens, prep.request_id, pb.GenerateResponse
            async with contextlib.aclosing(self.replica_stream(prep, _left(deadline), call.timer, trace)) as deltas:
                async for delta in deltas:
                    finish = delta.finish_reason
                    drop_last = finish == "stop" and isinstance(delta.stop_reason, int)
                    kept, piece = feed(delta.token_ids, drop_last=drop_last)
                    count(len(kept))
                    if text.stopped:
                        finish = "stop"
                    if finish:
                        piece += text.finish()
                        if trace is not None:
                            trace.answered(finish, text.num_tokens, delta.usage)
                        yield response(
                            request_id=request_id, token_ids=kept, text=piece,
                            logprobs=logprobs(delta.logprobs, len(kept)), finish_reason=FINISH[finish],
                            usage=usage(len(prep.prompt_token_ids), text.num_tokens, delta.usage))
                        return
                    if kept or piece:
                        if delta.logprobs:
                            yield response(request_id=request_id, token_ids=kept, text=piece,
                                           logprobs=logprobs(delta.logprobs, len(kept)))
                        else:
                            yield response(request_id=request_id, token_ids=kept, text=piece)

    async def chat_events(self, request: pb.ChatRequest, *, timeout: float | None = None, protocol: str = "grpc",
                          trace_context: Mapping[str, str] | None = None) -> AsyncIterator[pb.ChatResponse]:
        """The body of Chat: ChatResponse deltas (with the logprobs of their token_ids when the request asked for
        sampling.logprobs), the last one with finish_reason and usage. Arguments and errors as `generate_events`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._observed("Chat", protocol, deadline, trace_context) as call:
            prep = call.validated(self.validator().chat(request))
            trace = call.trace
            chat = ChatStream(stops=prep.stop, min_tokens=prep.min_tokens)
            chat_logprobs = ChatLogprobs()
            finish, replica_usage, pieces = None, None, []
            async with contextlib.aclosing(self.replica_stream(prep, _left(deadline), call.timer, trace)) as deltas:
                async for delta in deltas:
                    before = chat.num_tokens
                    pieces = chat.feed(delta.token_ids)
                    call.timer.tokens(chat.num_tokens - before)
                    chat_logprobs.push(delta.logprobs, chat.num_tokens - before)
                    if chat.stopped:
                        finish = "stop"
                    elif delta.finish_reason:
                        finish = chat_finish_reason(delta.finish_reason, delta.stop_reason)
                    replica_usage = delta.usage or replica_usage
                    if finish:
                        pieces += chat.finish()
                        break
                    for piece in pieces:
                        yield chat_response(prep.request_id, piece, chat_logprobs)
            last = pieces.pop() if pieces else ChatDelta(None)
            for piece in pieces:
                yield chat_response(prep.request_id, piece, chat_logprobs)
            final = chat_response(prep.request_id, last, chat_logprobs)
            final.finish_reason = FINISH[finish or "stop"]
            final.usage.CopyFrom(usage(len(prep.prompt_token_ids), chat.num_tokens, replica_usage,
                                       chat.reasoning_tokens))
            if trace is not None:
                trace.answered(finish or "stop", chat.num_tokens, replica_usage, chat.reasoning_tokens)
            yield final

    def replica_stream(self, prep: Prepared, timeout: float | None, timer: Any,
                       trace: RequestTrace | None = None) -> AsyncIterator[Delta]:
        """The request's deltas from a replica, after admission (`dispatch.replica_deltas`). `timeout`: the caller's
        seconds left (None: no bound but the request's own); `trace`: the call's spans, when tracing. Closing the
        iterator cancels the request on its replica. A plain method returning the dispatch generator: one generator
        hop less per delta."""
        if prep.timeout_s is not None and (timeout is None or prep.timeout_s < timeout):
            timeout = prep.timeout_s
        if not self.ready_replicas or self.model is None:
            raise RouterError(ErrorCode.UNAVAILABLE, "no model replica is ready")
        exclude: tuple[str, ...] = ()
        if prep.lora is not None:
            serving = self._adapter_replicas.get(prep.lora)
            if not serving:
                raise RouterError(ErrorCode.NOT_FOUND, f"the LoRA adapter {prep.lora!r} is not loaded; loaded: "
                                  f"{', '.join(sorted(self.adapters)) or 'none'}")
            exclude = tuple(r.replica_id for r in self.replicas if r.replica_id not in serving)
        hashes = tuple(prefix_hashes(prep.prompt_token_ids, self.model.kv_block_size, PREFIX_BLOCKS,
                                     lora_salt(prep.lora)))
        request = prep.replica_request(None if timeout is None else time.time() + timeout, hashes,
                                       None if trace is None else trace.context(), exclude)
        return replica_deltas(self.backend, request, self.admission, timeout_s=timeout,
                              stream_interval=self.settings.stream_interval, on_dispatch=timer.dispatched,
                              on_accepted=None if trace is None else trace.accepted)


def _raise_if_none_did(results: list[LoraResult], what: str) -> None:
    """Nothing when a replica succeeded; else RouterError with the replicas' common code (UNAVAILABLE when none
    answered, or they disagree)."""
    if any(r.ok for r in results):
        return
    if not results:
        raise RouterError(ErrorCode.UNAVAILABLE, f"no model replica answered: could not {what}")
    errors = [r.error for r in results if r.error is not None]
    codes = {e.code for e in errors}
    code = codes.pop() if len(codes) == 1 else ErrorCode.UNAVAILABLE
    raise RouterError(code, _first_error(errors))


def _first_error(errors: list[ReplicaError]) -> str:
    messages = list(dict.fromkeys(e.message for e in errors))
    return messages[0] if len(messages) == 1 else "; ".join(messages)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class _Call:
    """One Generate / Chat call, whatever its transport, as a context manager: counts it in flight (drain) and
    records its metrics with the status it ended with (a caller that went away: CANCELLED, or DEADLINE_EXCEEDED when
    that was its deadline), and ends its span with it when tracing (`trace`). A class rather than a generator-based
    context manager: it runs on every call."""

    __slots__ = ("core", "timer", "prompt_tokens", "deadline", "trace")

    def __init__(self, core: RouterCore, timer: Any, deadline: float | None, trace: RequestTrace | None = None
                 ) -> None:
        self.core = core
        self.timer = timer
        self.prompt_tokens = 0
        self.deadline = deadline
        self.trace = trace

    def validated(self, prep: Prepared) -> Prepared:
        """The call's request as validated: its prompt counts in the metrics and its span learns the model (its LoRA
        adapter's name, when it names one, as the OpenAI API reports it)."""
        self.prompt_tokens = len(prep.prompt_token_ids)
        if self.trace is not None:
            self.trace.validated(prep, prep.lora or self.core.model_name)
        return prep

    def __enter__(self) -> _Call:
        try:
            self.core._enter()
        except RouterError as exc:
            self.timer.finish(exc.code, prompt_tokens=self.prompt_tokens)
            if self.trace is not None:
                self.trace.end(exc.code, exc)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.core._exit()
        code: Any = _OK
        if isinstance(exc, RouterError):
            code = exc.code
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            late = self.deadline is not None and time.monotonic() >= self.deadline - _CANCEL_SLACK_S
            code = ErrorCode.DEADLINE_EXCEEDED if late else ErrorCode.CANCELLED
        self.timer.finish(code, prompt_tokens=self.prompt_tokens)
        if self.trace is not None:
            self.trace.end(code, exc)


class _NullTimer:
    generated = 0

    def dispatched(self) -> None: ...
    def tokens(self, n: int = 1) -> None: ...
    def finish(self, *_: Any, **__: Any) -> None: ...


_NULL_TIMER = _NullTimer()  # stateless: one for every call made without metrics
