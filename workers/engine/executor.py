"""Executors run what the engine decided: one `StepPlan` in, one `SampledTokens` out.

The engine core (scheduler, KV block manager) works on token ids and block ids only; the executor owns the model,
the KV pools and the device-side sampler. The contract, the same for every executor:

    execute(plan, bitmask=None) -> SampledTokens   # plan.sampling: how to pick each row's token (SamplingBatch)
    submit(plan, bitmask=None) -> Future[SampledTokens]  # async scheduling: queued behind the steps before it
    forward_logits(plan) -> logits                 # an explicit, separate call: the rows' float32 logits

`execute` runs the forward, then samples where the logits are (`workers.engine.sampler`: penalties, min_tokens,
token bitmasks, greedy / temperature / top-k / top-p / min-p, logprobs), and returns O(rows): token ids and only the
logprobs the rows asked for. `bitmask` (constrained rows' TokenBitmask, or a Future of it) is awaited only when
needed: `LocalExecutor` reads it after the forward (the engine fills it in a helper thread meanwhile), `RayExecutor`
before it sends the step (it travels with the plan). `LocalExecutor` runs one in-process `GptOssModel` (the offline
LLM, a one-shard replica, the CPU tests, and each rank of a sharded one); `RayExecutor` sends the same plan to G
ShardWorkers, each holding its heads / experts / vocab slice: rows that need the whole distribution are gathered to
rank 0 and sampled there, plain greedy rows are reduced vocab-parallel (`sampler.sample_vocab_parallel`). Plan and
result are plain dataclasses at the boundary.

Async scheduling: the engine submits step N + 1 while step N runs. A request step N samples is in step N + 1 with a
placeholder input (`StepPlan.fill_rows`), which the executor fills with the token step N sampled (`fill_from`):
the default `submit` does that on the host once step N's result is back; `RayExecutor.submit` sends step N + 1 at
once and the shards fill it from the tokens they keep (`LocalExecutor.run_step`), so the Ray round trip of one step
overlaps the next step's compute.
"""

from __future__ import annotations

import abc
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from gptoss_cluster.workers.engine.experts import (
    DEFAULT_LIMIT_BYTES,
    DequantizedMoE,
    dense_expert_bytes,
    with_dequantized_experts,
)
from gptoss_cluster.workers.engine.kv_cache import KVCacheLayout, PagedKVStore, allocate_kv_pools
from gptoss_cluster.workers.engine.sampler import (
    SampledTokens,
    SamplingBatch,
    TokenBitmask,
    sample,
    sample_vocab_parallel,
)
from gptoss_cluster.workers.lora.adapter import LoraSource, load_adapter
from gptoss_cluster.workers.lora.layers import LoraBatch
from gptoss_cluster.workers.lora.pool import LoraPool
from gptoss_cluster.workers.model import GptOssModel


@dataclass
class StepPlan:
    """One forward over a flat batch of T tokens from B requests (plain CPU tensors: cheap to ship to workers)."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32: request b owns rows [qsl[b], qsl[b + 1])
    seq_lens: torch.Tensor  # [B] int32: each request's context length after this step
    block_tables: list[torch.Tensor]  # per KV group: [B, max_blocks] int32
    slot_mappings: list[torch.Tensor]  # per KV group: [T] int64, block_id * block_size + offset of each token
    logits_indices: torch.Tensor  # [S] int64: rows whose next-token logits are sampled
    sampling: SamplingBatch | None = None  # how to sample those rows (None: greedy, nothing else)
    # Async scheduling: rows of token_ids that hold a placeholder for a token the step run just before this one
    # samples; the executor sets token_ids[fill_rows] = that step's token_ids[fill_from] (None: no placeholder)
    fill_rows: torch.Tensor | None = None  # [F] int64
    fill_from: torch.Tensor | None = None  # [F] int64
    # LoRA: each request's adapter slot in the executor's pool (add_lora), -1 = the base model. None: no request of
    # the step uses an adapter, and the base forward runs untouched.
    lora_slots: torch.Tensor | None = None  # [B] int32

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_sampled(self) -> int:
        return int(self.logits_indices.shape[0])

    def with_placeholders(self, tokens: torch.Tensor) -> StepPlan:
        """This plan with its placeholder rows set: `tokens` [F] are the previous step's sampled ids, already picked
        in `fill_from` order."""
        token_ids = self.token_ids.index_put((self.fill_rows,), tokens.to(self.token_ids.dtype))
        return replace(self, token_ids=token_ids, fill_rows=None, fill_from=None)

    def sampling_batch(self) -> SamplingBatch:
        return self.sampling if self.sampling is not None else SamplingBatch.greedy(self.num_sampled)

    def to(self, device: torch.device | str) -> StepPlan:
        if torch.device(device).type == "cpu":
            return self
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return StepPlan(move(self.token_ids), move(self.positions), move(self.query_start_loc),
                        move(self.seq_lens), [move(t) for t in self.block_tables],
                        [move(t) for t in self.slot_mappings], move(self.logits_indices),
                        None if self.sampling is None else self.sampling.to(device),
                        fill_rows=None if self.fill_rows is None else move(self.fill_rows),
                        fill_from=None if self.fill_from is None else move(self.fill_from),
                        lora_slots=None if self.lora_slots is None else move(self.lora_slots))


BitmaskSource = TokenBitmask | Future | None  # a Future resolves to a TokenBitmask or None


def sample_step(logits: torch.Tensor, plan: StepPlan, bitmask: BitmaskSource = None) -> SampledTokens:
    """The device half of a step after the forward: `plan`'s rows sampled from `logits` [S, V] (on their device,
    modified in place); the bitmask is awaited only now. Results stay on the device (`to_host` reads them)."""
    if isinstance(bitmask, Future):
        bitmask = bitmask.result()
    device = logits.device
    return sample(logits, plan.sampling_batch().to(device), None if bitmask is None else bitmask.to(device))


class Executor(abc.ABC):
    """Runs steps on the model's shard(s). The engine calls, in order: `kv_block_bytes` / `device_type` /
    `available_kv_memory` (to size the pool), `initialize_cache` once, then once per step `execute` (serial loop) or
    `submit` (async scheduling); `expert_counts` when it collects statistics."""

    _step_thread: ThreadPoolExecutor | None = None  # the default `submit`'s one worker thread (made on first use)
    _last_submitted: Future | None = None  # of the step submitted last: its tokens fill the next one's placeholders

    def device_type(self) -> str:
        """Where the KV pools live: "cpu" (sized by what the engine can use) or an accelerator type such as "cuda"
        (sized by a fraction of its memory). Executors on accelerators override this."""
        return "cpu"

    @abc.abstractmethod
    def kv_block_bytes(self, layout: KVCacheLayout) -> int:
        """Bytes one block id costs on the most loaded device."""

    @abc.abstractmethod
    def available_kv_memory(self) -> int:
        """Bytes free for the KV pool on the most constrained device."""

    @abc.abstractmethod
    def initialize_cache(self, layout: KVCacheLayout, num_blocks: int) -> None: ...

    @abc.abstractmethod
    def execute(self, plan: StepPlan, bitmask: BitmaskSource = None) -> SampledTokens:
        """Run the step and sample its rows (`plan.sampling`; `bitmask`: the constrained rows' allowed tokens, or a
        Future of them); the result is on the host: token ids [S], logprobs only for rows that asked."""

    def submit(self, plan: StepPlan, bitmask: BitmaskSource = None) -> Future:
        """Queue the step behind the ones submitted before and return a Future of its `SampledTokens` (async
        scheduling: the engine schedules the next step meanwhile). The plan's placeholder rows (`fill_rows`) take the
        tokens that the step submitted just before this one samples (`fill_from`); a failed step so fails the steps
        that take its tokens.

        This default runs `execute` on one worker thread, in submission order, and fills the placeholders on the
        host from the previous step's result. An executor that can send a step before the previous one's tokens are
        back overrides it (`RayExecutor`: the shards keep the tokens they sampled and fill the placeholders)."""
        previous = self._last_submitted
        if plan.fill_rows is not None and previous is None:
            raise ValueError("the plan has placeholder rows (fill_rows), but no step was submitted before it")
        if self._step_thread is None:
            self._step_thread = ThreadPoolExecutor(1, thread_name_prefix="gptoss-step")

        def run() -> SampledTokens:
            if plan.fill_rows is None:
                return self.execute(plan, bitmask)
            tokens = previous.result().token_ids  # done: submitted before, on this thread
            return self.execute(plan.with_placeholders(tokens[plan.fill_from]), bitmask)

        future = self._step_thread.submit(run)
        self._last_submitted = future
        return future

    @abc.abstractmethod
    def forward_logits(self, plan: StepPlan) -> torch.Tensor:
        """Run the step without sampling: float32 logits [S, vocab] (full vocabulary) on the host. For
        verification (`LLM.forward_logits`), not the step loop: it moves S x vocab floats."""

    def expert_counts(self) -> torch.Tensor | None:
        """Routed tokens per layer and expert so far, int64 [layers, experts] (None: not counted)."""
        return None

    def add_lora(self, slot: int, source: LoraSource) -> None:
        """Load adapter `source` into pool slot `slot` on every shard (replacing what the slot held); steps then
        select it with `StepPlan.lora_slots`. Raises LoraError (a bad adapter, a slot outside the pool)."""
        raise NotImplementedError(f"{type(self).__name__} does not serve LoRA adapters")

    def remove_lora(self, slot: int) -> None:
        """Empty pool slot `slot` on every shard."""
        raise NotImplementedError(f"{type(self).__name__} does not serve LoRA adapters")

    def lora_bytes(self) -> int:
        """Bytes of resident adapter weights on the most loaded shard."""
        return 0

    def shutdown(self) -> None:
        return None


class LocalExecutor(Executor):
    """Runs an in-process `GptOssModel`, which it then owns: it may set the model's `expert_counts` and, with
    `dequantize_experts` (default: when the torch kernels run and a dense copy of the experts fits in 1 GiB), swap
    in a MoE that dequantizes each expert once instead of every step (bit-identical outputs)."""

    def __init__(self, model: GptOssModel, count_expert_tokens: bool = True,
                 dequantize_experts: bool | None = None, max_loras: int = 4, max_lora_rank: int = 16) -> None:
        self.model = model
        self.model_config = model.config
        if dequantize_experts is None:
            dequantize_experts = model.kernels.name == "torch" and dense_expert_bytes(model) <= DEFAULT_LIMIT_BYTES
        if dequantize_experts and not isinstance(model.kernels.moe_experts, DequantizedMoE):
            model.kernels = with_dequantized_experts(model.kernels)
        self.device = model.device
        attn = model.attention[0]
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.layout: KVCacheLayout | None = None
        self.key_pools: list[torch.Tensor] = []
        self.value_pools: list[torch.Tensor] = []
        self.last_token_ids: torch.Tensor | None = None  # [S] on the device: what the last step sampled (rank 0)
        self.lora_pool = LoraPool(max_loras)  # this shard's slices of the resident adapters
        self.max_lora_rank = max_lora_rank
        if count_expert_tokens:
            cfg = model.config
            model.expert_counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.int64,
                                              device=self.device)

    def kv_block_bytes(self, layout: KVCacheLayout) -> int:
        return layout.block_bytes(self.num_kv_heads, self.head_dim, self.model.dtype)

    def device_type(self) -> str:
        return self.device.type

    def available_kv_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return _mem_available()

    def initialize_cache(self, layout: KVCacheLayout, num_blocks: int) -> None:
        self.layout = layout
        self.key_pools, self.value_pools = allocate_kv_pools(layout, num_blocks, self.num_kv_heads, self.head_dim,
                                                             self.model.dtype, self.device)

    def execute(self, plan: StepPlan, bitmask: BitmaskSource = None) -> SampledTokens:
        sampled = self.run_step(plan, bitmask)
        if sampled is None:
            raise RuntimeError(f"shard rank {self.model.shard.rank} does not sample; rank 0 returns the tokens")
        return sampled.to_host()  # the step's one wait for the device

    def run_step(self, plan: StepPlan, bitmask: BitmaskSource = None) -> SampledTokens | None:
        """Forward and sampling, everything queued on the device; nothing in here reads a device tensor back.
        A shard of a model split G > 1 ways samples vocab-parallel with its peers (every rank calls this with the
        same plan; `bitmask` matters on rank 0 only): rank 0 gets the SampledTokens, the others None. The plan's
        placeholder rows (`fill_rows`) take the tokens this executor's previous step sampled."""
        shard = self.model.shard
        lora = self._lora_batch(plan)
        if shard.world_size == 1:
            plan = self._fill_placeholders(plan.to(self.device))
            sampled = sample_step(self._forward(plan, lora=lora), plan, bitmask)
        else:
            batch = plan.sampling_batch()  # stays on the host: the split into gathered and argmax rows reads it
            local = self._forward(self._fill_placeholders(replace(plan, sampling=None).to(self.device)),
                                  gather_logits=False, lora=lora)
            if isinstance(bitmask, Future):
                bitmask = bitmask.result()
            sampled = sample_vocab_parallel(local, batch, bitmask, self.model.vocab_start, self.model.collective,
                                            is_root=shard.rank == 0)
        self.last_token_ids = None if sampled is None else sampled.token_ids
        return sampled

    def _fill_placeholders(self, plan: StepPlan) -> StepPlan:
        """`plan` (on the device) with its placeholder rows set to the tokens the previous step sampled. Only rank 0
        holds those (rows gathered to it were sampled there alone), so with G > 1 it sends the F ids the plan takes
        to every rank first: one all_reduce of [F] int64 (rank 0 adds its ids, the others zeros), on every rank
        alike, since every rank has the same plan."""
        if plan.fill_rows is None:
            return plan
        shard = self.model.shard
        if shard.rank == 0:
            if self.last_token_ids is None:
                raise RuntimeError("the plan has placeholder rows (fill_rows), but this executor sampled no step "
                                   "before it")
            tokens = self.last_token_ids[plan.fill_from]
        else:
            tokens = torch.zeros(plan.fill_from.shape[0], dtype=torch.long, device=self.device)
        if shard.world_size > 1:
            tokens = self.model.collective.all_reduce(tokens)
        return plan.with_placeholders(tokens)

    def forward_logits(self, plan: StepPlan) -> torch.Tensor:
        return self.run_forward(plan).cpu()

    def run_forward(self, plan: StepPlan) -> torch.Tensor:
        """The forward alone, queued on the device: logits [S, V] there (a shard other than rank 0 runs only this)."""
        return self._forward(plan.to(self.device), lora=self._lora_batch(plan))

    def _forward(self, plan: StepPlan, gather_logits: bool = True, lora: LoraBatch | None = None) -> torch.Tensor:
        if self.layout is None:
            raise RuntimeError("initialize_cache must run before execute")
        store = PagedKVStore(self.layout, self.key_pools, self.value_pools, plan.slot_mappings, plan.block_tables,
                             plan.query_start_loc, plan.seq_lens)
        options = {} if gather_logits else {"gather_logits": False}
        if lora is not None:  # a base step calls the model exactly as without LoRA
            options["lora"] = lora
        return self.model(plan.token_ids, plan.positions, store, plan.logits_indices, **options)

    # ------------------------------------------------------------------------------------------------ LoRA
    def _lora_batch(self, plan: StepPlan) -> LoraBatch | None:
        """The step's adapters and their rows, from the host plan (None: no request uses one)."""
        return self.lora_pool.batch(plan.lora_slots, plan.query_start_loc, self.device)

    def add_lora(self, slot: int, source: LoraSource) -> None:
        """Read this shard's slices of the adapter (the model's dtype, on its device) into pool slot `slot`; a bad
        adapter leaves the slot empty."""
        self.lora_pool.unload(slot)
        model = self.model
        weights = load_adapter(source, model.config, model.shard, self.max_lora_rank, model.dtype, self.device)
        self.lora_pool.load(slot, weights)

    def remove_lora(self, slot: int) -> None:
        self.lora_pool.unload(slot)

    def lora_bytes(self) -> int:
        return self.lora_pool.resident_bytes()

    def expert_counts(self) -> torch.Tensor | None:
        """The counts so far, copied to the host (they accumulate on the device, read only here)."""
        counts = self.model.expert_counts
        return None if counts is None else counts.to("cpu", copy=True)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
