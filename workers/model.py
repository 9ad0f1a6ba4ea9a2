"""The gpt-oss forward pass: embedding, alternating sliding/full attention blocks with sinks, MXFP4 MoE, unembedding.

One rank's shard of the model lives here (rank 0 of 1 holds everything). Under tensor/expert parallelism rank r holds
query and KV heads [r·n/G, (r+1)·n/G), experts [r·E/G, (r+1)·E/G) and a vocab slice; the partial results meet in
`Collective.all_reduce` / `all_gather`. All math goes through the `Kernels` bundle picked in kernels/dispatch.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from tqdm import tqdm

from gptoss_cluster.kernels.dispatch import Kernels, select_kernels
from gptoss_cluster.kernels.reference import rope_cos_sin, yarn_inv_freq
from gptoss_cluster.workers.config import ModelConfig

if TYPE_CHECKING:
    from gptoss_cluster.workers.lora.layers import LoraBatch


class Collective(Protocol):
    """The collectives a shard needs; identity for a single process."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor: ...


class SingleProcess:
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor


@dataclass(frozen=True)
class ShardSpec:
    """Which slice of the model this process holds."""

    rank: int = 0
    world_size: int = 1

    def span(self, total: int, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's equal share of `total` items."""
        if total % self.world_size:
            raise ValueError(f"{self.world_size} shards do not divide the {total} {what}")
        size = total // self.world_size
        return self.rank * size, (self.rank + 1) * size

    def validate(self, config: ModelConfig) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"shard rank {self.rank} is outside [0, {self.world_size})")
        self.span(config.num_key_value_heads, "KV heads")
        self.span(config.num_experts, "experts")
        self.span(config.vocab_size, "vocabulary entries")


class KVStore(Protocol):
    """Where attention keys/values live during a forward: stores this step's k/v of `layer`, returns attention."""

    def attend(self, kernels: Kernels, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, sinks: torch.Tensor, sliding_window: int | None,
               scale: float) -> torch.Tensor: ...


class KVCache:
    """Contiguous keys and values of one sequence, all layers: [capacity, local KV heads, head_dim] per layer.

    The simplest KVStore; the engine's paged, batched cache implements the same `attend`. The caller advances
    `length` once a forward over new tokens has finished.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 capacity: int = 256) -> None:
        shape = (capacity, num_kv_heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # tokens whose keys are complete in every layer

    def _reserve(self, layer: int, needed: int) -> None:
        capacity = self.keys[layer].shape[0]
        if needed > capacity:
            new_capacity = max(needed, 2 * capacity)
            for store in (self.keys, self.values):
                grown = store[layer].new_empty((new_capacity, *store[layer].shape[1:]))
                grown[:capacity] = store[layer]
                store[layer] = grown

    def attend(self, kernels: Kernels, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, sinks: torch.Tensor, sliding_window: int | None, scale: float) -> torch.Tensor:
        """Append this step's k, v [T, Hkv, D] for `layer` and attend q [T, Hq, D] over everything so far."""
        start, stop = self.length, self.length + q.shape[0]
        self._reserve(layer, stop)
        self.keys[layer][start:stop] = k
        self.values[layer][start:stop] = v
        key_start = 0
        if sliding_window is not None:  # keys older than the window are invisible to every query of this step
            key_start = max(0, start - sliding_window + 1)
        key_positions = torch.arange(key_start, stop, device=q.device)
        return kernels.attention(q, self.keys[layer][key_start:stop], self.values[layer][key_start:stop], sinks,
                                 positions, key_positions, sliding_window, scale)

    def positions(self, num_tokens: int) -> torch.Tensor:
        """Positions of the next `num_tokens` tokens of this sequence."""
        return torch.arange(self.length, self.length + num_tokens, device=self.keys[0].device)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class AttentionBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, shard: ShardSpec, dtype: torch.dtype) -> None:
        super().__init__()
        q0, q1 = shard.span(config.num_attention_heads, "attention heads")
        kv0, kv1 = shard.span(config.num_key_value_heads, "KV heads")
        self.num_heads, self.num_kv_heads, self.head_dim = q1 - q0, kv1 - kv0, config.head_dim
        self.sliding_window = config.sliding_window if config.is_sliding(layer) else None
        self.scale = config.head_dim**-0.5
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.register_buffer("norm_weight", torch.empty(config.hidden_size, dtype=torch.float32))
        self.register_buffer("qkv_weight", torch.empty(qkv_rows, config.hidden_size, dtype=dtype))
        self.register_buffer("qkv_bias", torch.empty(qkv_rows, dtype=dtype))
        self.register_buffer("sinks", torch.empty(self.num_heads, dtype=torch.float32))
        self.register_buffer("out_weight", torch.empty(config.hidden_size, self.num_heads * self.head_dim, dtype=dtype))
        self.register_buffer("out_bias", torch.empty(config.hidden_size, dtype=dtype))

    def forward(self, model: GptOssModel, layer: int, x: torch.Tensor, positions: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, kv: KVStore, lora: LoraBatch | None = None) -> torch.Tensor:
        k_ = model.kernels
        h = k_.rms_norm(x, self.norm_weight, model.config.rms_norm_eps)
        qkv = nn.functional.linear(h, self.qkv_weight, self.qkv_bias)
        if lora is not None:
            qkv = lora.add_qkv(layer, h, qkv)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # [T, (Hq + 2 Hkv) D] -> q [T, Hq, D], k/v [T, Hkv, D]
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        q, k = k_.apply_rope(q, cos, sin), k_.apply_rope(k, cos, sin)
        attn = kv.attend(k_, layer, q, k, v, positions, self.sinks, self.sliding_window, self.scale)
        attn = attn.reshape(attn.shape[0], -1)
        out = nn.functional.linear(attn, self.out_weight)
        if lora is not None:  # this rank's head columns: the partials meet in the all_reduce like the base's
            out = lora.add_o(layer, attn, out)
        # The o-projection is row-split across ranks: sum the partials, then add the bias once.
        return x + model.collective.all_reduce(out) + self.out_bias


class MLPBlock(nn.Module):
    def __init__(self, config: ModelConfig, shard: ShardSpec, dtype: torch.dtype) -> None:
        super().__init__()
        e0, e1 = shard.span(config.num_experts, "experts")
        self.first_expert, num_local = e0, e1 - e0
        hidden, inter = config.hidden_size, config.intermediate_size
        self.register_buffer("norm_weight", torch.empty(hidden, dtype=torch.float32))
        self.register_buffer("router_weight", torch.empty(config.num_experts, hidden, dtype=dtype))
        self.register_buffer("router_bias", torch.empty(config.num_experts, dtype=dtype))
        # Experts stay packed as MXFP4: [E_local, rows, K/32, 16] uint8 + [E_local, rows, K/32] uint8 scales.
        self.register_buffer("gate_up_blocks", torch.empty(num_local, 2 * inter, hidden // 32, 16, dtype=torch.uint8))
        self.register_buffer("gate_up_scales", torch.empty(num_local, 2 * inter, hidden // 32, dtype=torch.uint8))
        self.register_buffer("gate_up_bias", torch.empty(num_local, 2 * inter, dtype=dtype))
        self.register_buffer("down_blocks", torch.empty(num_local, hidden, inter // 32, 16, dtype=torch.uint8))
        self.register_buffer("down_scales", torch.empty(num_local, hidden, inter // 32, dtype=torch.uint8))
        self.register_buffer("down_bias", torch.empty(num_local, hidden, dtype=dtype))

    def forward(self, model: GptOssModel, layer: int, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        k_, cfg = model.kernels, model.config
        h = k_.rms_norm(x, self.norm_weight, cfg.rms_norm_eps)
        router_logits = nn.functional.linear(h, self.router_weight, self.router_bias)
        weights, expert_ids = k_.route(router_logits, cfg.experts_per_token)
        if model.expert_counts is not None:
            # Counted where the ids are (index_add_: bincount sizes its output from the data, a read-back on a GPU);
            # the host reads the counts when it collects statistics, not every layer of every step.
            ids = expert_ids.flatten()
            model.expert_counts[layer].index_add_(0, ids, torch.ones_like(ids))
        hook = None if lora is None else lora.experts(layer)
        extra = {} if hook is None else {"lora": hook}  # the base call unchanged when no adapter touches these experts
        out = k_.moe_experts(h, weights, expert_ids, self.gate_up_blocks, self.gate_up_scales, self.gate_up_bias,
                             self.down_blocks, self.down_scales, self.down_bias, cfg.swiglu_limit, cfg.swiglu_alpha,
                             self.first_expert, **extra)
        return x + model.collective.all_reduce(out)


class GptOssModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.bfloat16, shard: ShardSpec | None = None,
                 kernels: Kernels | None = None, collective: Collective | None = None) -> None:
        super().__init__()
        self.shard = shard or ShardSpec()
        self.shard.validate(config)
        self.config, self.dtype = config, dtype
        self.kernels = kernels or select_kernels("cpu")
        self.collective = collective or SingleProcess()
        self.vocab_start, self.vocab_stop = self.shard.span(config.vocab_size, "vocabulary entries")
        vocab_local = self.vocab_stop - self.vocab_start
        self.register_buffer("embedding", torch.empty(vocab_local, config.hidden_size, dtype=dtype))
        self.attention = nn.ModuleList(AttentionBlock(config, i, self.shard, dtype)
                                       for i in range(config.num_hidden_layers))
        self.mlp = nn.ModuleList(MLPBlock(config, self.shard, dtype) for _ in range(config.num_hidden_layers))
        self.register_buffer("norm_weight", torch.empty(config.hidden_size, dtype=torch.float32))
        self.register_buffer("unembedding", torch.empty(vocab_local, config.hidden_size, dtype=dtype))
        inv_freq, self.rope_scaling = yarn_inv_freq(
            config.head_dim, config.rope_theta, config.rope_scaling_factor, config.rope_original_context,
            config.rope_beta_fast, config.rope_beta_slow, config.rope_truncate,
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Routed-token counts per layer and expert, int64 [layers, experts] on the model's device, read by the
        # engine's statistics (None = not counting).
        self.expert_counts: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    def new_kv_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.config.num_hidden_layers, self.attention[0].num_kv_heads, self.config.head_dim,
                       self.dtype, self.device, capacity)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: each rank embeds the ids in its slice, zeros elsewhere, then the ranks sum."""
        local = token_ids - self.vocab_start
        inside = (local >= 0) & (local < self.embedding.shape[0])
        x = self.embedding[local.clamp(0, self.embedding.shape[0] - 1)] * inside[:, None].to(self.dtype)
        return self.collective.all_reduce(x)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVStore,
                logits_at: torch.Tensor, gather_logits: bool = True, lora: LoraBatch | None = None) -> torch.Tensor:
        """Flat tokens [T] at `positions` [T] -> float32 logits [len(logits_at), vocab] at rows `logits_at`.

        `kv` stores each layer's new keys and values and runs attention over what it holds: one contiguous sequence
        (KVCache) or the engine's paged batch of many. Only sampled rows need the unembedding, the largest matmul of
        a small model. `gather_logits=False`: this rank's vocabulary slice [len(logits_at), vocab / G] instead of the
        gathered rows (a vocab-parallel sampler takes it from there). `lora`: the step's adapters and the rows using
        each (workers.lora; `LoraBatch.single(weights)` for one adapter on every row); None = the base model.
        """
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scaling, self.dtype)
        x = self.embed(token_ids)
        for layer in range(self.config.num_hidden_layers):
            x = self.attention[layer](self, layer, x, positions, cos, sin, kv, lora)
            x = self.mlp[layer](self, layer, x, lora)
        h = self.kernels.rms_norm(x[logits_at], self.norm_weight, self.config.rms_norm_eps)
        logits = nn.functional.linear(h, self.unembedding).float()
        return self.collective.all_gather(logits, dim=-1) if gather_logits else logits

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, reader, dtype: torch.dtype = torch.bfloat16, shard: ShardSpec | None = None,
                        kernels: Kernels | None = None, collective: Collective | None = None,
                        device: torch.device | str = "cpu", progress: bool = True) -> GptOssModel:
        """Build the model reading only this shard's slices from an open `CheckpointReader`."""
        config = reader.config
        # Buffers are torch.empty on the target device: allocated once, filled below (a meta-device detour costs
        # seconds of torch._refs imports per process, which every shard of a replica pays at start).
        with torch.device(device):  # kernels for the device it runs on (Triton on CUDA), unless given
            model = cls(config, dtype, shard, kernels or select_kernels(device), collective)
        model.inv_freq.copy_(yarn_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_factor,
                                           config.rope_original_context, config.rope_beta_fast, config.rope_beta_slow,
                                           config.rope_truncate)[0])
        shard = model.shard
        rows = lambda start_stop: (slice(*start_stop),)  # noqa: E731
        head_dim = config.head_dim
        q_heads = shard.span(config.num_attention_heads, "attention heads")
        kv_heads = shard.span(config.num_key_value_heads, "KV heads")
        q_rows = rows(tuple(h * head_dim for h in q_heads))
        kv_rows = rows(tuple(h * head_dim for h in kv_heads))
        experts = rows(shard.span(config.num_experts, "experts"))
        vocab = rows((model.vocab_start, model.vocab_stop))

        def load(target: torch.Tensor, name: str, index: tuple[slice, ...] | None = None) -> None:
            reader.read(name, index, out=target)  # straight into the buffer: no second copy of the model

        load(model.embedding, "model.embed_tokens.weight", vocab)
        for i in tqdm(range(config.num_hidden_layers), desc="loading layers", disable=not progress, unit="layer"):
            p = f"model.layers.{i}."
            attn, mlp = model.attention[i], model.mlp[i]
            load(attn.norm_weight, p + "input_layernorm.weight")
            for part in ("weight", "bias"):
                pieces = [reader.read(f"{p}self_attn.{proj}_proj.{part}", r)
                          for proj, r in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))]
                getattr(attn, f"qkv_{part}").copy_(torch.cat(pieces, dim=0))
            load(attn.sinks, p + "self_attn.sinks", rows(q_heads))
            load(attn.out_weight, p + "self_attn.o_proj.weight", (slice(None), q_rows[0]))
            load(attn.out_bias, p + "self_attn.o_proj.bias")
            load(mlp.norm_weight, p + "post_attention_layernorm.weight")
            load(mlp.router_weight, p + "mlp.router.weight")
            load(mlp.router_bias, p + "mlp.router.bias")
            for proj in ("gate_up_proj", "down_proj"):
                short = proj.removesuffix("_proj")
                for suffix in ("blocks", "scales", "bias"):
                    load(getattr(mlp, f"{short}_{suffix}"), f"{p}mlp.experts.{proj}_{suffix}", experts)
        load(model.norm_weight, "model.norm.weight")
        load(model.unembedding, "lm_head.weight", vocab)
        return model.eval()
