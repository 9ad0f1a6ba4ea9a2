"""Helpers to run the router without Ray: a replica that streams scripted tokens, and a server on a thread.

    with ServerThread() as st:
        address = st.start([ScriptedReplica(tokens=[...])], RouterSettings(host="127.0.0.1", port=0))
        ...  # any gRPC client against `address`

`ScriptedReplica` speaks the replica's side of `cluster.contract` as `cluster.replica.ReplicaCore` does (so
`LocalBackend` can drive it):
it replays a fixed token sequence (or a function of the request), one token per `step_s`, and records what it was
asked for, so tests can force exact harmony sequences (tool calls, channels) and benchmarks can measure the
router's own overhead. With `lockstep=True` every stream waits for the same step clock, as in an engine that batches
all running requests into one step (a token for every stream at once, every `step_s`); otherwise each stream keeps
its own cadence. `first_token_s` makes each stream's first token fall due that long after the request arrived,
whatever the clock (a prefill of fixed length that is not aligned to steps), so that a benchmark sees the router's
added latency itself rather than rounded to whole steps, while later tokens keep the lockstep cadence and its
batched token channel. With `coalesce=True` tokens fall due on that schedule whether or not the consumer is reading, and
each delta carries every token due by the time it is sent, as `cluster.replica.ReplicaCore` does with the engine's
queued outputs (a consumer that falls behind gets fewer, larger deltas); otherwise one token per delta.
`adapters` (name -> path) are the LoRA adapters it pretends to serve: a request naming another is NOT_FOUND, and
`load_lora` / `unload_lora` change them (a path that is no directory is INVALID_ARGUMENT, as a bad adapter would be).
`ScriptedReplicaImpl` wraps one as the body of a Serve deployment with ModelReplica's methods, so the whole Serve
path (Router deployment, handle, request router) can run without a model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
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
    ReplicaLoad,
    ReplicaRequest,
    ReplicaState,
    ReplicaStats,
    UnloadLora,
    Usage,
    lora_name_problem,
)
from gptoss_cluster.cluster.token_channel import ReplicaEndpoints, TokenChannels
from gptoss_cluster.workers.harmony import RETURN_ID

__all__ = ["ScriptedReplica", "ScriptedReplicaImpl", "ServerThread"]


class ScriptedReplica:
    """A fake replica core: streams `tokens` (or `tokens(request)`) as engine deltas, `step_s` apart."""

    def __init__(self, tokens: Sequence[int] | Callable[[ReplicaRequest], Sequence[int]] = (), *,
                 step_s: float = 0.0, replica_id: str | None = None, vocab_size: int = 201088,
                 context_length: int = 4096, max_ongoing_requests: int = 256,
                 state: ReplicaState = ReplicaState.RUNNING,
                 kv_blocks: int = 256, block_size: int = 16, lockstep: bool = False,
                 coalesce: bool = False, first_token_s: float | None = None,
                 adapters: Mapping[str, str] | None = None, model: str = "scripted") -> None:
        self.tokens = tokens
        self.model = model
        self.loras: dict[str, str] = dict(adapters or {})  # LoRA adapter name -> path
        self.step_s = step_s
        self.first_token_s = first_token_s
        self.lockstep = lockstep
        self.coalesce = coalesce
        self._tick: asyncio.Future[None] | None = None  # lockstep: resolved at the next step of the clock
        self.replica_id = replica_id or f"scripted#{uuid.uuid4().hex[:8]}"
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.max_ongoing_requests = max_ongoing_requests
        self.state = state
        self.kv_blocks = kv_blocks
        self.block_size = block_size
        self.started: list[ReplicaRequest] = []  # requests in the order they began streaming
        self.live: dict[str, int] = {}  # request id -> blocks it holds
        self.aborted: list[str] = []
        self.requests_total = 0
        self.tokens_total = 0

    async def _step(self) -> None:
        """Wait one step: `step_s` from now, or (lockstep) until the replica's next step, shared by all streams."""
        if not self.lockstep:
            await asyncio.sleep(self.step_s)
            return
        tick = self._tick
        if tick is None or tick.done():
            loop = asyncio.get_running_loop()
            tick = self._tick = loop.create_future()
            now = loop.time()
            loop.call_at(now + self.step_s - now % self.step_s, _resolve, tick)
        await asyncio.shield(tick)  # one stream cancelled must not cancel the others' step

    def _script(self, request: ReplicaRequest) -> list[int]:
        tokens = self.tokens(request) if callable(self.tokens) else self.tokens
        return list(tokens)

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[Accepted | Delta | ReplicaError]:
        yield Accepted(self.replica_id)
        if self.state is not ReplicaState.RUNNING:
            yield ReplicaError(ErrorCode.UNAVAILABLE, f"replica is {self.state.value.lower()}")
            return
        rid = request.request_id
        sampling = request.sampling
        max_tokens = sampling.max_tokens
        ignore_eos = sampling.ignore_eos
        eos = set(request.eos_token_ids or (RETURN_ID,)) | set(sampling.stop_token_ids)
        if request.lora is not None and request.lora not in self.loras:
            yield ReplicaError(ErrorCode.NOT_FOUND, f"no LoRA adapter named {request.lora!r} is loaded")
            return
        script = self._script(request)
        prompt = request.prompt_token_ids
        deadline = request.deadline
        self.requests_total += 1
        self.started.append(request)
        self.live[rid] = -(-(len(prompt) + max_tokens) // self.block_size)
        done = False
        loop = asyncio.get_running_loop()
        # when token k is due: every step_s from now, or (lockstep) from the clock's next step
        first = loop.time() + (self.step_s - loop.time() % self.step_s if self.lockstep and self.step_s
                               else self.step_s)
        if self.first_token_s is not None:
            first = loop.time() + self.first_token_s
        try:
            i = 0
            while i < max_tokens:
                if deadline is not None and time.time() >= deadline:
                    yield ReplicaError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed on the replica")
                    done = True
                    return
                n = 1
                if self.step_s and self.coalesce:
                    delay = first + i * self.step_s - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    n = max(1, min(max_tokens, int((loop.time() - first) / self.step_s) + 1) - i)
                elif i == 0 and self.first_token_s is not None:
                    await asyncio.sleep(self.first_token_s)
                elif self.step_s:
                    await self._step()
                tokens: list[int] = []
                stop = last = False
                for k in range(i, i + n):
                    token = script[k % len(script)] if script else 1000 + k
                    tokens.append(token)
                    stop = token in eos and not ignore_eos
                    last = stop or k == max_tokens - 1
                    if last:
                        break
                i += len(tokens)
                self.tokens_total += len(tokens)
                yield Delta(tokens, None, ("stop" if stop else "length") if last else None,
                            tokens[-1] if stop else None, Usage(len(prompt), i, 0) if last else None)
                if last:
                    done = True
                    return
        finally:
            self.live.pop(rid, None)
            if not done:
                self.aborted.append(rid)

    def adapters(self) -> tuple[LoraAdapter, ...]:
        return tuple(LoraAdapter(name, path, 8, self.model) for name, path in self.loras.items())

    def load_lora(self, request: LoadLora) -> LoraResult:
        problem = lora_name_problem(request.name)
        if problem is None and request.name in self.loras:
            problem = f"a LoRA adapter named {request.name!r} is already loaded"
        if problem is None and not os.path.isdir(request.path):
            problem = f"{request.path}: not a directory"
        if problem is not None:
            return LoraResult(self.replica_id, ReplicaError(ErrorCode.INVALID_ARGUMENT, problem))
        self.loras[request.name] = request.path
        return LoraResult(self.replica_id, adapter=LoraAdapter(request.name, request.path, 8, self.model))

    def unload_lora(self, request: UnloadLora) -> LoraResult:
        if self.loras.pop(request.name, None) is None:
            return LoraResult(self.replica_id, ReplicaError(ErrorCode.NOT_FOUND, f"no adapter {request.name!r}"))
        return LoraResult(self.replica_id)

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(state=self.state, outstanding_tokens=0, num_running=len(self.live), num_waiting=0,
                           kv_usage=sum(self.live.values()) / self.kv_blocks)

    def stats(self) -> ReplicaStats:
        used = sum(self.live.values())
        return ReplicaStats(replica_id=self.replica_id, state=self.state, num_shards=1,
                            max_ongoing_requests=self.max_ongoing_requests, load=self.load(),
                            kv_blocks_total=self.kv_blocks, kv_blocks_free=self.kv_blocks - used,
                            prefix_cache_queries=0, prefix_cache_hits=0, requests_total=self.requests_total,
                            tokens_total=self.tokens_total, health_error=None, pid=os.getpid(),
                            adapters=self.adapters())

    def model_info(self) -> ModelInfo:
        return ModelInfo(model=self.model, num_layers=1, num_experts=1, experts_per_token=1, hidden_size=1,
                         vocab_size=self.vocab_size, context_length=self.context_length, sliding_window=128,
                         shards_per_replica=1, kv_block_size=self.block_size, eos_token_id=RETURN_ID,
                         max_ongoing_requests=self.max_ongoing_requests, adapters=self.adapters())

    async def shutdown(self) -> None:
        return None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ScriptedReplicaImpl(ReplicaEndpoints):
    """Body of a Serve deployment standing in for ModelReplica (same methods as `cluster.replica.ModelReplicaImpl`)
    around a `ScriptedReplica(**options)`: the Router deployment, its handle and the request router all run for
    real, only the engine is scripted."""

    def __init__(self, options: dict[str, Any]) -> None:
        from ray import serve

        replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        self.core = ScriptedReplica(**{**options, "replica_id": replica_id})
        self.channels = TokenChannels(replica_id)

    async def stats(self) -> ReplicaStats:
        return dataclasses.replace(self.core.stats(), channels=self.channels.stats())

    async def check_health(self) -> None:
        return None

    async def record_routing_stats(self) -> dict[str, Any]:
        return self.core.load().to_dict()


class ServerThread:
    """An asyncio loop on a daemon thread running one GptossServer over a LocalBackend."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gptoss-router-test", daemon=True)
        self.thread.start()
        self.server: Any = None
        self.backend: Any = None
        self.address: str | None = None

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, cores: Sequence[Any], settings: Any = None, metrics: Any = None, wait_ready: bool = True,
              tracer: Any = None) -> str:
        from gptoss_cluster.cluster.router.backend import LocalBackend
        from gptoss_cluster.cluster.router.server import GptossServer
        from gptoss_cluster.cluster.router.settings import RouterSettings

        settings = settings or RouterSettings(host="127.0.0.1", port=0)

        async def start() -> str:
            self.backend = LocalBackend(cores)
            self.server = GptossServer(self.backend, settings, metrics, tracer)
            port = await self.server.start()
            if wait_ready:
                await self.server.wait_ready(30)
            return f"{settings.host}:{port}"

        self.address = self.run(start())
        return self.address

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop(0))
            self.server = None
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()
