"""Attention over a paged KV cache, plain torch: the reference (and CPU path) for the engine's batched steps.

The cache of one layer is a pool of fixed-size blocks, `k_cache` / `v_cache` [num_blocks, block_size, Hkv, D]; each
sequence of the batch owns a row of `block_tables` [B, max_blocks] (logical block i of the sequence lives in physical
block `block_tables[b, i]`). The queries of one step are flat, q [T, Hq, D], sequence b owning rows
`query_start_loc[b]:query_start_loc[b + 1]`; its keys span positions [0, seq_lens[b]) and its queries are the *last*
`query_len` of those positions (this step's keys are already written into the cache). So one call serves any mix of
prefill chunks (many queries per sequence, possibly continuing a cached prefix) and decode tokens (one query each).

Masking follows `kernels.reference.attention_with_sinks`: causal, plus on sliding layers `q_pos - k_pos < window`;
the per-head sink logit joins the softmax denominator. Blocks wholly before a sequence's window are never read, so
the engine may have returned them to the pool (their table entries may hold any valid block id, e.g. 0).
"""

from __future__ import annotations

import torch

from gptoss_cluster.kernels.reference import attention_with_sinks


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D] over the paged k/v of each sequence -> [T, Hq, D] (q's dtype).

    block_tables [B, max_blocks] int, query_start_loc [B + 1] int (row offsets into q), seq_lens [B] int (context
    length of each sequence after this step, this step's tokens included).
    """
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_seqs = len(lens)
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    block_size = k_cache.shape[1]
    decode = [b for b in range(num_seqs) if starts[b + 1] - starts[b] == 1]
    if len(decode) > 1:
        rows = torch.tensor([starts[b] for b in decode], device=q.device)
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, block_tables[decode],
                                      [lens[b] for b in decode], sinks, sliding_window, scale)
        decode_set = set(decode)
    else:
        decode_set = set()
    for b in range(num_seqs):
        if b in decode_set:
            continue
        q0, q1 = starts[b], starts[b + 1]
        if q1 == q0:
            continue
        length = lens[b]
        first_query = length - (q1 - q0)
        key_start = 0 if sliding_window is None else max(0, first_query - sliding_window + 1)
        first_block = key_start // block_size
        last_block = (length - 1) // block_size
        ids = block_tables[b, first_block:last_block + 1].long()
        k = k_cache[ids].flatten(0, 1)  # [n_blocks * block_size, Hkv, D]
        v = v_cache[ids].flatten(0, 1)
        base = first_block * block_size
        k, v = k[key_start - base:length - base], v[key_start - base:length - base]
        key_positions = torch.arange(key_start, length, device=q.device)
        query_positions = torch.arange(first_query, length, device=q.device)
        out[q0:q1] = attention_with_sinks(q[q0:q1], k, v, sinks, query_positions, key_positions, sliding_window,
                                          scale)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      lens: list[int], sinks: torch.Tensor, sliding_window: int | None, scale: float) -> torch.Tensor:
    """One query per sequence (its last position), all sequences at once: q [B, Hq, D] -> [B, Hq, D].

    Sequences are bucketed by how many blocks they read, so short ones are not padded to the longest; within a
    bucket the blocks are gathered contiguously ([B, S, Hkv * D]) and every query head meets every KV head's slice
    in one batched matmul (the other heads' slots are zero: a few wasted flops instead of a strided copy).
    """
    block_size = k_cache.shape[1]
    first = [0 if sliding_window is None else max(0, n - sliding_window) // block_size for n in lens]
    need = [(n - 1) // block_size - f + 1 for n, f in zip(lens, first, strict=True)]
    order = sorted(range(len(lens)), key=need.__getitem__)
    out = torch.empty_like(q)
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and need[order[stop]] * 2 <= need[order[start]] * 3:  # padding waste <= 1/3
            stop += 1
        rows = order[start:stop]
        index = torch.tensor(rows, device=q.device)
        out[index] = _decode_bucket(q[index], k_cache, v_cache, block_tables[index], [lens[i] for i in rows],
                                    [first[i] for i in rows], need[order[stop - 1]], sinks, sliding_window, scale)
        start = stop
    return out


def _decode_bucket(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   lens: list[int], first: list[int], num_blocks: int, sinks: torch.Tensor,
                   sliding_window: int | None, scale: float) -> torch.Tensor:
    device = q.device
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    width = num_kv_heads * head_dim
    span = num_blocks * block_size
    first_block = torch.tensor(first, device=device)
    logical = (first_block[:, None] + torch.arange(num_blocks, device=device)).clamp(max=block_tables.shape[1] - 1)
    ids = torch.gather(block_tables.long(), 1, logical).flatten()
    k = k_cache.index_select(0, ids).view(num_seqs, span, width).float()
    v = v_cache.index_select(0, ids).view(num_seqs, span, width).float()
    # Query head (h, g) as a row over all KV heads' slots, zero outside KV head h's: [B, Hq, Hkv * D].
    heads = torch.arange(num_kv_heads, device=device)
    spread = torch.zeros(num_seqs, num_kv_heads, group, num_kv_heads, head_dim, device=device)
    spread[:, heads, :, heads] = q.float().view(num_seqs, num_kv_heads, group, head_dim).transpose(0, 1)
    scores = torch.bmm(spread.view(num_seqs, num_q_heads, width), k.transpose(1, 2)) * scale  # [B, Hq, S]
    query_pos = torch.tensor(lens, device=device)[:, None] - 1
    key_pos = first_block[:, None] * block_size + torch.arange(span, device=device)
    hidden = key_pos > query_pos
    if sliding_window is not None:
        hidden |= query_pos - key_pos >= sliding_window
    scores.masked_fill_(hidden[:, None, :], float("-inf"))
    sink = sinks.float().view(1, num_q_heads, 1)
    top = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
    probs = torch.exp(scores - top)
    denominator = probs.sum(dim=-1, keepdim=True) + torch.exp(sink - top)
    mixed = torch.bmm(probs, v).view(num_seqs, num_kv_heads, group, num_kv_heads, head_dim)  # [B, Hq, Hkv * D]
    out = mixed[:, heads, :, heads].transpose(0, 1).reshape(num_seqs, num_q_heads, head_dim)
    return (out / denominator).to(q.dtype)
