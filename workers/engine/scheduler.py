"""The scheduler: which requests run in the next step, and how many of their tokens (continuous batching).

Every step spends a token budget (`max_num_batched_tokens`). Running requests come first: one token each when
decoding, or the next chunk of a prefill that did not fit earlier. Waiting requests are then admitted in order
(FCFS, or by priority then arrival) while the budget, the `max_num_seqs` cap and the KV pool allow, each starting
after its longest prefix-cache hit; with chunked prefill a long prompt takes whatever budget is left and continues
next step. A request of a LoRA adapter is admitted only when its adapter holds (or can take) one of the `max_loras`
pool slots (`LoraSlots`); otherwise it is passed over for this step and later requests of resident adapters or the
base model go ahead, as in vLLM. When a running request cannot get KV blocks, the newest running request (the lowest
priority first under the priority policy) is preempted: its blocks (and its adapter's slot) go back to the pool and
it waits to recompute prompt + output later.
Requests that could never run (longer than the context, or more blocks than the whole pool) are refused up front.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from gptoss_cluster.workers.engine.config import EngineConfig
from gptoss_cluster.workers.engine.kv_cache import KVCacheManager
from gptoss_cluster.workers.engine.lora_slots import LoraSlots
from gptoss_cluster.workers.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int  # the request's num_computed_tokens when scheduled: this step computes [start, start + num_new)
    samples: bool = False  # whether this step reaches the end of the request's tokens (so it samples the next)

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_new_tokens == self.request.num_tokens_with_pending


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int,
                 lora: LoraSlots | None = None) -> None:
        self.config = config
        self.kv = kv
        self.lora = lora if lora is not None else LoraSlots(config.max_loras)  # pins a slot per running request
        self.max_model_len = max_model_len
        self.use_priority = config.scheduling_policy == "priority"
        self.waiting: list[Request] = []  # kept sorted by sort_key
        self._waiting_keys: list[tuple[float, float, int]] = []
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self._seq = 0  # ties in the waiting order break by insertion

    # ------------------------------------------------------------------------------------------------ admission
    def check_request(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse, with the reason, a request that could never finish."""
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed the context "
                             f"of {self.max_model_len} tokens")
        if not self.config.enable_chunked_prefill and num_prompt_tokens > self.config.max_num_batched_tokens:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) exceeds max_num_batched_tokens "
                             f"({self.config.max_num_batched_tokens}) and chunked prefill is off")
        # The last sampled token is never fed back, so num_prompt + max_tokens - 1 tokens need KV at most.
        need = self.kv.layout.blocks_needed(num_prompt_tokens + max_tokens - 1, self.config.max_num_batched_tokens)
        if need > self.kv.num_blocks:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) need up to {need} KV "
                             f"blocks of {self.kv.block_size} tokens but the pool holds {self.kv.num_blocks}")

    def add(self, request: Request) -> None:
        self.check_request(request.num_prompt_tokens, request.params.max_tokens)
        request.status = RequestStatus.WAITING
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        key = (*request.sort_key(self.use_priority), self._seq)
        self._seq += 1
        at = bisect.bisect(self._waiting_keys, key)
        self._waiting_keys.insert(at, key)
        self.waiting.insert(at, request)

    def _pop_waiting(self, at: int = 0) -> Request:
        self._waiting_keys.pop(at)
        return self.waiting.pop(at)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[Request, ScheduledRequest] = {}

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            if num_new <= 0 or self._ends_with_pending(request):
                i += 1  # nothing to compute, or the token in flight is its last: no step for a token never used
                continue
            while True:
                if self.kv.allocate_slots(request, num_new):
                    scheduled[request] = ScheduledRequest(request, num_new, request.num_computed_tokens)
                    budget -= num_new
                    i += 1
                    break
                victim = max(self.running, key=lambda r: r.sort_key(self.use_priority))
                at = self.running.index(victim)
                self.running.pop(at)
                undone = scheduled.pop(victim, None)
                if undone is not None:
                    budget += undone.num_new_tokens
                if at < i:
                    i -= 1
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break

        # Admit waiting requests (not in a step that had to preempt: the pool is short already). One whose LoRA
        # adapter gets no slot is passed over (`at` moves on); any other shortage ends admission for this step.
        at = 0
        while (at < len(self.waiting) and budget > 0 and not out.preempted
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[at]
            if not self._acquire_lora(request):
                at += 1
                continue
            hit = self.kv.find_prefix(request)
            hit_tokens = hit.num_tokens if hit is not None else 0
            num_new = request.num_tokens - hit_tokens
            fresh_prompt = request.num_preemptions == 0
            if num_new > budget and fresh_prompt and not self.config.enable_chunked_prefill:
                self.release_lora(request)
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(request, num_new, hit):
                self.release_lora(request)
                break
            self._pop_waiting(at)
            self.kv.record_prefix_query(request.num_tokens, hit_tokens)
            if fresh_prompt:
                request.num_cached_tokens = hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.num_computed_tokens = hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request] = ScheduledRequest(request, num_new, hit_tokens)
            budget -= num_new

        out.scheduled = list(scheduled.values())
        for item in out.scheduled:  # advanced now (vLLM v1): the next schedule may run while this step is in flight
            item.request.num_computed_tokens = item.start + item.num_new_tokens
        return out

    def _ends_with_pending(self, request: Request) -> bool:
        """Whether the token a step in flight samples for `request` is known to be its last (max_tokens or the
        context reached), so nothing is scheduled after it (and no KV slot beyond check_request's sizing is asked)."""
        if not request.num_pending_tokens:
            return False
        return (request.num_output_tokens + request.num_pending_tokens >= request.params.max_tokens
                or request.num_tokens_with_pending >= self.max_model_len)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        self.release_lora(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(request)

    # ------------------------------------------------------------------------------------------------ endings
    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (any state): it leaves the queues and its blocks return to the pool at once."""
        if request.status in (RequestStatus.RUNNING,):
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            at = self.waiting.index(request)
            self.waiting.pop(at)
            self._waiting_keys.pop(at)
        request.status = status
        request.finished_time = time.monotonic()
        self.kv.free(request)
        self.release_lora(request)

    # ------------------------------------------------------------------------------------------------ LoRA slots
    def _acquire_lora(self, request: Request) -> bool:
        """Pin a pool slot for the request's adapter while it runs (base-model requests need none); False: none is
        free for it this step."""
        if request.lora is None:
            return True
        slot = self.lora.acquire(request.lora)
        if slot is None:
            return False
        request.lora_slot = slot
        return True

    def release_lora(self, request: Request) -> None:
        """Unpin the request's adapter slot, if it holds one (idempotent)."""
        if request.lora_slot >= 0:
            self.lora.release(request.lora_slot)
            request.lora_slot = -1
