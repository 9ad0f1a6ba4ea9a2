"""Executors run what the engine decided: one `StepPlan` in, the logits rows to sample out.

The engine core (scheduler, KV block manager, sampler) works on token ids and block ids only; the executor owns the
model and the KV pools. `LocalExecutor` runs one in-process `GptOssModel` (the offline LLM and the CPU tests); a
RayExecutor will send the same plan to G ShardWorkers, each holding its heads / experts / vocab slice and its own
pools over the same block ids, and return rank 0's gathered logits.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass

import torch

from gptoss_cluster.workers.engine.experts import (
    DEFAULT_LIMIT_BYTES,
    DequantizedMoE,
    dense_expert_bytes,
    with_dequantized_experts,
)
from gptoss_cluster.workers.engine.kv_cache import KVCacheLayout, PagedKVStore, allocate_kv_pools
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

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def to(self, device: torch.device | str) -> StepPlan:
        if torch.device(device).type == "cpu":
            return self
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return StepPlan(move(self.token_ids), move(self.positions), move(self.query_start_loc),
                        move(self.seq_lens), [move(t) for t in self.block_tables],
                        [move(t) for t in self.slot_mappings], move(self.logits_indices))


class Executor(abc.ABC):
    """Runs steps on the model's shard(s). The engine calls, in order: `kv_block_bytes` / `device_type` /
    `available_kv_memory` (to size the pool), `initialize_cache` once, then `execute` once per step."""

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
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """float32 logits [len(plan.logits_indices), vocab] (full vocabulary)."""

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
            model.expert_counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.int64)

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

    def execute(self, plan: StepPlan) -> torch.Tensor:
        if self.layout is None:
            raise RuntimeError("initialize_cache must run before execute")
        plan = plan.to(self.device)
        store = PagedKVStore(self.layout, self.key_pools, self.value_pools, plan.slot_mappings, plan.block_tables,
                             plan.query_start_loc, plan.seq_lens)
        return self.model(plan.token_ids, plan.positions, store, plan.logits_indices)

    def expert_counts(self) -> torch.Tensor | None:
        counts = self.model.expert_counts
        return None if counts is None else counts.clone()


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
