"""The engine core of one replica: the step loop, streaming, aborts and statistics.

Each `step()` asks the scheduler what runs, lays the batch out for the executor (flat tokens, positions, block
tables, slot mappings, the rows to sample and how: a `SamplingBatch`), has the executor run the model and sample
every finished row where the logits are (it returns token ids, and logprobs only for rows that asked), and turns the
new tokens into per-request deltas (stop tokens, stop strings, max_tokens, incremental text).

Async scheduling (`EngineConfig.async_scheduling`, default on; as vLLM v1): the executor runs the submitted steps in
order (`Executor.submit`); while step N runs, `step()` schedules and lays out step N + 1 (a request that step N
samples is planned with one pending token, a placeholder the executor fills with step N's token:
`StepPlan.fill_rows`), submits it, and processes step N's tokens while step N + 1 runs (behind Ray, step N + 1 is on
its way to the shards before step N's tokens are back). A request that stops at step N has its step N + 1 row
dropped; rows that need step N's token on the host (grammar, penalties, min_tokens) make that step wait for step N
instead (`step`). Greedy and seeded requests get the serial loop's tokens; unseeded random rows draw from the
engine's generator in batch order, which may differ.

Two ways in, over the same core:
- synchronous: `submit(...)` then `step()` until idle, or `generate([...])` (the offline LLM);
- asynchronous: `add_request(...)` returns an async iterator of `RequestOutput` deltas; a background task runs the
  steps in a worker thread, so `abort()` and new requests land while a step executes.

LoRA adapters (`add_lora` / `remove_lora` / `list_loras`; a request names one with `lora=`): a request runs with its
adapter's pool slot (`LoraSlots`: the scheduler admits it only when one of `max_loras` slots holds, or can take, its
adapter); the engine has the executor load the adapters newly given a slot before it lays out the step that first
uses them, and tells it each row's slot (`StepPlan.lora_slots`).

`abort(request_id)` ends a request at once, wherever it is: its blocks return to the pool immediately (a step in
flight that still writes into them finishes before any block is handed out again), its stream ends with finish
reason "aborted", and whatever the in-flight step produced for it is dropped. The id is free for reuse as soon as
the request has ended.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptoss_cluster.workers.config import ModelConfig
from gptoss_cluster.workers.engine.config import EngineConfig
from gptoss_cluster.workers.engine.executor import Executor, LocalExecutor, StepPlan
from gptoss_cluster.workers.engine.kv_cache import KVCacheLayout, KVCacheManager, kv_pool_blocks
from gptoss_cluster.workers.engine.lora_slots import LoraRegistration, LoraSlots
from gptoss_cluster.workers.engine.request import (
    GenerationResult,
    Request,
    RequestOutput,
    RequestStatus,
    TokenLogprob,
)
from gptoss_cluster.workers.engine.sampler import (
    SamplingBatch,
    TokenBitmask,
    build_sampling_batch,
    token_logprobs,
)
from gptoss_cluster.workers.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from gptoss_cluster.workers.engine.structured import CompiledConstraint, Constraint, StructuredDecoding
from gptoss_cluster.workers.lora.adapter import AdapterInfo, LoraError, LoraSource, read_adapter
from gptoss_cluster.workers.sampling import SamplingParams

logger = logging.getLogger("gptoss.engine")


@dataclass
class EngineStats:
    """A snapshot of the engine (every counter since start)."""

    num_running: int
    num_waiting: int
    kv_block_size: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_usage: float  # fraction of blocks referenced by requests (free blocks may still hold cached prefixes)
    kv_capacity_tokens: int
    kv_cached_blocks: int
    prefix_cache_queries: int  # tokens looked up at admission
    prefix_cache_hits: int  # of which served from the cache
    prefix_cache_query_requests: int
    prefix_cache_hit_requests: int
    num_preemptions: int
    num_steps: int
    num_prefill_tokens: int  # tokens computed for prompts (and recomputation), excluding prefix hits
    num_decode_tokens: int  # tokens generated
    num_finished: int
    num_aborted: int
    last_step_tokens: int
    last_step_time_s: float
    mean_tokens_per_step: float
    mean_step_time_s: float
    time_schedule_s: float  # scheduling + laying out the batch (block tables, slot mappings)
    time_execute_s: float  # the model forward (executor)
    time_sample_s: float  # the host's part of sampling: the SamplingBatch, reading back tokens and logprobs
    time_output_s: float  # stop checks, detokenization, deltas
    expert_counts: torch.Tensor | None = None  # int64 [layers, experts]: routed tokens
    # by LoRA adapter name (base-model requests are not counted here), counted when a request ends: requests
    # finished (not aborted), and tokens generated (aborted requests' too)
    lora_requests: dict[str, int] = field(default_factory=dict)
    lora_generation_tokens: dict[str, int] = field(default_factory=dict)
    lora_resident: int = 0  # adapters loaded in the executor's pool slots now

    @property
    def overhead_fraction(self) -> float:
        """Share of step time spent outside the model forward."""
        total = self.time_schedule_s + self.time_execute_s + self.time_sample_s + self.time_output_s
        return 0.0 if total == 0 else 1.0 - self.time_execute_s / total


class RequestStream:
    """The async iterator `Engine.add_request` returns: `RequestOutput` deltas until one has `finished`."""

    def __init__(self, engine: Engine, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._queue.put_nowait(item)
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def ready(self) -> bool:
        """Whether the next output is already here, so that taking it does not wait (a consumer may coalesce)."""
        return not self._queue.empty()

    def abort(self) -> bool:
        return self.engine.abort(self.request_id)


@dataclass
class _Timers:
    schedule: float = 0.0
    execute: float = 0.0
    sample: float = 0.0
    output: float = 0.0
    steps: int = 0
    tokens: int = 0
    last_tokens: int = 0
    last_time: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    finished: int = 0
    aborted: int = 0


@dataclass
class _InflightStep:
    """A step submitted to the executor whose tokens are not processed yet."""

    sched: SchedulerOutput
    sampled: list[ScheduledRequest]
    requests: list[Request]  # of the sampled rows, in order
    num_tokens: int
    result: Future | None = None  # of SampledTokens


class Engine:
    def __init__(self, executor: Executor, model_config: ModelConfig, config: EngineConfig | None = None,
                 tokenizer: Any = None) -> None:
        self.config = config or EngineConfig()
        self.model_config = model_config
        self.executor = executor
        self.tokenizer = tokenizer
        self.max_model_len = min(self.config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings)
        self.layout = KVCacheLayout.from_model_config(model_config, self.config.block_size)
        self.kv_block_bytes = executor.kv_block_bytes(self.layout)
        num_blocks = kv_pool_blocks(self.config, self.layout, self.max_model_len, self.kv_block_bytes,
                                    executor.device_type(), executor.available_kv_memory)
        executor.initialize_cache(self.layout, num_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB per shard), %d layer groups",
                    num_blocks, self.config.block_size, num_blocks * self.config.block_size,
                    num_blocks * self.kv_block_bytes / 2**20, len(self.layout.groups))
        self.kv = KVCacheManager(self.layout, num_blocks, self.config.enable_prefix_caching)
        self.lora = LoraSlots(self.config.max_loras)  # registered adapters, and which sit in the executor's slots
        self.scheduler = Scheduler(self.config, self.kv, self.max_model_len, self.lora)
        self.generator = torch.Generator().manual_seed(self.config.seed)  # draws of random rows without a seed
        self.requests: dict[str, Request] = {}  # live (unfinished) requests by id
        self._lock = threading.RLock()  # guards scheduler / KV / request state
        self._step_lock = threading.Lock()  # one step at a time
        self._pending: list[RequestOutput] = []  # outputs of requests without a stream, for the next step()
        self._streams: dict[Request, RequestStream] = {}
        self._timers = _Timers()
        self._lora_requests: dict[str, int] = {}  # finished requests by adapter name
        self._lora_tokens: dict[str, int] = {}  # tokens generated by adapter name (at the request's end)
        self._loop_task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._detokenizers: dict[Request, Any] = {}
        self._stop_strings: dict[Request, Any] = {}  # workers.stop_strings.StopStrings of requests with stop strings
        self._idle_step = False
        self._structured: StructuredDecoding | None = None  # built on the first constrained request
        self._structured_lock = threading.Lock()
        self._mask_pool: Any = None  # one thread: fills the next step's token bitmasks while the model runs
        self._inflight: _InflightStep | None = None  # the step running while the next one is scheduled

    # ------------------------------------------------------------------------------------------------ builders
    @classmethod
    def from_model(cls, model: Any, config: EngineConfig | None = None, tokenizer: Any = None) -> Engine:
        config = config or EngineConfig()
        executor = LocalExecutor(model, config.count_expert_tokens, config.dequantize_experts, config.max_loras,
                                 config.max_lora_rank)
        return cls(executor, model.config, config, tokenizer)

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.bfloat16, config: EngineConfig | None = None,
                        tokenizer: Any = None, device: str | torch.device = "cpu", progress: bool = True) -> Engine:
        from gptoss_cluster.workers.checkpoint import open_checkpoint
        from gptoss_cluster.workers.model import GptOssModel

        with open_checkpoint(path) as reader:
            model = GptOssModel.from_checkpoint(reader, dtype=dtype, device=device, progress=progress)
        return cls.from_model(model, config, tokenizer)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.num_blocks

    # ------------------------------------------------------------------------------------------------ constraints
    @property
    def structured(self) -> StructuredDecoding:
        """The grammar compiler and harmony automaton of this engine (loads xgrammar on first use)."""
        with self._structured_lock:
            if self._structured is None:
                from gptoss_cluster.workers.harmony import get_tokenizer

                # the engine may run without a tokenizer (the router detokenizes); gpt-oss has one vocabulary
                self._structured = StructuredDecoding(self.tokenizer or get_tokenizer(), self.model_config.vocab_size)
            return self._structured

    def prepare_constraint(self, constraint: Constraint | CompiledConstraint | dict[str, Any]) -> CompiledConstraint:
        """Compile a constraint (cached by its hash); thread-safe, so callers compile off the step loop.
        Raises ValueError naming what is invalid or unsupported."""
        if isinstance(constraint, CompiledConstraint):
            return constraint
        return self.structured.compile(constraint)

    # ------------------------------------------------------------------------------------------------ requests
    def _make_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | dict[str, Any] | None,
                      request_id: str | None, priority: int, eos_token_ids: Sequence[int] | None,
                      constraint: Any = None, lora: str | None = None) -> Request:
        if params is None:
            params = SamplingParams()
        elif isinstance(params, dict):
            params = SamplingParams(**params)
        elif not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams or a dict, got {type(params).__name__}")
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if isinstance(prompt_token_ids, (str, bytes)):
            raise ValueError("the engine takes token ids; tokenize the prompt first")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("prompt_token_ids is empty")
        vocab = self.model_config.vocab_size
        for i, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < vocab:
                raise ValueError(f"token id {token!r} at position {i} is outside the vocabulary [0, {vocab})")
        prompt = [int(t) for t in prompt]
        for token in params.stop_token_ids:
            if token >= vocab:
                raise ValueError(f"stop token id {token} is outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine was built without one")
        if eos_token_ids is None:
            eos_token_ids = (self.model_config.eos_token_id,)
        self.scheduler.check_request(len(prompt), params.max_tokens)
        request = Request(request_id, prompt, params, eos_token_ids=tuple(eos_token_ids), priority=priority,
                          lora=self._lookup_lora(lora))
        if constraint is not None:
            request.constraint = self.structured.new_state(self.prepare_constraint(constraint))
        return request

    def submit(self, prompt_token_ids: Sequence[int], params: SamplingParams | dict[str, Any] | None = None,
               request_id: str | None = None, *, priority: int = 0,
               eos_token_ids: Sequence[int] | None = None, constraint: Any = None, lora: str | None = None) -> str:
        """Queue a request (synchronous use: its outputs come back from `step()`); returns its id.

        `eos_token_ids` are the tokens that end it unless `params.ignore_eos` (default: the model's EOS; pass
        harmony's stop tokens for chat). `constraint` (a `Constraint`, its dict form, or what
        `prepare_constraint` returned) shapes a harmony chat completion; compiling happens here unless done before.
        `lora` names a registered LoRA adapter to run it with (None: the base model; unknown: LoraNotFoundError).
        Invalid input raises ValueError and changes nothing.
        """
        return self._add(prompt_token_ids, params, request_id, priority, eos_token_ids, None,
                         constraint, lora).request_id

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | dict[str, Any] | None = None,
                    request_id: str | None = None, *, priority: int = 0,
                    eos_token_ids: Sequence[int] | None = None, constraint: Any = None,
                    lora: str | None = None) -> RequestStream:
        """Queue a request and return an async iterator of its deltas (call from inside a running event loop).
        Pass a compiled `constraint` (`prepare_constraint`, run in a thread) so no compile blocks the loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("add_request streams to an asyncio event loop; without one use submit() + step() "
                               "or generate()") from None
        request = self._add(prompt_token_ids, params, request_id, priority, eos_token_ids, loop, constraint, lora)
        self._ensure_loop(loop)
        return self._streams[request]

    def _add(self, prompt_token_ids: Sequence[int], params: Any, request_id: str | None, priority: int,
             eos_token_ids: Sequence[int] | None, loop: asyncio.AbstractEventLoop | None,
             constraint: Any = None, lora: str | None = None) -> Request:
        request = self._make_request(prompt_token_ids, params, request_id, priority, eos_token_ids, constraint, lora)
        self._register(request, loop)
        if self._wakeup is not None and loop is not None:
            self._wakeup.set()
        return request

    def _register(self, request: Request, loop: asyncio.AbstractEventLoop | None) -> None:
        with self._lock:
            if request.request_id in self.requests:
                raise ValueError(f"request id {request.request_id!r} is already in use by an unfinished request")
            self.scheduler.add(request)
            self.requests[request.request_id] = request
            if loop is not None:
                self._streams[request] = RequestStream(self, request.request_id, loop)
            if self.tokenizer is not None:
                from gptoss_cluster.workers.harmony import IncrementalDetokenizer
                from gptoss_cluster.workers.stop_strings import StopStrings

                self._detokenizers[request] = IncrementalDetokenizer(self.tokenizer)
                params = request.params
                if params.stop:  # the router's rules (it applies them to served requests): one implementation
                    self._stop_strings[request] = StopStrings(params.stop, min_tokens=params.min_tokens,
                                                              include_stop=params.include_stop_str_in_output)

    def abort(self, request_id: str) -> bool:
        """End a request now (finish reason "aborted") and free its blocks; False if no such live request."""
        with self._lock:
            request = self.requests.get(request_id)
            if request is None:
                return False
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            self._emit(request, self._delta(request, [], None, finished=True))
            return True

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self.requests)

    # ------------------------------------------------------------------------------------------------ LoRA
    def add_lora(self, name: str, path: str | Path) -> AdapterInfo:
        """Register the PEFT adapter at `path` (adapter_config.json + adapter_model.safetensors) under `name`.

        Validated now (its options, target modules, rank against `max_lora_rank`, tensor shapes; LoraError naming
        what is wrong or unsupported, and an already registered name); its weights load into a pool slot when a
        request that uses it is first scheduled."""
        if not isinstance(name, str) or not name:
            raise LoraError(f"a LoRA adapter needs a non-empty name, got {name!r}")
        with self._lock:
            if name in self.lora.registry:
                raise LoraError(f"a LoRA adapter named {name!r} is already registered")
        # num_bytes in the model's dtype (LocalExecutor: its model's; RayExecutor: the shards')
        dtype = getattr(self.executor, "dtype", None) or getattr(getattr(self.executor, "model", None), "dtype",
                                                                 torch.bfloat16)
        info = read_adapter(LoraSource(name, str(path)), self.model_config, self.config.max_lora_rank, dtype)
        with self._lock:
            self.lora.register(info)
        logger.info("LoRA adapter %r registered from %s (rank %d, %.1f MiB)", name, info.path, info.rank,
                    info.num_bytes / 2**20)
        return info

    def remove_lora(self, name: str) -> bool:
        """Unregister an adapter (False: no such name). New requests no longer find it; requests already queued or
        running with it finish with it (as in vLLM), and its slot is freed when the last of them leaves it."""
        with self._lock:
            removed = self.lora.unregister(name) is not None
        if removed:
            self._apply_lora_work_now()
        return removed

    def list_loras(self) -> list[AdapterInfo]:
        """The registered adapters, in registration order."""
        with self._lock:
            return self.lora.infos()

    def _lookup_lora(self, name: str | None) -> LoraRegistration | None:
        if name is None:
            return None
        if not isinstance(name, str):
            raise ValueError(f"a LoRA adapter is named by a string (or None: the base model), got {name!r}")
        with self._lock:
            return self.lora.lookup(name)  # LoraNotFoundError

    def _apply_lora_work_now(self) -> None:
        """Drop freed slots' weights at once when no step runs; otherwise the next step's layout does it."""
        if not self._step_lock.acquire(blocking=False):
            return
        try:
            inflight = self._inflight
            if inflight is None or inflight.result is None or inflight.result.done():
                with self._lock:
                    self._abort_unloaded(self._apply_lora_work())
        finally:
            self._step_lock.release()

    def _apply_lora_work(self) -> list[tuple[Request, str]]:
        """Have the executor drop the weights of freed slots and load the adapters newly given a slot. The caller
        holds the lock and has made sure that no step runs on the executor meanwhile.

        An adapter that fails to load (its files gone, say) fails only the requests that wanted it: returned, their
        slots unpinned (a step laid out now runs their rows as the base model), with the reason, for the caller to
        end (`_abort_unloaded`) once nothing reads their block tables any more; the reason also goes to the log."""
        unloads, loads = self.lora.take_work()
        for slot in unloads:
            self.executor.remove_lora(slot)
        failed: list[tuple[Request, str]] = []
        for slot, source in loads:
            try:
                self.executor.add_lora(slot, source)
            except Exception as exc:
                self.lora.failed(slot)
                victims = [r for r in self.scheduler.running if r.lora_slot == slot]
                logger.error("LoRA adapter %r (%s) failed to load: %s; aborting %d request(s)", source.name,
                             source.path, exc, len(victims))
                reason = f"LoRA adapter {source.name!r} failed to load: {exc}"
                for request in victims:
                    self.scheduler.release_lora(request)
                    failed.append((request, reason))
            else:
                self.lora.loaded(slot)
        return failed

    def _wait_inflight(self) -> None:
        """Let the step in flight, if any, finish on the executor (its tokens are processed later, as usual): before
        the executor's LoRA slots change, or a verification forward borrows the executor."""
        if self._inflight is not None and self._inflight.result is not None:
            wait_futures([self._inflight.result])

    def _abort_unloaded(self, failed: list[tuple[Request, str]]) -> None:
        """End the requests whose adapter failed to load (`_apply_lora_work`): a stream raises LoraError with the
        reason (the replica answers with it), a submit()-ed request ends "aborted"."""
        for request, reason in failed:
            if request.is_finished:
                continue
            stream = self._streams.pop(request, None)
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            if stream is not None:
                stream._put(LoraError(reason))
            else:
                self._emit(request, self._delta(request, [], None, finished=True))

    # ------------------------------------------------------------------------------------------------ verification
    def forward_logits(self, token_ids: Sequence[int], lora: str | None = None) -> torch.Tensor:
        """float32 logits [len, vocab] of one whole sequence run through the executor, with the LoRA adapter `lora`
        (None: the base model); for verification (the sharded LLM's `forward_logits`, and any with an adapter).

        Borrows ceil(len / block_size) KV blocks per layer group (and a slot for the adapter) for the one forward
        and gives them back: no request, no sampling, the engine's requests untouched."""
        token_ids = [int(t) for t in token_ids]
        registration = self._lookup_lora(lora)
        n, bs, groups = len(token_ids), self.layout.block_size, len(self.layout.groups)
        per_group = -(-n // bs)
        positions = torch.arange(n)
        with self._step_lock:
            self._wait_inflight()
            with self._lock:
                pool = self.kv.pool
                if per_group * groups > pool.num_free:
                    raise ValueError(f"{n} tokens need {per_group * groups} free KV blocks; the pool has "
                                     f"{pool.num_free} free (of {pool.num_blocks})")
                slot = -1
                if registration is not None:
                    slot = self.lora.acquire(registration)
                    if slot is None:
                        raise RuntimeError(f"every LoRA slot is pinned by running requests of other adapters; "
                                           f"{lora!r} cannot run now")
                blocks = []
                try:
                    self._abort_unloaded(self._apply_lora_work())
                    if slot >= 0 and not self.lora.slots[slot].loaded:
                        raise LoraError(f"LoRA adapter {lora!r} failed to load (the log has the reason)")
                    blocks = pool.allocate(per_group * groups)
                    tables, slot_mappings = [], []
                    for g in range(groups):
                        ids = torch.tensor([b.block_id for b in blocks[g * per_group:(g + 1) * per_group]],
                                           dtype=torch.int32)
                        tables.append(ids[None, :])
                        slot_mappings.append(ids[positions // bs].long() * bs + positions % bs)
                    plan = StepPlan(token_ids=torch.tensor(token_ids, dtype=torch.long), positions=positions,
                                    query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                                    seq_lens=torch.tensor([n], dtype=torch.int32), block_tables=tables,
                                    slot_mappings=slot_mappings, logits_indices=torch.arange(n),
                                    lora_slots=None if slot < 0 else torch.tensor([slot], dtype=torch.int32))
                    return self.executor.forward_logits(plan)
                finally:
                    pool.release(blocks)
                    if slot >= 0:
                        self.lora.release(slot)

    # ------------------------------------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the deltas of requests without a stream (submit()-ed).

        Serial loop (`EngineConfig.async_scheduling` off): schedule step N, run it, process its tokens. Async: step N
        is still running when this schedules step N + 1 (each request step N samples counts one pending token: its
        id is a placeholder the executor fills with step N's token), submits it behind step N, and only then
        processes step N's tokens, while step N + 1 runs. A step whose rows need step N's tokens on the host
        (a constrained row: its grammar state; penalties: the token counts; a row under min_tokens: its stop mask)
        waits for step N first, i.e. falls back to the serial order. The executor runs the steps one at a time, in
        order, so blocks freed meanwhile (a finish, an abort, a preemption) are only reused by later steps.
        """
        with self._step_lock:
            inflight = self._inflight
            if inflight is not None and self._needs_tokens(inflight):
                self._inflight = None
                self._complete(inflight)
                inflight = None
            t0 = time.perf_counter()
            with self._lock:
                sched = self.scheduler.schedule()
                self._idle_step = not sched.scheduled and inflight is None
                if sched.scheduled:
                    plan, sampled = self._build_plan(sched)
                    plan.fill_rows, plan.fill_from = self._placeholders(plan, sched, inflight)
                    masks = self._start_masks(sampled)
                    t_plan = time.perf_counter()
                    requests = [s.request for s in sampled]
                    plan.sampling = self._sampling_batch(requests)
                    for request in requests:
                        request.num_pending_tokens += 1
            if not sched.scheduled:
                if inflight is not None:
                    self._inflight = None
                    self._complete(inflight)
                with self._lock:
                    return self._take_pending()
            t1 = time.perf_counter()
            step = _InflightStep(sched, sampled, requests, plan.num_tokens)
            if self.config.async_scheduling:
                refused = None
                try:
                    step.result = self.executor.submit(plan, masks)  # queued behind `inflight`, whose tokens it takes
                except Exception as exc:  # (the executor refused it: its shards are gone, say) a failed step
                    refused, step.result = exc, Future()
                    step.result.set_exception(exc)
                self._timers.execute += time.perf_counter() - t1  # sending it (behind Ray: encoding, the calls)
                self._inflight = step
                if inflight is not None:
                    self._complete(inflight)
                # every row in flight is dead: nothing keeps running once the engine is idle; a refused step: raise now
                if not self.requests or refused is not None:
                    self._inflight = None
                    self._complete(step)
            else:
                step.result = Future()
                try:
                    step.result.set_result(self.executor.execute(plan, masks))
                except Exception as exc:
                    step.result.set_exception(exc)
                self._timers.execute += time.perf_counter() - t1  # (_complete times only its own wait)
                self._complete(step)
            tm = self._timers
            tm.schedule += t_plan - t0
            tm.sample += t1 - t_plan
            tm.last_tokens = plan.num_tokens
            tm.last_time = time.perf_counter() - t0
            with self._lock:
                return self._take_pending()

    def _needs_tokens(self, step: _InflightStep) -> bool:
        """Whether the next step's host-side inputs depend on the tokens `step` samples (see `step`)."""
        for request in step.requests:
            if request.is_finished:
                continue
            params = request.params
            if request.constraint is not None or params.has_penalties or request.num_output_tokens < params.min_tokens:
                return True
        return False

    def _placeholders(self, plan: StepPlan, sched: SchedulerOutput, inflight: _InflightStep | None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The plan's rows whose input is a token the step in flight samples (placeholder 0 in the plan), and that
        step's sampled row of each (`StepPlan.fill_rows` / `fill_from`; None, None: no such row)."""
        if inflight is None:
            return None, None
        sampled_row = {id(s.request): k for k, s in enumerate(inflight.sampled)}
        fill_rows, fill_from = [], []
        qsl = plan.query_start_loc.tolist()
        for i, s in enumerate(sched.scheduled):
            if s.start + s.num_new_tokens > s.request.num_tokens:  # only a decode row: one token pending at most
                fill_rows.append(qsl[i + 1] - 1)
                fill_from.append(sampled_row[id(s.request)])
        if not fill_rows:
            return None, None
        return torch.tensor(fill_rows, dtype=torch.long), torch.tensor(fill_from, dtype=torch.long)

    def _complete(self, step: _InflightStep) -> None:
        """Wait for `step`'s tokens and process them (stop checks, deltas, freeing finished requests)."""
        t0 = time.perf_counter()
        try:
            result = step.result.result()
        except BaseException:
            # a failed step: the one behind it (fed from it) goes too, so that no later step completes a stale one
            later, self._inflight = self._inflight, None
            if later is not None and later is not step:
                try:
                    later.result.result()
                except BaseException:
                    pass
            with self._lock:
                for request in step.requests + (later.requests if later is not None else []):
                    request.num_pending_tokens = 0
            raise
        t1 = time.perf_counter()
        with self._lock:
            tokens = result.token_ids.tolist()
            logprobs = token_logprobs(result, step.requests, tokens)
            t2 = time.perf_counter()
            for request in step.requests:
                request.num_pending_tokens -= 1
            self._process(step.sched, step.sampled, tokens, logprobs)
        t3 = time.perf_counter()
        tm = self._timers
        tm.execute += t1 - t0
        tm.sample += t2 - t1
        tm.output += t3 - t2
        tm.steps += 1
        tm.tokens += step.num_tokens

    def _build_plan(self, sched: SchedulerOutput) -> tuple[StepPlan, list]:
        unloaded: list[tuple[Request, str]] = []
        if self.lora.has_work():  # adapters given a slot by this schedule: loaded once the step in flight is done
            self._wait_inflight()
            unloaded = self._apply_lora_work()
        items = sched.scheduled
        bs = self.layout.block_size
        starts = np.fromiter((s.start for s in items), dtype=np.int64, count=len(items))
        counts = np.fromiter((s.num_new_tokens for s in items), dtype=np.int64, count=len(items))
        query_start_loc = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        token_ids: list[int] = []
        for s in items:
            if s.start == s.request.num_tokens:  # the token a step in flight samples: filled in by `_execute`
                token_ids.append(0)
            elif s.num_new_tokens == 1:
                token_ids.append(s.request.token_ids[s.start])
            else:
                token_ids.extend(s.request.token_ids[s.start:s.start + s.num_new_tokens])
        rows = np.repeat(np.arange(len(items)), counts)
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(query_start_loc[:-1] - starts, counts)
        seq_lens = starts + counts
        block_index = positions // bs
        offset = positions % bs
        block_tables, slot_mappings = [], []
        for g in range(len(self.layout.groups)):
            tables = [self.kv.block_ids(s.request, g) for s in items]
            width = max(len(t) for t in tables)
            table = np.zeros((len(items), width), dtype=np.int32)
            for i, ids in enumerate(tables):
                table[i, :len(ids)] = ids
            slot_mappings.append(torch.from_numpy(table[rows, block_index].astype(np.int64) * bs + offset))
            block_tables.append(torch.from_numpy(table))
        sampled = [s for s in items if s.samples]
        logits_indices = np.fromiter((query_start_loc[i + 1] - 1 for i, s in enumerate(items) if s.samples),
                                     dtype=np.int64)
        plan = StepPlan(
            token_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=torch.from_numpy(positions),
            query_start_loc=torch.from_numpy(query_start_loc.astype(np.int32)),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
            block_tables=block_tables,
            slot_mappings=slot_mappings,
            logits_indices=torch.from_numpy(logits_indices),
            lora_slots=self._lora_slots(items),
        )
        self._abort_unloaded(unloaded)  # (their rows run, as the base model, into blocks no later step gets first)
        return plan, sampled

    @staticmethod
    def _lora_slots(items: list[ScheduledRequest]) -> torch.Tensor | None:
        """[B] int32: each request's adapter slot (-1: the base model); None when no request uses an adapter."""
        slots = [s.request.lora_slot for s in items]
        if all(slot < 0 for slot in slots):
            return None
        return torch.tensor(slots, dtype=torch.int32)

    def _sampling_batch(self, requests: list[Request]) -> SamplingBatch:
        """How the executor samples each row; draws the random rows' uniforms (so this runs once per step)."""
        return build_sampling_batch(requests, self.generator, self.model_config.vocab_size)

    def _start_masks(self, sampled: list) -> Any:
        """The constrained rows' token bitmasks, filled in a helper thread while the model runs (the states only
        change in `_process`, after sampling). Returns a future of a TokenBitmask (one bitmask row per constrained
        row) or None."""
        rows = [i for i, s in enumerate(sampled) if s.request.constraint is not None]
        if not rows:
            return None
        structured = self.structured
        states = [sampled[i].request.constraint for i in rows]

        def fill() -> TokenBitmask:
            bitmask = structured.allocate_bitmask(len(rows))
            structured.fill_bitmask(states, bitmask, range(len(rows)))
            return TokenBitmask(bitmask, torch.tensor(rows, dtype=torch.long))

        if self._mask_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="gptoss-masks")
        return self._mask_pool.submit(fill)

    def _process(self, sched: SchedulerOutput, sampled: list, tokens: list[int],
                 logprobs: list[TokenLogprob | None]) -> None:
        sampled_at = {id(s): k for k, s in enumerate(sampled)}
        tm = self._timers
        for s in sched.scheduled:
            request = s.request
            if request.is_finished:
                continue  # aborted (or finished by the step before) while the step ran: drop what it produced
            # a request preempted after this step was scheduled (async) still takes its token: the draw is spent
            k = sampled_at.get(id(s))
            if k is None:
                tm.prefill_tokens += s.num_new_tokens
                self.kv.register_computed(request)
                continue
            if s.num_new_tokens > 1 or s.start < request.num_prompt_tokens:
                tm.prefill_tokens += s.num_new_tokens
            token = tokens[k]
            request.token_ids.append(token)
            tm.decode_tokens += 1
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            if request.logprobs is not None and logprobs[k] is not None:
                request.logprobs.append(logprobs[k])
            if request.constraint is not None and not request.constraint.accept(token):
                # cannot happen while the mask was applied; end this request rather than emit a broken structure
                logger.error("request %s: token %d breaks its constraint; aborting it", request.request_id, token)
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                self._emit(request, self._delta(request, [], None, finished=True))
                continue
            status = self._check_stop(request, token)
            self.kv.register_computed(request)
            if status is not None:
                self._finish(request, status)
            self._emit(request, self._delta(request, [token], logprobs[k], finished=status is not None))

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.params
        n_out = request.num_output_tokens
        detok = self._detokenizers.get(request)
        stops = self._stop_strings.get(request)
        constrained_end = request.constraint is not None and request.constraint.done
        if token in request.stop_token_ids and (n_out > params.min_tokens or constrained_end):
            request.stop_reason = token
            self._end_text(request, detok, stops)
            return RequestStatus.FINISHED_STOPPED
        if detok is not None:
            piece = detok.add(token)
            if stops is None:
                request.text += piece
            else:  # the text grows by what can no longer be part of a stop string
                request.text += stops.push(piece, n_out)
                if stops.matched is not None:
                    request.stop_reason = stops.matched
                    return RequestStatus.FINISHED_STOPPED
        if n_out >= params.max_tokens or request.num_tokens >= self.max_model_len:
            self._end_text(request, detok, stops)
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _end_text(request: Request, detok: Any, stops: Any) -> None:
        """The rest of the text of a request that ends now."""
        if detok is not None:
            tail = detok.flush()
            request.text += tail if stops is None else stops.push(tail, request.num_output_tokens) + stops.flush()

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        if self.requests.get(request.request_id) is request:
            del self.requests[request.request_id]
        self._detokenizers.pop(request, None)
        stops = self._stop_strings.pop(request, None)
        if stops is not None:  # what it held back goes out with the last delta (an abort, say)
            request.text += stops.flush()
        if status is RequestStatus.FINISHED_ABORTED:
            self._timers.aborted += 1
        else:
            self._timers.finished += 1
        if request.lora is not None:
            name = request.lora.name
            self._lora_tokens[name] = self._lora_tokens.get(name, 0) + request.num_output_tokens
            if status is not RequestStatus.FINISHED_ABORTED:
                self._lora_requests[name] = self._lora_requests.get(name, 0) + 1

    def _delta(self, request: Request, new_tokens: list[int], logprob: TokenLogprob | None,
               finished: bool) -> RequestOutput:
        params = request.params
        text_end = len(request.text)  # stop strings hold back what could still become one (_check_stop)
        text = request.text[request.num_sent_text:text_end]
        request.num_sent_text = text_end
        request.num_sent_tokens += len(new_tokens)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_tokens,
            text=text,
            logprobs=([logprob] if logprob is not None else []) if params.logprobs is not None else None,
            finished=finished,
            finish_reason=request.finish_reason if finished else None,
            stop_reason=request.stop_reason if finished else None,
            usage=request.usage(),
            times=request.times() if finished else None,
        )

    def _emit(self, request: Request, output: RequestOutput) -> None:
        stream = self._streams.get(request)
        if stream is not None:
            stream._put(output)
            if output.finished:
                del self._streams[request]
        else:
            self._pending.append(output)

    def _take_pending(self) -> list[RequestOutput]:
        out, self._pending = self._pending, []
        return out

    # ------------------------------------------------------------------------------------------------ sync API
    def generate(self, requests: Sequence[tuple], eos_token_ids: Sequence[int] | None = None,
                 lora: str | Sequence[str | None] | None = None) -> list[GenerationResult]:
        """Run requests to completion together; results in input order.

        Each request is `(prompt_token_ids, params)`, `(prompt_token_ids, params, eos_token_ids)` (overriding
        `eos_token_ids` for that request, e.g. harmony's stop tokens for a chat prompt) or
        `(prompt_token_ids, params, eos_token_ids, constraint)`. `lora`: the LoRA adapter of every request, or a list
        with one adapter name (or None: the base model) per request. Every request is validated before any runs (a
        bad one raises ValueError, an unknown adapter LoraNotFoundError, and nothing is queued).
        """
        requests = list(requests)
        loras = per_request_lora(lora, len(requests))
        prepared = []
        for item, adapter in zip(requests, loras, strict=True):
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3, 4):
                raise ValueError("each request is (prompt_token_ids, params[, eos_token_ids[, constraint]])")
            eos = item[2] if len(item) >= 3 and item[2] is not None else eos_token_ids
            prepared.append(self._make_request(item[0], item[1], None, 0, eos, item[3] if len(item) == 4 else None,
                                               adapter))
        for request in prepared:
            self._register(request, None)
        ids = [r.request_id for r in prepared]
        wanted = {r.request_id: r for r in prepared}
        done: dict[str, GenerationResult] = {}
        try:
            while len(done) < len(wanted):
                for out in self.step():
                    if out.finished and out.request_id in wanted:
                        request = wanted[out.request_id]
                        done[out.request_id] = self.result(request)
                if not self.has_unfinished_requests() and len(done) < len(wanted):
                    break
        except BaseException:
            for request in prepared:
                self.abort(request.request_id)
            raise
        return [done[i] for i in ids]

    @staticmethod
    def result(request: Request) -> GenerationResult:
        return GenerationResult(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            text=request.text,
            finish_reason=request.finish_reason or "",
            stop_reason=request.stop_reason,
            logprobs=request.logprobs,
            usage=request.usage(),
        )

    # ------------------------------------------------------------------------------------------------ async loop
    def _ensure_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._run())
        else:
            self._wakeup.set()

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self.has_unfinished_requests():
                self._wakeup.clear()
                if not self.has_unfinished_requests():
                    await self._wakeup.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.step)
            except Exception as exc:  # a broken step fails every live request rather than hanging their streams
                self._fail_all(exc)
                continue
            del outputs  # only submit()-ed requests have no stream: do not mix submit()/step() with this loop
            await asyncio.sleep(0.001 if self._idle_step else 0)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            for request in list(self.requests.values()):
                stream = self._streams.pop(request, None)
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                if stream is not None:
                    stream._put(RuntimeError(f"engine step failed: {exc!r}"))

    async def shutdown(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # ------------------------------------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        with self._lock:
            tm, kv = self._timers, self.kv
            return EngineStats(
                num_running=len(self.scheduler.running),
                num_waiting=len(self.scheduler.waiting),
                kv_block_size=self.layout.block_size,
                kv_blocks_total=kv.num_blocks,
                kv_blocks_free=kv.num_free_blocks,
                kv_usage=kv.usage,
                kv_capacity_tokens=kv.num_blocks * self.layout.block_size,
                kv_cached_blocks=len(kv.pool.cached),
                prefix_cache_queries=kv.prefix_query_tokens,
                prefix_cache_hits=kv.prefix_hit_tokens,
                prefix_cache_query_requests=kv.prefix_query_requests,
                prefix_cache_hit_requests=kv.prefix_hit_requests,
                num_preemptions=self.scheduler.num_preemptions,
                num_steps=tm.steps,
                num_prefill_tokens=tm.prefill_tokens,
                num_decode_tokens=tm.decode_tokens,
                num_finished=tm.finished,
                num_aborted=tm.aborted,
                last_step_tokens=tm.last_tokens,
                last_step_time_s=tm.last_time,
                mean_tokens_per_step=tm.tokens / tm.steps if tm.steps else 0.0,
                mean_step_time_s=(tm.schedule + tm.execute + tm.sample + tm.output) / tm.steps if tm.steps else 0.0,
                time_schedule_s=tm.schedule,
                time_execute_s=tm.execute,
                time_sample_s=tm.sample,
                time_output_s=tm.output,
                expert_counts=self.executor.expert_counts(),
                # every registered adapter, at 0 until its first request ends, and any removed one that counted
                lora_requests={**dict.fromkeys(self.lora.registry, 0), **self._lora_requests},
                lora_generation_tokens={**dict.fromkeys(self.lora.registry, 0), **self._lora_tokens},
                lora_resident=self.lora.num_resident,
            )


def per_request_lora(lora: str | Sequence[str | None] | None, num_requests: int) -> list[str | None]:
    """`lora` as one adapter name (or None) per request: one name (or None) for all, or a list of them."""
    if lora is None or isinstance(lora, str):
        return [lora] * num_requests
    loras = list(lora)
    if len(loras) != num_requests:
        raise ValueError(f"{len(loras)} LoRA adapter names for {num_requests} requests")
    for name in loras:
        if name is not None and not isinstance(name, str):
            raise ValueError(f"a LoRA adapter is named by a string (or None: the base model), got {name!r}")
    return loras
