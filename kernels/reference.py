"""Plain-torch reference math for gpt-oss: the definition of correct, and the CPU path.

Every Triton kernel is tested against the function of the same job here. Nothing in this module knows about
checkpoints, layers or the engine: tensors in, tensors out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from gptoss_cluster.kernels.mxfp4 import dequantize_mxfp4


# ---------------------------------------------------------------------------------------------------- norms
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, scaled by `weight`, returned in x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * normed).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- RoPE
def yarn_inv_freq(
    head_dim: int,
    theta: float,
    factor: float,
    original_context: int,
    beta_fast: float,
    beta_slow: float,
    truncate: bool,
) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies [head_dim/2] and the attention-scaling factor applied to cos/sin.

    gpt-oss does not truncate the correction range to integers (HF `truncate: false`); doing so shifts the ramp
    and changes every rotation in the blended band.
    """
    half = head_dim // 2
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(half, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    attention_scaling = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_scaling


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, head_dim/2], already multiplied by YaRN's attention scaling."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return (freqs.cos() * attention_scaling).to(dtype), (freqs.sin() * attention_scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated in two halves (not interleaved pairs), cos/sin [T, head_dim/2]."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


# ---------------------------------------------------------------------------------------------------- attention
def attention_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """One sequence's attention: q [T, Hq, D] over k, v [S, Hkv, D] -> [T, Hq, D].

    Query t sees key s when k_positions[s] <= q_positions[t] and, on sliding layers, when
    q_positions[t] - k_positions[s] < sliding_window (the window counts the query itself).
    Each head's learned sink logit joins the softmax denominator and takes probability mass but has no value.
    GQA: query head h reads KV head h // (Hq / Hkv).
    """
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    # [Hkv, group, T, D] x [Hkv, 1, D, S] -> scores [Hkv, group, T, S]
    qg = q.float().reshape(q.shape[0], num_kv_heads, group, q.shape[2]).permute(1, 2, 0, 3)
    kg = k.float().permute(1, 2, 0)[:, None]
    scores = torch.matmul(qg, kg) * scale
    delta = q_positions[:, None] - k_positions[None, :]  # [T, S]
    visible = delta >= 0
    if sliding_window is not None:
        visible &= delta < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    sink_logits = sinks.float().reshape(num_kv_heads, group, 1, 1).expand(-1, -1, scores.shape[2], 1)
    logits = torch.cat((scores, sink_logits), dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    out = torch.matmul(probs, v.float().permute(1, 0, 2)[:, None])  # [Hkv, group, T, D]
    return out.permute(2, 0, 1, 3).reshape(q.shape).to(q.dtype)


# ---------------------------------------------------------------------------------------------------- MoE
def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k], expert ids [T, k]): top-k first, then softmax over the chosen k."""
    top_values, top_ids = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(top_values.float(), dim=-1).to(router_logits.dtype), top_ids


def expert_histogram(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: [T, k] ids -> [E] int64 counts."""
    return torch.bincount(expert_ids.flatten(), minlength=num_experts)


def swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """[N, 2I] interleaved (gate, linear) pairs -> [N, I]: gate clamped above, linear clamped both sides, +1."""
    gate, linear = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return (linear + 1) * gate * torch.sigmoid(alpha * gate)


class ExpertLora(Protocol):
    """Low-rank additions to one MoE layer's local experts (the LoRA hook of `moe_experts`; its maker lives in
    workers/lora, which kernels never import). `expert` is the local index, `token_idx` [N] the rows of x routed to
    it; each method adds its delta into `out` in place (rows whose token has no adapter stay as they are)."""

    def add_gate_up(self, expert: int, token_idx: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        """x [N, H] -> out [N, 2I] (interleaved gate/linear columns, before SwiGLU) += delta."""

    def add_down(self, expert: int, token_idx: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """hidden [N, I] -> out [N, H] (before the routing weights) += delta."""


def moe_experts(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_up_blocks: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_blocks: torch.Tensor,
    down_scales: torch.Tensor,
    down_bias: torch.Tensor,
    swiglu_limit: float,
    swiglu_alpha: float,
    first_expert: int = 0,
    *,
    lora: ExpertLora | None = None,
) -> torch.Tensor:
    """Mixture of MXFP4 experts: x [T, H] -> [T, H], each token the routing-weighted sum of its top-k experts.

    The expert tensors hold experts [first_expert, first_expert + E_local) (all of them, or one rank's range under
    expert parallelism); tokens routed elsewhere get nothing from here. Only experts that received tokens are
    dequantized, one at a time, so no dense copy of all experts ever exists.
    gate_up_blocks [E_local, 2I, H/32, 16], down_blocks [E_local, H, I/32, 16] (rows = output features).
    `lora`: adapters' low-rank additions to these experts (see `ExpertLora`); None = the base experts alone.
    """

    def dequantized(expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize_mxfp4(gate_up_blocks[expert], gate_up_scales[expert], x.dtype),  # [2I, H]
                dequantize_mxfp4(down_blocks[expert], down_scales[expert], x.dtype))  # [H, I]

    return mix_experts(x, expert_weights, expert_ids, gate_up_blocks.shape[0], dequantized, gate_up_bias, down_bias,
                       swiglu_limit, swiglu_alpha, first_expert, lora=lora)


def mix_experts(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    num_local: int,
    expert_matrices: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    gate_up_bias: torch.Tensor,
    down_bias: torch.Tensor,
    swiglu_limit: float,
    swiglu_alpha: float,
    first_expert: int = 0,
    *,
    lora: ExpertLora | None = None,
) -> torch.Tensor:
    """The per-token math of `moe_experts`, given each local expert's dense weights by `expert_matrices(e)` ->
    (gate_up [2I, H], down [H, I]) in x's dtype; asked only for experts that received tokens, once each.

    Shared with the executor's dequantize-once MoE, so that both give bit-identical outputs.
    """
    out = torch.zeros_like(x)
    local_ids = expert_ids - first_expert
    for expert in torch.unique(local_ids).tolist():
        if not 0 <= expert < num_local:
            continue
        token_idx, slot = torch.where(local_ids == expert)
        w1, w2 = expert_matrices(expert)
        rows = x[token_idx]
        hidden = torch.nn.functional.linear(rows, w1, gate_up_bias[expert].to(x.dtype))
        if lora is not None:
            lora.add_gate_up(expert, token_idx, rows, hidden)
        hidden = swiglu(hidden, swiglu_limit, swiglu_alpha)
        y = torch.nn.functional.linear(hidden, w2, down_bias[expert].to(x.dtype))
        if lora is not None:
            lora.add_down(expert, token_idx, hidden, y)
        out.index_add_(0, token_idx, y * expert_weights[token_idx, slot, None].to(x.dtype))
    return out
