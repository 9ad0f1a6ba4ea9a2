"""Test doubles shared by several test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from gptoss_cluster.workers.engine import Executor, KVCacheLayout, SampledTokens, StepPlan


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ForwardingExecutor(Executor):
    """An executor that hands every call to `inner`: subclasses override the calls they watch (usually `execute`)."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    def kv_block_bytes(self, layout: KVCacheLayout) -> int:
        return self.inner.kv_block_bytes(layout)

    def device_type(self) -> str:
        return self.inner.device_type()

    def available_kv_memory(self) -> int:
        return self.inner.available_kv_memory()

    def initialize_cache(self, layout: KVCacheLayout, num_blocks: int) -> None:
        self.inner.initialize_cache(layout, num_blocks)

    def execute(self, plan: StepPlan, bitmask=None) -> SampledTokens:
        return self.inner.execute(plan, bitmask)

    def forward_logits(self, plan: StepPlan) -> torch.Tensor:
        return self.inner.forward_logits(plan)

    def expert_counts(self) -> torch.Tensor | None:
        return self.inner.expert_counts()

    def add_lora(self, slot, source) -> None:
        self.inner.add_lora(slot, source)

    def remove_lora(self, slot) -> None:
        self.inner.remove_lora(slot)

    def lora_bytes(self) -> int:
        return self.inner.lora_bytes()

    def shutdown(self) -> None:
        self.inner.shutdown()
