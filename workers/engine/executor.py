"""Executors run what the engine decided: one `StepPlan` in, one `SampledTokens` out.

The engine core (scheduler, KV block manager) works on token ids and block ids only; the executor owns the model,
the KV pools and the device-side sampler. The contract, the same for every executor:

    execute(plan, bitmask=None) -> SampledTokens   # plan.sampling: how to pick each row's token (SamplingBatch)
    forward_logits(plan) -> logits                 # an explicit, separate call: the rows' float32 logits

`execute` runs the forward, then samples where the logits are (`workers.engine.sampler`: penalties, min_tokens,
token bitmasks, greedy / temperature / top-k / top-p / min-p, logprobs), and returns O(rows): token ids and only the
logprobs the rows asked for. `bitmask` (constrained rows' TokenBitmask, or a Future of it) is awaited only when
needed: `LocalExecutor` reads it after the forward (the engine fills it in a helper thread meanwhile), `RayExecutor`
before it sends the step (it travels with the plan). `LocalExecutor` runs one in-process `GptOssModel` (the offline
LLM, a one-shard replica, the CPU tests, and each rank of a sharded one); `RayExecutor` sends the same plan to G
ShardWorkers, each holding its heads / experts / vocab slice: rows that need the whole distribution are gathered to
rank 0 and sampled there, plain greedy rows are reduced vocab-parallel (`sampler.sample_vocab_parallel`). Plan and
result are plain dataclasses at the boundary, so the call can later return a future (asynchronous scheduling).
"""

from __future__ import annotations

import abc
import os
from concurrent.futures import Future
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

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_sampled(self) -> int:
        return int(self.logits_indices.shape[0])

    def sampling_batch(self) -> SamplingBatch:
        return self.sampling if self.sampling is not None else SamplingBatch.greedy(self.num_sampled)

    def to(self, device: torch.device | str) -> StepPlan:
        if torch.device(device).type == "cpu":
            return self
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return StepPlan(move(self.token_ids), move(self.positions), move(self.query_start_loc),
                        move(self.seq_lens), [move(t) for t in self.block_tables],
                        [move(t) for t in self.slot_mappings], move(self.logits_indices),
                        None if self.sampling is None else self.sampling.to(device))


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
    `available_kv_memory` (to size the pool), `initialize_cache` once, then `execute` once per step; `expert_counts`
    when it collects statistics."""

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

    @abc.abstractmethod
    def forward_logits(self, plan: StepPlan) -> torch.Tensor:
        """Run the step without sampling: float32 logits [S, vocab] (full vocabulary) on the host. For
        verification (`LLM.forward_logits`), not the step loop: it moves S x vocab floats."""

    def expert_counts(self) -> torch.Tensor | None:
        """Routed tokens per layer and expert so far, int64 [layers, experts] (None: not counted)."""
        return None

    def shutdown(self) -> None:
        return None


class LocalExecutor(Executor):
    """Runs an in-process `GptOssModel`, which it then owns: it may set the model's `expert_counts` and, with
    `dequantize_experts` (default: when the torch kernels run and a dense copy of the experts fits in 1 GiB), swap
    in a MoE that dequantizes each expert once instead of every step (bit-identical outputs)."""

    def __init__(self, model: GptOssModel, count_expert_tokens: bool = True,
                 dequantize_experts: bool | None = None) -> None:
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
        same plan; `bitmask` matters on rank 0 only): rank 0 gets the SampledTokens, the others None."""
        shard = self.model.shard
        if shard.world_size == 1:
            plan = plan.to(self.device)
            return sample_step(self._forward(plan), plan, bitmask)
        batch = plan.sampling_batch()  # stays on the host: the split into gathered and argmax rows reads it
        local = self._forward(replace(plan, sampling=None).to(self.device), gather_logits=False)
        if isinstance(bitmask, Future):
            bitmask = bitmask.result()
        return sample_vocab_parallel(local, batch, bitmask, self.model.vocab_start, self.model.collective,
                                     is_root=shard.rank == 0)

    def forward_logits(self, plan: StepPlan) -> torch.Tensor:
        return self.run_forward(plan).cpu()

    def run_forward(self, plan: StepPlan) -> torch.Tensor:
        """The forward alone, queued on the device: logits [S, V] there (a shard other than rank 0 runs only this)."""
        return self._forward(plan.to(self.device))

    def _forward(self, plan: StepPlan, gather_logits: bool = True) -> torch.Tensor:
        if self.layout is None:
            raise RuntimeError("initialize_cache must run before execute")
        store = PagedKVStore(self.layout, self.key_pools, self.value_pools, plan.slot_mappings, plan.block_tables,
                             plan.query_start_loc, plan.seq_lens)
        if not gather_logits:
            return self.model(plan.token_ids, plan.positions, store, plan.logits_indices, gather_logits=False)
        return self.model(plan.token_ids, plan.positions, store, plan.logits_indices)

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
