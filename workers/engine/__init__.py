"""The engine core of one replica: scheduler, paged KV cache with prefix caching, step loop; executors that run the
model and sample on its device.

    engine = Engine.from_model(model, EngineConfig(num_blocks=2048))
    results = engine.generate([(prompt_ids, SamplingParams(temperature=0, max_tokens=32))])
    # or, inside asyncio: async for delta in engine.add_request(prompt_ids, params): ...
"""

from gptoss_cluster.workers.engine.config import EngineConfig
from gptoss_cluster.workers.engine.engine import Engine, EngineStats, RequestStream
from gptoss_cluster.workers.engine.executor import Executor, LocalExecutor, StepPlan
from gptoss_cluster.workers.engine.kv_cache import KVCacheLayout, KVCacheManager, PagedKVStore
from gptoss_cluster.workers.engine.request import (
    FinishReason,
    GenerationResult,
    Request,
    RequestOutput,
    RequestStatus,
    RequestTimes,
    TokenLogprob,
    Usage,
)
from gptoss_cluster.workers.engine.sampler import SampledTokens, SamplingBatch, TokenBitmask
from gptoss_cluster.workers.engine.scheduler import Scheduler, SchedulerOutput

__all__ = [
    "Engine", "EngineConfig", "EngineStats", "Executor", "FinishReason", "GenerationResult", "KVCacheLayout",
    "KVCacheManager", "LocalExecutor", "PagedKVStore", "Request", "RequestOutput", "RequestStatus", "RequestStream",
    "RequestTimes", "SampledTokens", "SamplingBatch", "Scheduler", "SchedulerOutput", "StepPlan", "TokenBitmask",
    "TokenLogprob", "Usage",
]
