"""ModelReplica: one copy of the model on G devices, served as a Ray Serve deployment.

`ReplicaCore` is the replica without Serve: an `Engine` over an executor (`make_executor` from workers.engine:
LocalExecutor in-process for one shard, RayExecutor with G ShardWorker actors in the replica's placement group for
G > 1), the streaming `generate`, deadlines, statistics, health and draining. The in-process router backend (tests,
benchmarks) and the Serve deployment `ModelReplica` both drive it.

It speaks `cluster.contract`: `generate(ReplicaRequest)` yields `Accepted` first, then `Delta`s (the last with a
finish reason and usage) or a `ReplicaError`; `stats()`, `load()` and `model_info()` answer `ReplicaStats`,
`ReplicaLoad` and `ModelInfo`; `load_lora(LoadLora)` / `unload_lora(UnloadLora)` answer a `LoraResult`. A
request names its LoRA adapter in `ReplicaRequest.lora`: one the engine does not know is NOT_FOUND. A replica serves
its start-up `lora_modules` with the Admin service's run-time loads and unloads applied (`cluster.lora_registry`:
read before it registers its adapters, then polled), so one that starts later serves the same adapters as the others.
The caller going away (asyncio.CancelledError / GeneratorExit in the generator) or the deadline passing aborts the
engine request at once, which returns its KV blocks to the pool.

With a tracer that is on (`cluster.tracing`, configured by the OTEL_* variables), each request is recorded when it
ends as spans, children of the router's (its W3C context travels in `ReplicaRequest.trace_context`):

    gptoss.replica.request   arrival on the replica -> its end (kind server); event first_token
      engine.queue           waiting in the engine's scheduler until first scheduled
      engine.prefill         first scheduled -> first token
      engine.decode          first token -> finished

with the model, prompt / output / cached tokens, finish reason, replica and preemptions as attributes, and the
replica's error status when it failed. The engine's times come with its last output (`RequestTimes`).

A router does not read these events per request through Serve: `cluster.token_channel.TokenChannels` sends a
request's `Accepted` as the answer to its own call (`submit`) and everything after it on the router's multiplexed
token channel (`channel`), one Serve item per engine step for all of the router's requests on this replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gptoss_cluster.cluster.contract import (
    Accepted,
    Delta,
    ErrorCode,
    LoadLora,
    LoraAdapter,
    LoraResult,
    ModelInfo,
    ReplicaError,
    ReplicaEvent,
    ReplicaLoad,
    ReplicaRequest,
    ReplicaState,
    ReplicaStats,
    TokenLogprob,
    UnloadLora,
    Usage,
    from_dict,
    lora_name_problem,
)
from gptoss_cluster.cluster.lora_registry import AdapterChanges, RayAdapterRegistry
from gptoss_cluster.cluster.token_channel import ReplicaEndpoints, TokenChannels
from gptoss_cluster.cluster.tracing import Attr, Tracer, wall_ns

logger = logging.getLogger("gptoss.replica")


@dataclass
class ReplicaSettings:
    """What one ModelReplica needs (built by cluster.app from the application's arguments)."""

    model: str
    served_model_name: str = ""
    shards_per_replica: int = 1
    device: str = "cpu"
    dtype: str = "bfloat16"
    engine: dict[str, Any] = field(default_factory=dict)
    placement_strategy: str = "STRICT_PACK"
    max_ongoing_requests: int = 256
    stats_interval_s: float = 1.0
    drain_timeout_s: float = 60.0
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    lora_modules: dict[str, str] = field(default_factory=dict)  # LoRA adapters registered at start: name -> path
    max_loras: int = 4  # adapters resident per shard at once (EngineConfig.max_loras)
    max_lora_rank: int = 16  # the largest adapter rank accepted (EngineConfig.max_lora_rank)
    lora_sync_interval_s: float = 2.0  # how often a Serve replica polls the run-time adapter changes (lora_registry)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplicaSettings:
        """Refuses unknown keys by name: a setting renamed on one side must not fall back to its default."""
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_executor(settings: ReplicaSettings, placement_group: Any = None) -> Any:
    """The executor of one replica: `make_executor` (a LocalExecutor in this process for one shard, a RayExecutor
    with G ShardWorkers in bundles 1..G of the replica's placement group otherwise)."""
    from gptoss_cluster.workers.engine.ray_executor import make_executor

    return make_executor(settings.model, num_shards=settings.shards_per_replica, dtype=settings.dtype,
                         device=settings.device, placement_group=placement_group,
                         placement_strategy=settings.placement_strategy,
                         count_expert_tokens=bool(settings.engine.get("count_expert_tokens", True)))


def _short(replica_id: str) -> str:
    """'Replica(id='abc', ...)' or 'app#dep#abc' -> a short label for metrics and logs."""
    return replica_id.rsplit("#", 1)[-1]


def _logprobs(items: Any) -> list[TokenLogprob] | None:
    if items is None:
        return None
    return [TokenLogprob(lp.token_id, float(lp.logprob), tuple((int(t), float(p)) for t, p in lp.top))
            for lp in items]


def _delta(out: Any) -> Delta:
    """One engine output (`workers.engine.RequestOutput`) -> one Delta (usage only on the last)."""
    usage = out.usage if out.finished else None
    return Delta(list(out.new_token_ids), _logprobs(out.logprobs), out.finish_reason, out.stop_reason,
                 None if usage is None else Usage(usage.prompt_tokens, usage.completion_tokens,
                                                  usage.cached_prompt_tokens))


def _merged(outs: list[Any]) -> Delta:
    """Engine outputs of one request, oldest first -> one Delta."""
    return functools.reduce(Delta.merge, map(_delta, outs))


def _refusal_code(exc: Exception) -> ErrorCode | None:
    """The status of the engine refusing a request or an adapter: NOT_FOUND for an adapter it does not know
    (LoraNotFoundError), INVALID_ARGUMENT for a bad request or adapter (ValueError, LoraError among them); None when
    `exc` is no refusal (a failure, raised on)."""
    from gptoss_cluster.workers.lora.adapter import LoraNotFoundError

    if isinstance(exc, LoraNotFoundError):
        return ErrorCode.NOT_FOUND
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        return ErrorCode.INVALID_ARGUMENT
    return None


def detached(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `fn` in an empty contextvars context. In a Ray async actor the current request's task id lives in a
    contextvar, and Ray tasks submitted under it are that request's children: cancelling the request (a client that
    went away) would cancel them recursively. The engine loop (which sends every step to the shard actors) and the
    calls that ping the shards must never belong to one request."""
    return contextvars.Context().run(fn, *args, **kwargs)


async def detached_thread(fn: Any, *args: Any) -> Any:
    """`asyncio.to_thread`, but the thread runs in an empty contextvars context (see `detached`)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: contextvars.Context().run(fn, *args))


class ReplicaCore:
    """An engine plus the serving logic around it; see the module docstring for the streaming contract."""

    def __init__(self, settings: ReplicaSettings, *, replica_id: str | None = None, metrics: Any = None,
                 executor: Any = None, model_config: Any = None, placement_group: Any = None,
                 tracer: Tracer | None = None, adapter_changes: AdapterChanges | None = None) -> None:
        """`adapter_changes`: what the Admin service loaded and unloaded since the application started
        (`cluster.lora_registry`), applied over `settings.lora_modules`."""
        from gptoss_cluster.workers.engine import Engine, EngineConfig

        self.settings = settings
        self.replica_id = replica_id or f"local#{uuid.uuid4().hex[:8]}"
        self.label = _short(self.replica_id)
        self.metrics = metrics
        self.tracer = tracer if tracer is not None and tracer.enabled else None  # None: no spans, nothing to do
        self.state = ReplicaState.STARTING
        self.started_at = time.time()
        self.executor = executor if executor is not None else build_executor(settings, placement_group)
        if model_config is None:
            model_config = getattr(self.executor, "model_config", None)
        if model_config is None:
            from gptoss_cluster.workers.checkpoint import open_checkpoint

            with open_checkpoint(settings.model) as reader:
                model_config = reader.config
        self.model_config = model_config
        self.engine = Engine(self.executor, model_config, EngineConfig(
            **settings.engine, max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank))
        changes = adapter_changes or AdapterChanges()
        for name, path in settings.lora_modules.items():  # a bad adapter fails the start, naming it
            if name not in changes.entries:  # unloaded or replaced at run time: the change decides
                self.add_lora(name, path)
        self.adapter_version = -1  # the version of the run-time changes applied (sync_adapters)
        self._applied_changes: Mapping[str, str | None] = {}
        self.sync_adapters(changes)
        self._outstanding: dict[str, int] = {}  # request id -> tokens it may still occupy
        self._live: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stats_task: asyncio.Task[None] | None = None
        self.requests_total = 0
        self.tokens_total = 0
        self.health_error: str | None = None
        self.state = ReplicaState.RUNNING

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start_background(self) -> None:
        """Record engine statistics into the metrics about every `stats_interval_s` (call inside the event loop)."""
        if self.metrics is not None and self._stats_task is None:
            self._stats_task = detached(asyncio.get_running_loop().create_task, self._record_stats_loop())

    async def _record_stats_loop(self) -> None:
        while True:
            try:
                stats = await detached_thread(self.engine.stats)
                self.metrics.record_engine_stats(stats, replica=self.label, shards=self.settings.shards_per_replica)
            except Exception:  # metrics must never take the replica down
                logger.exception("recording engine statistics failed")
            await asyncio.sleep(self.settings.stats_interval_s)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop taking requests and wait (bounded) for the running ones; True if all finished in time."""
        self.state = ReplicaState.DRAINING
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            for request_id in list(self._live):
                self.engine.abort(request_id)
            return False

    async def shutdown(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
            self._stats_task = None
        await self.engine.shutdown()
        with contextlib.suppress(Exception):
            self.executor.shutdown()

    def check_health(self) -> None:
        """Raise when the replica cannot serve: a shard actor died (executor health) or the engine loop broke."""
        checker = getattr(self.executor, "check_health", None)
        try:
            if checker is not None:
                checker()
        except Exception as exc:
            self.state = ReplicaState.UNHEALTHY
            self.health_error = f"executor unhealthy: {exc}"
            raise RuntimeError(self.health_error) from exc
        task = self.engine._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            self.state = ReplicaState.UNHEALTHY
            self.health_error = f"engine loop died: {task.exception()!r}"
            raise RuntimeError(self.health_error)

    # ------------------------------------------------------------------------------------------------ requests
    def generate(self, request: ReplicaRequest) -> AsyncIterator[ReplicaEvent]:
        """Stream one request's events (see the module docstring), recorded as spans when tracing."""
        if self.tracer is None:
            return self._generate(request, None)
        return self._traced(request, self.tracer)

    async def _traced(self, request: ReplicaRequest, tracer: Tracer) -> AsyncIterator[ReplicaEvent]:
        """`_generate`'s events, passed on; its spans recorded once it ends (however it ends)."""
        arrived_ns = time.time_ns()
        last: list[Any] = []  # the engine's last output (with its times), when it finished
        error: ReplicaError | None = None
        events = self._generate(request, last.append)
        try:
            async for event in events:
                if isinstance(event, ReplicaError):
                    error = event
                yield event
        finally:
            await events.aclose()
            if error is None and not last:  # the caller went away first
                error = ReplicaError(ErrorCode.CANCELLED, "the caller cancelled the request")
            try:
                self._record_spans(tracer, request, arrived_ns, last[0] if last else None, error)
            except Exception:  # tracing must never fail a request
                logger.exception("recording the spans of request %s failed", request.request_id)

    def _record_spans(self, tracer: Tracer, request: ReplicaRequest, arrived_ns: int, out: Any,
                      error: ReplicaError | None) -> None:
        """The request's spans (see the module docstring), after the fact, with the engine's times."""
        end_ns = time.time_ns()
        usage, times = (out.usage, out.times) if out is not None else (None, None)
        span = tracer.start("gptoss.replica.request", request.trace_context, {
            Attr.MODEL: request.lora or self.served_name, Attr.RESPONSE_ID: request.request_id,
            Attr.REPLICA: self.replica_id, Attr.INPUT_TOKENS: len(request.prompt_token_ids),
            Attr.MAX_TOKENS: request.sampling.max_tokens,
        }, start_time_ns=arrived_ns, kind="server")
        if not span.recording:  # not sampled (the router's decision, carried in the context)
            return
        if out is not None:
            span.set_many({Attr.FINISH_REASONS: [out.finish_reason],
                           Attr.OUTPUT_TOKENS: None if usage is None else usage.completion_tokens,
                           Attr.CACHED_INPUT_TOKENS: None if usage is None else usage.cached_prompt_tokens})
        if error is not None:
            span.set(Attr.ERROR_TYPE, error.code.name)
            span.error(f"{error.code.name}: {error.message}")
        if times is not None:
            offset = time.time_ns() - time.monotonic_ns()
            marks = [None if t is None else wall_ns(t, offset)
                     for t in (times.arrival, times.first_scheduled, times.first_token, times.finished)]
            for name, start, end in (("engine.queue", marks[0], marks[1]), ("engine.prefill", marks[1], marks[2]),
                                     ("engine.decode", marks[2], marks[3])):
                if start is not None and end is not None:
                    tracer.start(name, span, start_time_ns=start).end(end)
            if marks[2] is not None:
                span.event("first_token", time_ns=marks[2])
            span.set(Attr.PREEMPTIONS, times.preemptions)
        span.end(end_ns)

    async def _generate(self, request: ReplicaRequest,
                        on_finished: Callable[[Any], None] | None) -> AsyncIterator[ReplicaEvent]:
        """The events of `generate`; `on_finished` is given the engine's last output when the request finishes."""
        from gptoss_cluster.workers.lora.adapter import LoraError  # (the engine's module: imported with it)

        yield Accepted(self.replica_id)
        if self.state is not ReplicaState.RUNNING:
            yield ReplicaError(ErrorCode.UNAVAILABLE, f"replica {self.label} is {self.state.value.lower()}")
            return
        request_id = request.request_id
        deadline = request.deadline
        try:
            constraint = request.constraint
            if constraint is not None:  # compiled in a thread: a slow grammar never stalls other requests
                constraint = await detached_thread(self.engine.prepare_constraint, constraint)
            # detached: the engine's step loop (started by the first request) must not be a child of any request
            stream = detached(self.engine.add_request, request.prompt_token_ids, request.sampling, request_id,
                              priority=request.priority, eos_token_ids=request.eos_token_ids, constraint=constraint,
                              lora=request.lora)
        except Exception as exc:
            code = _refusal_code(exc)
            if code is None:
                raise
            yield ReplicaError(code, str(exc))
            return
        self.requests_total += 1
        self._live.add(request_id)
        self._idle.clear()
        self._outstanding[request_id] = request.cost
        finished = False
        # one timer for the deadline, in this task (asyncio.wait_for would start a task per token)
        loop_deadline = None if deadline is None else asyncio.get_running_loop().time() + (deadline - time.time())
        try:
            while True:
                if loop_deadline is not None and asyncio.get_running_loop().time() >= loop_deadline:
                    yield ReplicaError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed on the replica")
                    return
                try:
                    if loop_deadline is None:
                        outs = [await anext(stream)]
                    else:
                        async with asyncio.timeout_at(loop_deadline):
                            outs = [await anext(stream)]
                except TimeoutError:
                    yield ReplicaError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed on the replica")
                    return
                except StopAsyncIteration:
                    finished = True
                    return
                except LoraError as exc:  # its adapter failed to load on the shards: this request fails alone
                    finished = True
                    yield ReplicaError(ErrorCode.INVALID_ARGUMENT, str(exc))
                    return
                except RuntimeError as exc:  # the engine step failed (e.g. a shard died): fail, never hang
                    finished = True
                    self.health_error = str(exc)
                    yield ReplicaError(ErrorCode.UNAVAILABLE, f"replica {self.label} failed: {exc}")
                    return
                # Coalesce: every output the engine already queued for this request goes out in this one delta
                # (each costs a Serve/Ray message; a consumer that fell behind catches up in one). Nothing waits for
                # more, so the first token and a consumer that keeps up see no delay.
                failed: RuntimeError | LoraError | None = None
                while not outs[-1].finished and stream.ready():
                    try:
                        outs.append(await anext(stream))  # returns at once: the output is queued
                    except (RuntimeError, LoraError) as exc:
                        failed = exc
                        break
                delta = _merged(outs)
                n = len(delta.token_ids)
                self.tokens_total += n
                if request_id in self._outstanding:
                    self._outstanding[request_id] = max(0, self._outstanding[request_id] - n)
                if outs[-1].finished:
                    finished = True
                    if on_finished is not None:
                        on_finished(outs[-1])
                yield delta
                if finished:
                    return
                if isinstance(failed, LoraError):
                    finished = True
                    yield ReplicaError(ErrorCode.INVALID_ARGUMENT, str(failed))
                    return
                if failed is not None:
                    finished = True
                    self.health_error = str(failed)
                    yield ReplicaError(ErrorCode.UNAVAILABLE, f"replica {self.label} failed: {failed}")
                    return
        finally:
            if not finished:
                self.engine.abort(request_id)  # cancelled, deadline, or the caller closed the stream
            self._live.discard(request_id)
            self._outstanding.pop(request_id, None)
            if not self._live:
                self._idle.set()

    # ------------------------------------------------------------------------------------------------ LoRA adapters
    def add_lora(self, name: str, path: str) -> LoraAdapter:
        """Register the PEFT adapter at `path` as `name` (the engine reads its config and tensor header only; it loads
        onto the shards when a request first uses it). Raises ValueError (LoraError) naming the problem."""
        problem = lora_name_problem(name)
        if problem is not None:
            raise ValueError(problem)
        if name == self.served_name:
            raise ValueError(f"the adapter name {name!r} is the served model's name")
        return self._adapter(self.engine.add_lora(name, path))

    def load_lora(self, request: LoadLora) -> LoraResult:
        """`add_lora` as a `LoraResult` (the Admin service's LoadLoraAdapter, on every replica)."""
        try:
            return LoraResult(self.replica_id, adapter=self.add_lora(request.name, request.path))
        except Exception as exc:
            code = _refusal_code(exc)
            if code is None:
                raise
            return LoraResult(self.replica_id, ReplicaError(code, str(exc)))

    def unload_lora(self, request: UnloadLora) -> LoraResult:
        """Forget the adapter (requests running with it finish); NOT_FOUND when this replica does not have it."""
        if not self.engine.remove_lora(request.name):
            return LoraResult(self.replica_id, ReplicaError(
                ErrorCode.NOT_FOUND, f"replica {self.label} serves no LoRA adapter named {request.name!r}"))
        return LoraResult(self.replica_id)

    def sync_adapters(self, changes: AdapterChanges) -> list[str]:
        """Apply the run-time adapter changes (`cluster.lora_registry`) that differ from those applied before: load
        an adapter this replica lacks (or holds from another directory), unload one it holds that was unloaded. Only
        entries that changed are acted on, so a broadcast that reached this replica first is left alone. An adapter
        that fails here is logged and skipped (another replica validated it; the router routes by what each replica
        serves): returns those problems."""
        problems: list[str] = []
        held = {a.name: a.path for a in self.adapters()}
        for name, path in changes.entries.items():
            if name in self._applied_changes and self._applied_changes[name] == path:
                continue
            try:
                if path is None:
                    if name in held:
                        self.engine.remove_lora(name)
                    continue
                if name in held and os.path.realpath(held[name]) == os.path.realpath(path):
                    continue
                if name in held:
                    self.engine.remove_lora(name)
                self.add_lora(name, path)
            except Exception as exc:
                problems.append(f"{name} ({path}): {exc}")
                logger.warning("replica %s could not load the LoRA adapter %r from %s: %s", self.label, name, path,
                               exc)
        self._applied_changes = dict(changes.entries)
        self.adapter_version = changes.version
        return problems

    def adapters(self) -> tuple[LoraAdapter, ...]:
        return tuple(self._adapter(info) for info in self.engine.list_loras())

    def _adapter(self, info: Any) -> LoraAdapter:
        """The engine's AdapterInfo -> the contract's LoraAdapter."""
        return LoraAdapter(name=info.name, path=str(info.path), rank=int(info.rank), parent=self.served_name)

    # ------------------------------------------------------------------------------------------------ views
    @property
    def outstanding_tokens(self) -> int:
        return sum(self._outstanding.values())

    def load(self) -> ReplicaLoad:
        """Cheap load figures for the request router (no call to the shards)."""
        scheduler = self.engine.scheduler
        return ReplicaLoad(state=self.state, outstanding_tokens=self.outstanding_tokens,
                           num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
                           kv_usage=self.engine.kv.usage)

    def stats(self) -> ReplicaStats:
        """Identity, state and counters since start, for ListReplicas (the engine's own statistics go to the
        metrics: `start_background`)."""
        engine = self.engine.stats()
        return ReplicaStats(
            replica_id=self.replica_id, state=self.state, num_shards=self.settings.shards_per_replica,
            max_ongoing_requests=self.settings.max_ongoing_requests,
            load=ReplicaLoad(state=self.state, outstanding_tokens=self.outstanding_tokens,
                             num_running=engine.num_running, num_waiting=engine.num_waiting,
                             kv_usage=engine.kv_usage),
            kv_blocks_total=engine.kv_blocks_total, kv_blocks_free=engine.kv_blocks_free,
            prefix_cache_queries=engine.prefix_cache_queries, prefix_cache_hits=engine.prefix_cache_hits,
            requests_total=self.requests_total, tokens_total=self.tokens_total, health_error=self.health_error,
            pid=os.getpid(), adapters=self.adapters())

    @property
    def served_name(self) -> str:
        return self.settings.served_model_name or os.path.basename(os.path.normpath(self.settings.model))

    def model_info(self) -> ModelInfo:
        c = self.model_config
        return ModelInfo(
            model=self.served_name, num_layers=c.num_hidden_layers, num_experts=c.num_experts,
            experts_per_token=c.experts_per_token, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
            context_length=self.engine.max_model_len, sliding_window=c.sliding_window,
            shards_per_replica=self.settings.shards_per_replica, kv_block_size=self.engine.layout.block_size,
            eos_token_id=c.eos_token_id, max_ongoing_requests=self.settings.max_ongoing_requests,
            adapters=self.adapters())


# ================================================================================================ Serve deployment
class ModelReplicaImpl(ReplicaEndpoints):
    """The body of the `ModelReplica` Serve deployment (cluster.app applies the deployment options)."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        import ray
        from ray import serve

        from gptoss_cluster.cluster.metrics import Metrics, start_metrics_server

        self.settings = ReplicaSettings.from_dict(settings)
        replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        self.metrics = Metrics.for_process()
        self.metrics_server = None
        if self.settings.metrics_port:
            self.metrics_server = start_metrics_server(self.settings.metrics_port, self.settings.metrics_host,
                                                       metrics=self.metrics, exist_ok=True)
        placement_group = ray.util.get_current_placement_group()
        # spans over OTLP when this process's OTEL_* variables configure an endpoint (cluster.app copies them into
        # the deployment's runtime_env); off and free otherwise
        self.tracer = Tracer.from_env("replica")
        # the adapters the Admin service loaded / unloaded since the application started (cluster.lora_registry)
        self.adapter_registry = await asyncio.to_thread(RayAdapterRegistry, serve.get_replica_context().app_name)
        changes = await self._adapter_changes(-1)
        # Loading weights is long and blocking: keep the replica's event loop free meanwhile.
        self.core = await asyncio.to_thread(ReplicaCore, self.settings, replica_id=replica_id, metrics=self.metrics,
                                            placement_group=placement_group, tracer=self.tracer,
                                            adapter_changes=changes)
        self.core.start_background()
        # changes made while this replica loaded (a broadcast it missed) and later: polled, applied in order
        self._adapter_sync = detached(asyncio.get_running_loop().create_task, self._sync_adapters_loop())
        self.channels = TokenChannels(replica_id)
        logger.info("replica %s ready: %s on %s x%d", replica_id, self.settings.model, self.settings.device,
                    self.settings.shards_per_replica)

    async def _adapter_changes(self, since: int) -> AdapterChanges | None:
        """The registry's changes after version `since` (None: none, or the registry did not answer: logged)."""
        try:
            return await self.adapter_registry.changes(since)
        except Exception as exc:
            logger.warning("the LoRA adapter registry did not answer: %s", exc)
            return None

    async def _sync_adapters_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lora_sync_interval_s)
            changes = await self._adapter_changes(self.core.adapter_version)
            if changes is not None:
                try:
                    await detached_thread(self.core.sync_adapters, changes)
                except Exception:  # never take the replica down
                    logger.exception("applying the LoRA adapter changes failed")

    async def stats(self) -> ReplicaStats:
        # engine.stats() asks the shard actors for expert counts (a blocking Ray call): keep it off the loop
        stats = await detached_thread(self.core.stats)
        return dataclasses.replace(stats, channels=self.channels.stats())

    async def check_health(self) -> None:
        await detached_thread(self.core.check_health)

    async def record_routing_stats(self) -> dict[str, Any]:
        return self.core.load().to_dict()  # Serve's routing stats are a dict

    async def __del__(self) -> None:
        # Serve has already let in-flight requests finish (graceful_shutdown_timeout_s); stragglers are aborted.
        sync = getattr(self, "_adapter_sync", None)
        if sync is not None:
            sync.cancel()
        core = getattr(self, "core", None)
        if core is not None:
            await core.drain()
            await core.shutdown()
        if getattr(self, "metrics_server", None) is not None:
            self.metrics_server.close()
        if getattr(self, "tracer", None) is not None:
            self.tracer.shutdown()  # exports the spans still batched
