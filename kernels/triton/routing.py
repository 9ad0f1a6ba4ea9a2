"""Router top-k + softmax over the chosen experts, and the expert histogram, as Triton kernels.

`route` matches kernels.reference.route: the k largest logits of each token (descending, ties to the lower expert
id), softmax over those k in float32, weights returned in the logits' dtype and ids as int64. `expert_histogram`
counts routed token-slots per expert (the MoE load metric): each program counts its block of slots into a
per-expert vector and adds it with one atomic per expert, so no two lanes of a program ever hit the same counter.
"""

from __future__ import annotations

import torch

import triton.language as tl
from gptoss_cluster.kernels.triton._jit import cdiv, check_device, jit, launch, next_power_of_2


@jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, counts_ptr, n_tokens, n_experts, logits_stride,
                  TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, K_PAD: tl.constexpr,
                  COUNT: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    token_ok = tokens < n_tokens
    logits = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * logits_stride + experts[None, :],
                     mask=token_ok[:, None] & (experts[None, :] < n_experts), other=0.0).to(tl.float32)
    # Only eligible lanes (real experts not chosen yet) compete; padding lanes never win.
    chosen_rank = tl.full([BLOCK_T, BLOCK_E], -1, tl.int32)
    eligible = experts[None, :] < n_experts
    slot = tl.arange(0, K_PAD)
    top_values = tl.full([BLOCK_T, K_PAD], float("-inf"), tl.float32)
    top_ids = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    for j in tl.static_range(TOP_K):
        masked = tl.where(eligible, logits, float("-inf"))
        best = tl.max(masked, axis=1)
        is_best = eligible & (masked == best[:, None])
        best_id = tl.min(tl.where(is_best, experts[None, :], BLOCK_E), axis=1)
        eligible = eligible & (experts[None, :] != best_id[:, None])
        chosen_rank = tl.where(experts[None, :] == best_id[:, None], j, chosen_rank)
        top_values = tl.where(slot[None, :] == j, best[:, None], top_values)
        top_ids = tl.where(slot[None, :] == j, best_id[:, None], top_ids)
    # Softmax over the chosen k; top_values[:, 0] is the row max.
    row_max = tl.max(top_values, axis=1)
    p = tl.where(slot[None, :] < TOP_K, tl.exp(top_values - row_max[:, None]), 0.0)
    p = p / tl.sum(p, axis=1)[:, None]
    out_mask = token_ok[:, None] & (slot[None, :] < TOP_K)
    out_offs = tokens[:, None].to(tl.int64) * TOP_K + slot[None, :]
    tl.store(weights_ptr + out_offs, p.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offs, top_ids.to(tl.int64), mask=out_mask)
    if COUNT:
        hits = tl.sum(((chosen_rank >= 0) & token_ok[:, None]).to(tl.int32), axis=0)
        tl.atomic_add(counts_ptr + experts, hits, mask=(experts < n_experts) & (hits > 0))


def _route_launch(router_logits: torch.Tensor, top_k: int, counts: torch.Tensor | None):
    check_device(router_logits)
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    n_tokens, n_experts = router_logits.shape
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, {n_experts}], got {top_k}")
    weights = torch.empty((n_tokens, top_k), dtype=router_logits.dtype, device=router_logits.device)
    ids = torch.empty((n_tokens, top_k), dtype=torch.int64, device=router_logits.device)
    block_e = next_power_of_2(n_experts)
    block_t = max(1, min(16, 2048 // block_e))
    launch(_route_kernel, (cdiv(n_tokens, block_t),), router_logits, weights, ids,
           counts if counts is not None else ids, n_tokens, n_experts, router_logits.stride(0),
           TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e, K_PAD=next_power_of_2(top_k), COUNT=counts is not None,
           num_warps=4, num_stages=1)
    return weights, ids


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k] in the logits' dtype, expert ids [T, k] int64)."""
    return _route_launch(router_logits, top_k, None)


def route_with_histogram(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route` plus the per-expert routed-slot counts [E] int32, in the same launch."""
    counts = torch.zeros(router_logits.shape[-1], dtype=torch.int32, device=router_logits.device)
    weights, ids = _route_launch(router_logits, top_k, counts)
    return weights, ids, counts


@jit
def _histogram_kernel(ids_ptr, counts_ptr, n_slots, n_experts, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    slots = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ids = tl.load(ids_ptr + slots, mask=slots < n_slots, other=-1).to(tl.int32)
    experts = tl.arange(0, BLOCK_E)
    hits = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + experts, hits, mask=(experts < n_experts) & (hits > 0))


def expert_histogram(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token-slots routed to each expert: [T, k] ids -> [E] int64 counts (ids outside [0, E) are not counted)."""
    check_device(expert_ids)
    ids = expert_ids.reshape(-1).contiguous()
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    block_e = next_power_of_2(num_experts)
    block_s = max(16, min(256, 8192 // block_e))
    launch(_histogram_kernel, (cdiv(ids.numel(), block_s),), ids, counts, ids.numel(), num_experts,
           BLOCK_S=block_s, BLOCK_E=block_e, num_warps=4, num_stages=1)
    return counts.to(torch.int64)
