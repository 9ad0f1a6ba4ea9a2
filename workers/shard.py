"""ShardWorker: one rank's slice of the model and its paged KV cache (one device; a Ray actor in a replica).

Rank r of G holds query/KV heads [r·H/G, (r+1)·H/G), experts [r·E/G, (r+1)·E/G) and a vocab slice, read straight
from the checkpoint (`GptOssModel.from_checkpoint` reads only these slices), and KV pools over the same block ids as
every other rank but for its own KV heads only. Per step every rank runs the forward on the same plan; the partial
results meet in torch.distributed collectives. Sampling happens where the logits are (`workers.engine.sampler`):
rows that need the whole distribution are gathered to rank 0 and sampled on its device, plain greedy rows are
reduced vocab-parallel; rank 0 alone returns the `SampledTokens`: O(rows) bytes, not the [rows, vocab] logits.

A plain class: `workers.engine.ray_executor` applies `ray.remote` to it, so this module imports without Ray. The call
order is `node_info` -> `free_port` (rank 0) -> `init_process_group` (all ranks together) -> `load` ->
`initialize_cache` -> `execute` per step; `add_lora` / `remove_lora` (every rank, between steps) fill and empty the
LoRA pool slots that `StepPlan.lora_slots` names (each rank holds its heads' and experts' slices).
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

import numpy as np
import torch

from gptoss_cluster.workers.engine.executor import LocalExecutor, StepPlan
from gptoss_cluster.workers.engine.kv_cache import KVCacheLayout
from gptoss_cluster.workers.engine.sampler import SampledTokens, TokenBitmask, map_tensors
from gptoss_cluster.workers.lora.adapter import LoraError, LoraSource
from gptoss_cluster.workers.parallel import (
    DEFAULT_TIMEOUT_S,
    TorchDistributedCollective,
    default_backend,
    destroy_process_group,
    find_free_port,
    init_process_group,
)

EXPERT_BUFFERS = ("gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks", "down_scales", "down_bias")


# ---------------------------------------------------------------------------------------------------- the wire
def encode(obj: Any) -> bytes:
    """A dataclass of host tensors (StepPlan with its SamplingBatch, TokenBitmask, SampledTokens) as one bytes object:
    its tensors as numpy arrays, pickled with protocol 5 (the torch tensor reducer goes through torch.save per
    tensor, several times slower). A plan is encoded once per step and shipped to every rank."""
    return pickle.dumps(map_tensors(obj, lambda t: t.numpy()), protocol=5)


def decode(data: bytes) -> Any:
    return map_tensors(pickle.loads(data), torch.from_numpy)


def encode_plan(plan: StepPlan) -> bytes:
    return encode(plan)


def decode_plan(data: bytes) -> StepPlan:
    return decode(data)


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------- the worker
class ShardWorker:
    def __init__(self, rank: int, world_size: int, device: str = "cpu", torch_threads: int | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        if torch.device(device).type == "cuda":
            # Ray hands each shard one GPU through CUDA_VISIBLE_DEVICES: it is cuda:0 in here.
            self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.collective: TorchDistributedCollective | None = None
        self.executor: LocalExecutor | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def node_info(self) -> dict[str, Any]:
        """Where this rank runs: node id and IP (from Ray when inside an actor), pid, visible GPUs."""
        info: dict[str, Any] = {"rank": self.rank, "pid": os.getpid(), "device": str(self.device),
                                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        try:
            import ray

            if ray.is_initialized():
                info["node_id"] = ray.get_runtime_context().get_node_id()
                info["ip"] = ray.util.get_node_ip_address()
        except ImportError:
            pass
        info.setdefault("node_id", None)
        info.setdefault("ip", "127.0.0.1")
        return info

    def free_port(self, host: str) -> int:
        return find_free_port(host)

    def init_process_group(self, master_addr: str, master_port: int, backend: str | None = None,
                           timeout_s: float = DEFAULT_TIMEOUT_S, local_ip: str | None = None) -> str:
        backend = backend or default_backend(self.device)
        init_process_group(self.rank, self.world_size, master_addr, master_port, backend, timeout_s, self.device,
                           local_ip)
        # Only rank 0 samples, so only rank 0 needs the gathered logits.
        self.collective = TorchDistributedCollective(gather_dst=0)
        return backend

    def load(self, model_path: str, dtype: torch.dtype = torch.bfloat16, kernels: str | None = None,
             count_expert_tokens: bool = True, max_loras: int = 4, max_lora_rank: int = 16) -> dict[str, Any]:
        """Read this rank's slices of the checkpoint; returns a summary of what it holds. `max_loras` LoRA slots
        (adapters of rank <= `max_lora_rank`) stay empty until `add_lora`."""
        from gptoss_cluster.kernels.dispatch import select_kernels
        from gptoss_cluster.workers.checkpoint import open_checkpoint
        from gptoss_cluster.workers.model import GptOssModel, ShardSpec, SingleProcess

        collective = self.collective
        if collective is None:
            if self.world_size != 1:
                raise RuntimeError("init_process_group must run before load when world_size > 1")
            collective = SingleProcess()
        with open_checkpoint(model_path) as reader:
            model = GptOssModel.from_checkpoint(reader, dtype=dtype, shard=ShardSpec(self.rank, self.world_size),
                                                kernels=select_kernels(self.device, kernels), collective=collective,
                                                device=self.device, progress=False)
        # The router is replicated: every rank sees the same routing, so rank 0's counts are the replica's.
        self.executor = LocalExecutor(model, count_expert_tokens=count_expert_tokens and self.rank == 0,
                                      max_loras=max_loras, max_lora_rank=max_lora_rank)
        return self.memory_report()

    # ------------------------------------------------------------------------------------------------ executor
    def _require(self) -> LocalExecutor:
        if self.executor is None:
            raise RuntimeError(f"shard {self.rank} has no model: load() must run first")
        return self.executor

    def kv_block_bytes(self, layout: KVCacheLayout) -> int:
        return self._require().kv_block_bytes(layout)

    def available_kv_memory(self) -> int:
        return self._require().available_kv_memory()

    def initialize_cache(self, layout: KVCacheLayout, num_blocks: int) -> int:
        """Allocate this rank's pools (its KV heads only); returns their bytes."""
        executor = self._require()
        executor.initialize_cache(layout, num_blocks)
        return sum(t.numel() * t.element_size() for t in executor.key_pools + executor.value_pools)

    def execute(self, plan: StepPlan | bytes, bitmask: TokenBitmask | bytes | None = None) -> bytes | None:
        """One step on every rank: the forward, then sampling (rows that need the whole distribution gathered to
        rank 0, plain greedy rows reduced vocab-parallel); rank 0 returns the encoded `SampledTokens` (token ids, and
        logprobs for rows that asked), the others None. `bitmask`: rank 0's only."""
        if isinstance(plan, bytes):
            plan = decode_plan(plan)
        if isinstance(bitmask, bytes):
            bitmask = decode(bitmask)
        sampled: SampledTokens | None = self._require().run_step(plan, bitmask)
        return None if sampled is None else encode(sampled.to_host())

    def forward_logits(self, plan: StepPlan | bytes) -> np.ndarray | None:
        """One forward on every rank, no sampling; rank 0 returns the float32 logits rows as a numpy array (Ray ships
        numpy arrays as raw buffers), the others None. Verification only: it moves rows x vocab floats."""
        if isinstance(plan, bytes):
            plan = decode_plan(plan)
        executor = self._require()
        if self.rank != 0:
            executor.run_forward(plan)
            return None
        return executor.forward_logits(plan).numpy()

    def expert_counts(self) -> torch.Tensor | None:
        return self._require().expert_counts()

    def add_lora(self, slot: int, source: LoraSource) -> str | None:
        """Load this rank's slices of an adapter into pool slot `slot`. A bad adapter is not a shard failure: its
        LoraError message comes back as the result (None = loaded), and the executor raises it."""
        try:
            self._require().add_lora(slot, source)
        except LoraError as exc:
            return str(exc)
        return None

    def remove_lora(self, slot: int) -> None:
        self._require().remove_lora(slot)

    def lora_bytes(self) -> int:
        return self._require().lora_bytes()

    # ------------------------------------------------------------------------------------------------ reports
    def memory_report(self) -> dict[str, Any]:
        """What this rank holds: expert bytes (MXFP4 blocks alone and all expert tensors), all weights, KV pools,
        and the process RSS."""
        executor = self._require()
        model = executor.model
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        mlp = model.mlp
        block_bytes = sum(nbytes(m.gate_up_blocks) + nbytes(m.down_blocks) for m in mlp)
        expert_bytes = sum(nbytes(getattr(m, name)) for m in mlp for name in EXPERT_BUFFERS)
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_local_experts": int(mlp[0].gate_up_blocks.shape[0]),
            "first_expert": int(mlp[0].first_expert),
            "num_kv_heads": int(model.attention[0].num_kv_heads),
            "num_heads": int(model.attention[0].num_heads),
            "vocab_rows": int(model.embedding.shape[0]),
            "expert_block_bytes": block_bytes,
            "expert_bytes": expert_bytes,
            "weight_bytes": sum(nbytes(b) for b in model.buffers()),
            "kv_bytes": sum(nbytes(t) for t in executor.key_pools + executor.value_pools),
            "lora_bytes": executor.lora_bytes(),
            "rss_bytes": rss_bytes(),
        }

    def time_collectives(self, rows: int, iters: int = 50) -> dict[str, float]:
        """Seconds per call of this rank's collectives at decode shapes: all_reduce of [rows, hidden] activations
        (model dtype) and the gather of [rows, vocab/G] float32 logits to rank 0 (benchmarks; every rank must call
        it together)."""
        import torch.distributed as dist

        executor, collective = self._require(), self.collective
        if collective is None:
            return {"all_reduce_s": 0.0, "gather_s": 0.0}
        model = executor.model
        x = torch.zeros(rows, model.config.hidden_size, dtype=model.dtype, device=self.device)
        logits = torch.zeros(rows, model.unembedding.shape[0], dtype=torch.float32, device=self.device)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        out = {}
        for name, op in (("all_reduce_s", lambda: collective.all_reduce(x)),
                         ("gather_s", lambda: collective.all_gather(logits, dim=-1))):
            for _ in range(3):
                op()
            sync()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                op()
            sync()
            out[name] = (time.perf_counter() - start) / iters
        return out

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        self.executor = None
        destroy_process_group()
