"""LoRA adapters on gpt-oss (PEFT format): loading one shard's slices, the per-step math, the resident pool.

    weights = load_adapter(LoraSource("sql", "/adapters/sql"), model.config, model.shard, max_lora_rank=16,
                           dtype=model.dtype, device=model.device)
    logits = model(token_ids, positions, kv, logits_at, lora=LoraBatch.single(weights))
    # in the engine: executor.add_lora(slot, source); StepPlan.lora_slots picks each request's slot
"""

from gptoss_cluster.workers.lora.adapter import (
    AdapterInfo,
    AdapterWeights,
    LoraError,
    LoraNotFoundError,
    LoraSource,
    load_adapter,
    read_adapter,
)
from gptoss_cluster.workers.lora.layers import LoraBatch
from gptoss_cluster.workers.lora.pool import LoraPool

__all__ = ["AdapterInfo", "AdapterWeights", "LoraBatch", "LoraError", "LoraNotFoundError", "LoraPool", "LoraSource",
           "load_adapter", "read_adapter"]
