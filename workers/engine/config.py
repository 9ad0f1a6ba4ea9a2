"""EngineConfig: the knobs of one replica's engine core (KV pool size, batching, scheduling, sampling seed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """How one replica batches, caches and schedules.

    KV capacity: `num_blocks` fixes the pool size. Left None, on CUDA the pool takes `kv_memory_fraction` of the
    free device memory (vLLM's gpu_memory_utilization); on CPU, where it shares RAM with everything else on the
    node, it holds what the engine can use at once (`max_num_seqs` sequences of `max_model_len` tokens) within
    `cpu_kv_space_gib` GiB per shard (vLLM's VLLM_CPU_KVCACHE_SPACE) and `kv_memory_fraction` of MemAvailable, and
    its pages take RAM only as blocks are first written. `max_model_len` defaults to the model's context.

    With `enable_chunked_prefill` off a prompt runs in one step, so it must fit `max_num_batched_tokens` (a
    preempted request's recomputation is still chunked). `scheduling_policy` "priority" serves lower `priority`
    values first (ties by arrival) and preempts the highest value (newest first); "fcfs" ignores priorities.
    `seed` drives the sampling of requests without a seed of their own. `dequantize_experts` lets a local executor
    keep a dense copy of small models' MXFP4 experts (dequantized once instead of every step). `async_scheduling`
    schedules step N + 1 while step N runs (same outputs for greedy and seeded requests; False: the serial loop, for
    debugging). `max_loras` LoRA adapters are resident at once on each shard (an LRU pool over every registered
    adapter; vLLM's --max-loras), each of rank at most `max_lora_rank` (--max-lora-rank).
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_fraction: float = 0.5
    cpu_kv_space_gib: float = 4.0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    seed: int = 0
    count_expert_tokens: bool = True
    dequantize_experts: bool | None = None  # None: when the torch kernels run and dense experts fit in 1 GiB
    # schedule step N + 1 while step N runs (its sampled tokens fed in by the executor); False: the serial loop
    async_scheduling: bool = True
    max_loras: int = 4  # LoRA adapters resident at once (the distinct adapters one step can serve)
    max_lora_rank: int = 16  # adapters of a higher rank are refused when registered

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "max_loras", "max_lora_rank"):
            _positive_int(name, getattr(self, name))
        for name in ("num_blocks", "max_model_len"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        fraction = self.kv_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {fraction!r}")
        space = self.cpu_kv_space_gib
        if isinstance(space, bool) or not isinstance(space, (int, float)) or not 0 < space < float("inf"):
            raise ValueError(f"cpu_kv_space_gib must be a positive finite number, got {space!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "count_expert_tokens", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.dequantize_experts not in (None, True, False):
            raise ValueError(f"dequantize_experts must be true, false or null, got {self.dequantize_experts!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
