"""ModelReplica: one copy of the model on G devices, served as a Ray Serve deployment.

`ReplicaCore` is the replica without Serve: an `Engine` over an executor (`make_executor` from workers.engine:
LocalExecutor in-process for one shard, RayExecutor with G ShardWorker actors in the replica's placement group for
G > 1), the streaming `generate`, aborts, deadlines, statistics, health and draining. The in-process router backend
(tests, benchmarks) and the Serve deployment `ModelReplica` both drive it.

The streaming contract (`generate(request)` yields dicts):

    request = {"request_id": "r1", "prompt_token_ids": [...], "sampling": {"max_tokens": 16, ...},
               "priority": 0, "deadline": 1767000000.5 | None,      # wall-clock (time.time()) deadline
               "eos_token_ids": [200002, 200012] | None}            # chat: harmony's stop tokens
    {"accepted": True, "replica_id": "..."}                          # first, before any token
    {"token_ids": [..], "logprobs": [..] | None, "finish_reason": None | "stop" | "length" | "aborted",
     "stop_reason": .., "usage": {"prompt_tokens", "completion_tokens", "cached_prompt_tokens"} | None}
    {"error": {"code": "INVALID_ARGUMENT" | "DEADLINE_EXCEEDED" | "UNAVAILABLE" | "INTERNAL", "message": ".."}}

The caller going away (asyncio.CancelledError / GeneratorExit in the generator) or the deadline passing aborts the
engine request at once, which returns its KV blocks to the pool.

The router does not stream these events per request through Serve: `TokenChannels` (below) sends a request's
"accepted" as the answer to its own call (`submit`) and everything after it on the router's multiplexed token
channel (`channel`), one Serve item per engine step for all of the router's requests on this replica.
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
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("gptoss.replica")

STARTING, RUNNING, DRAINING, UNHEALTHY = "STARTING", "RUNNING", "DRAINING", "UNHEALTHY"
# How a router's per-request and token-channel calls reach the replicas (RouterSettings.replica_transport):
# Serve's gRPC transport between deployments, or Ray actor tasks (cluster.router.backend.ServeBackend).
REPLICA_TRANSPORTS = ("grpc", "ray")

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplicaSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

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


def _logprobs(items: Any) -> list[dict[str, Any]] | None:
    if items is None:
        return None
    return [{"token_id": lp.token_id, "logprob": float(lp.logprob), "top": [(int(t), float(p)) for t, p in lp.top]}
            for lp in items]


def _delta(out: Any) -> dict[str, Any]:
    """One engine output -> one streaming item (usage only on the last)."""
    usage = out.usage if out.finished else None
    return {"token_ids": list(out.new_token_ids), "logprobs": _logprobs(out.logprobs),
            "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
            "usage": dataclasses.asdict(usage) if usage is not None else None}


def _item(outs: list[Any]) -> dict[str, Any]:
    """Engine outputs of one request, oldest first -> one streaming item (`merge_deltas` of their deltas)."""
    return functools.reduce(merge_deltas, map(_delta, outs))


def merge_deltas(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Two consecutive deltas of one request as one: token ids and logprobs concatenated, the rest (finish, stop
    reason, usage) from `then`."""
    if first.get("logprobs") is None and then.get("logprobs") is None:
        logprobs = None
    else:
        logprobs = [*(first.get("logprobs") or ()), *(then.get("logprobs") or ())]
    return {**then, "token_ids": [*first["token_ids"], *then["token_ids"]], "logprobs": logprobs}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


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
                 executor: Any = None, model_config: Any = None, placement_group: Any = None) -> None:
        from gptoss_cluster.workers.engine import Engine, EngineConfig

        self.settings = settings
        self.replica_id = replica_id or f"local#{uuid.uuid4().hex[:8]}"
        self.label = _short(self.replica_id)
        self.metrics = metrics
        self.state = STARTING
        self.started_at = time.time()
        self.executor = executor if executor is not None else build_executor(settings, placement_group)
        if model_config is None:
            model_config = getattr(self.executor, "model_config", None)
        if model_config is None:
            from gptoss_cluster.workers.checkpoint import open_checkpoint

            with open_checkpoint(settings.model) as reader:
                model_config = reader.config
        self.model_config = model_config
        self.engine = Engine(self.executor, model_config, EngineConfig(**settings.engine))
        self._outstanding: dict[str, int] = {}  # request id -> tokens it may still occupy
        self._live: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stats_task: asyncio.Task[None] | None = None
        self.requests_total = 0
        self.tokens_total = 0
        self.health_error: str | None = None
        self.state = RUNNING

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
        self.state = DRAINING
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
            self.state = UNHEALTHY
            self.health_error = f"executor unhealthy: {exc}"
            raise RuntimeError(self.health_error) from exc
        task = self.engine._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            self.state = UNHEALTHY
            self.health_error = f"engine loop died: {task.exception()!r}"
            raise RuntimeError(self.health_error)

    # ------------------------------------------------------------------------------------------------ requests
    async def generate(self, request: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's deltas (see the module docstring)."""
        yield {"accepted": True, "replica_id": self.replica_id}
        if self.state != RUNNING:
            yield _error("UNAVAILABLE", f"replica {self.label} is {self.state.lower()}")
            return
        request_id = str(request.get("request_id") or uuid.uuid4().hex)
        deadline = request.get("deadline")
        prompt = request.get("prompt_token_ids") or []
        sampling = dict(request.get("sampling") or {})
        try:
            constraint = request.get("constraint")
            if constraint is not None:  # compiled in a thread: a slow grammar never stalls other requests
                constraint = await detached_thread(self.engine.prepare_constraint, constraint)
            # detached: the engine's step loop (started by the first request) must not be a child of any request
            stream = detached(self.engine.add_request, prompt, sampling, request_id,
                              priority=int(request.get("priority") or 0), eos_token_ids=request.get("eos_token_ids"),
                              constraint=constraint)
        except (ValueError, TypeError, KeyError) as exc:
            yield _error("INVALID_ARGUMENT", str(exc))
            return
        self.requests_total += 1
        self._live.add(request_id)
        self._idle.clear()
        self._outstanding[request_id] = len(prompt) + int(sampling.get("max_tokens") or 16)
        finished = False
        # one timer for the deadline, in this task (asyncio.wait_for would start a task per token)
        loop_deadline = None if deadline is None else asyncio.get_running_loop().time() + (deadline - time.time())
        try:
            while True:
                if loop_deadline is not None and asyncio.get_running_loop().time() >= loop_deadline:
                    yield _error("DEADLINE_EXCEEDED", "the deadline passed on the replica")
                    return
                try:
                    if loop_deadline is None:
                        outs = [await anext(stream)]
                    else:
                        async with asyncio.timeout_at(loop_deadline):
                            outs = [await anext(stream)]
                except TimeoutError:
                    yield _error("DEADLINE_EXCEEDED", "the deadline passed on the replica")
                    return
                except StopAsyncIteration:
                    finished = True
                    return
                except RuntimeError as exc:  # the engine step failed (e.g. a shard died): fail, never hang
                    finished = True
                    self.health_error = str(exc)
                    yield _error("UNAVAILABLE", f"replica {self.label} failed: {exc}")
                    return
                # Coalesce: every output the engine already queued for this request goes out in this one item
                # (each item costs a Serve/Ray message; a consumer that fell behind catches up in one). Nothing
                # waits for more, so the first token and a consumer that keeps up see no delay.
                failed: RuntimeError | None = None
                while not outs[-1].finished and stream.ready():
                    try:
                        outs.append(await anext(stream))  # returns at once: the output is queued
                    except RuntimeError as exc:
                        failed = exc
                        break
                item = _item(outs)
                n = len(item["token_ids"])
                self.tokens_total += n
                if request_id in self._outstanding:
                    self._outstanding[request_id] = max(0, self._outstanding[request_id] - n)
                if outs[-1].finished:
                    finished = True
                yield item
                if finished:
                    return
                if failed is not None:
                    finished = True
                    self.health_error = str(failed)
                    yield _error("UNAVAILABLE", f"replica {self.label} failed: {failed}")
                    return
        finally:
            if not finished:
                self.engine.abort(request_id)  # cancelled, deadline, or the caller closed the stream
            self._live.discard(request_id)
            self._outstanding.pop(request_id, None)
            if not self._live:
                self._idle.set()

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    # ------------------------------------------------------------------------------------------------ views
    @property
    def outstanding_tokens(self) -> int:
        return sum(self._outstanding.values())

    def stats(self) -> dict[str, Any]:
        """Engine statistics (counters since start) + identity and state, for ListReplicas and metrics."""
        stats = dataclasses.asdict(self.engine.stats())
        stats.pop("expert_counts", None)
        stats.update(replica_id=self.replica_id, state=self.state, num_shards=self.settings.shards_per_replica,
                     outstanding_tokens=self.outstanding_tokens, live_requests=len(self._live),
                     requests_total=self.requests_total, tokens_total=self.tokens_total,
                     max_ongoing_requests=self.settings.max_ongoing_requests, health_error=self.health_error,
                     pid=os.getpid())
        return stats

    def routing_stats(self) -> dict[str, Any]:
        """Cheap load figures for the request router (no call to the shards)."""
        scheduler = self.engine.scheduler
        return {"outstanding_tokens": self.outstanding_tokens, "num_running": len(scheduler.running),
                "num_waiting": len(scheduler.waiting), "kv_usage": self.engine.kv.usage, "state": self.state}

    def model_info(self) -> dict[str, Any]:
        c = self.model_config
        name = self.settings.served_model_name or os.path.basename(os.path.normpath(self.settings.model))
        return {
            "model": name, "num_layers": c.num_hidden_layers, "num_experts": c.num_experts,
            "experts_per_token": c.experts_per_token, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
            "context_length": self.engine.max_model_len, "sliding_window": c.sliding_window,
            "shards_per_replica": self.settings.shards_per_replica, "kv_block_size": self.engine.layout.block_size,
            "eos_token_id": c.eos_token_id, "max_ongoing_requests": self.settings.max_ongoing_requests,
        }


# ================================================================================================ token channel
class TokenChannels:
    """The replica's half of the multiplexed token channel (the router's half is `cluster.router.backend.ServeBackend`).

    A Serve streamed item costs about a millisecond of CPU on each side whatever it carries, so one item per token
    per request caps a router at ~1,000 tokens/s. Instead each request's own Serve call (`submit`) yields only
    {"accepted"} and stays open until the request ends (so Serve's routing, ongoing-request counts, autoscaling and
    cancellation work as for any call), while its deltas go to an outbox per router; one long-lived Serve call per
    router and replica (`channel`) carries whatever the outbox holds as one item, `[(channel_key, item), ...]`:
    one item per engine step for all of that router's requests, fewer when the router falls behind.

    The outbox outlives channel reconnects: deltas wait in it until the router's channel (opened when its first
    request is accepted here) takes them. A channel with nothing to carry closes after `idle_close_s`, so that a
    replica being scaled down is not held by its channels; the router reopens it with its next request here.
    """

    def __init__(self, replica_id: str, *, idle_close_s: float = 2.0, orphan_timeout_s: float = 60.0,
                 max_batch_items: int = 1024) -> None:
        self.replica_id = replica_id
        self.max_batch_items = max_batch_items  # a router far behind gets its backlog in several items, not one huge
        self.idle_close_s = idle_close_s
        self.orphan_timeout_s = orphan_timeout_s
        self._outboxes: dict[str, _Outbox] = {}  # router id -> its outbox
        self.batches_sent = 0  # Serve items sent on channels (empty "open" items not counted)
        self.deltas_sent = 0  # request deltas they carried

    def _outbox(self, router_id: str) -> _Outbox:
        outbox = self._outboxes.get(router_id)
        if outbox is None:
            now = time.monotonic()  # a router that went away for good leaves an outbox nobody reads: drop it
            for rid, old in list(self._outboxes.items()):
                if not old.connected and not old.live and now - old.touched > self.orphan_timeout_s:
                    del self._outboxes[rid]
            outbox = self._outboxes[router_id] = _Outbox()
        return outbox

    async def submit(self, request: dict[str, Any],
                     generate: Any) -> AsyncIterator[dict[str, Any]]:
        """Body of the per-request Serve call: `generate(request)`'s first event ({"accepted"}) is yielded, every
        later one goes to the router's outbox under `request["channel"]["key"]`; returns when the request ends.
        Cancelling the call (the router's client went away) closes `generate`, which aborts the engine request."""
        route = request.get("channel") or {}
        router_id, key = str(route.get("router", "")), route.get("key")
        outbox = self._outbox(router_id)
        outbox.live += 1
        events = generate(request)
        try:
            yield await anext(events)
            async for item in events:
                outbox.items.append((key, item))
                outbox.wake.set()
        finally:
            await events.aclose()
            outbox.live -= 1
            outbox.touched = time.monotonic()
            outbox.wake.set()  # an idle channel re-checks whether it can close

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[list[tuple[Any, dict[str, Any]]]]:
        """Body of the channel Serve call {"router": id, "target_replica": replica id}: first an empty batch (the
        channel is open), then the outbox's contents as they come. Serve may place a channel on another replica
        than asked (its FIFO hand-out of routed replicas): that one says so in `misrouted` and closes at once."""
        if request.get("target_replica") != self.replica_id:
            yield [("misrouted", {"replica_id": self.replica_id})]
            return
        outbox = self._outbox(str(request.get("router", "")))
        if outbox.connected:  # a stale channel of the same router (its router lost it): the new one takes over
            outbox.generation += 1
            outbox.wake.set()
        outbox.connected = True
        generation = outbox.generation
        try:
            yield []
            while outbox.generation == generation:
                if outbox.items:
                    batch, outbox.items = outbox.items[:self.max_batch_items], outbox.items[self.max_batch_items:]
                    self.batches_sent += 1
                    self.deltas_sent += len(batch)
                    yield batch
                    continue
                if not outbox.live:
                    try:
                        async with asyncio.timeout(self.idle_close_s):
                            await outbox.wake.wait()
                    except TimeoutError:
                        if not outbox.live and not outbox.items:
                            return
                else:
                    await outbox.wake.wait()
                outbox.wake.clear()
        finally:
            if outbox.generation == generation:
                outbox.connected = False
            outbox.touched = time.monotonic()


    def stats(self) -> dict[str, int]:
        return {"channel_batches": self.batches_sent, "channel_deltas": self.deltas_sent,
                "channel_routers": sum(outbox.connected for outbox in self._outboxes.values())}


class _Outbox:
    """One router's undelivered deltas on this replica."""

    __slots__ = ("items", "wake", "live", "connected", "generation", "touched")

    def __init__(self) -> None:
        self.items: list[tuple[Any, dict[str, Any]]] = []
        self.wake = asyncio.Event()
        self.live = 0  # the router's requests running here
        self.connected = False
        self.generation = 0
        self.touched = time.monotonic()


class ReplicaMethods:
    """The Serve methods that only hand over to the replica core, and the token channel's, for a deployment body with
    `self.core` (`generate`, `abort`, `model_info`) and `self.channels` (a `TokenChannels`): ModelReplicaImpl and
    the scripted stand-in of the tests."""

    core: Any
    channels: TokenChannels

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self.core.generate(request):
            yield item

    async def submit(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self.channels.submit(request, self.core.generate):
            yield item

    async def channel(self, request: dict[str, Any]) -> AsyncIterator[list[tuple[Any, dict[str, Any]]]]:
        async for batch in self.channels.stream(request):
            yield batch

    async def abort(self, request_id: str) -> bool:
        return self.core.abort(request_id)

    async def model_info(self) -> dict[str, Any]:
        return self.core.model_info()


# ================================================================================================ Serve deployment
class ModelReplicaImpl(ReplicaMethods):
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
        # Loading weights is long and blocking: keep the replica's event loop free meanwhile.
        self.core = await asyncio.to_thread(ReplicaCore, self.settings, replica_id=replica_id, metrics=self.metrics,
                                            placement_group=placement_group)
        self.core.start_background()
        self.channels = TokenChannels(replica_id)
        logger.info("replica %s ready: %s on %s x%d", replica_id, self.settings.model, self.settings.device,
                    self.settings.shards_per_replica)

    async def stats(self) -> dict[str, Any]:
        # engine.stats() asks the shard actors for expert counts (a blocking Ray call): keep it off the loop
        return {**await detached_thread(self.core.stats), **self.channels.stats()}

    async def check_health(self) -> None:
        await detached_thread(self.core.check_health)

    async def record_routing_stats(self) -> dict[str, Any]:
        return self.core.routing_stats()

    async def __del__(self) -> None:
        # Serve has already let in-flight requests finish (graceful_shutdown_timeout_s); stragglers are aborted.
        core = getattr(self, "core", None)
        if core is not None:
            await core.drain()
            await core.shutdown()
        if getattr(self, "metrics_server", None) is not None:
            self.metrics_server.close()
