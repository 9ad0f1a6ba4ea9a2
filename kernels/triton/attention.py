"""Attention with per-head sinks, GQA and sliding windows, in Triton: over the paged KV cache (the engine's batched
steps) and over one contiguous sequence (the reference `attention_with_sinks` signature).

Paged (`paged_attention`, same signature as kernels.paged.paged_attention): one kernel serves decode tokens, prefill
chunks and chunked prefill that continues a cached prefix, in any mix. A program owns BLOCK_Q consecutive queries of
one sequence and one KV head, and all GROUP query heads that read that KV head: its M = BLOCK_Q·GROUP rows share
every K/V tile it loads (decode: one token x 8 heads fills most of a 16-row tensor-core tile). The grid's first axis
is an upper bound on query tiles, T // BLOCK_Q + B (sequence b's tiles start at query_start_loc[b] // BLOCK_Q + b;
a program finds its sequence by binary search and surplus programs return), so no count is read back to the host.
A sequence's queries are the last query_len positions of its seq_len keys: query i sits at position
seq_len - query_len + i and sees keys at positions [max(0, p - window + 1), p] through the block table, every
cached key before the chunk included. Key tiles are gathered per key through the block table, so any page size and
any alignment of the window work, and blocks wholly before the window are never touched.

Split-K (flash-decoding): when the batch is too small to fill the GPU (decode, short chunks), each tile's key range
is cut into up to `num_splits` chunks (whole key tiles, at least MIN_SPLIT_KEYS each, so short contexts use fewer)
handled by separate programs that write unnormalised partials (acc, running max, running sum); `_combine_kernel`
merges them together with the sink logit. Without splits the sink seeds the online
softmax (running max = sink, running sum = 1), so a row that sees no key still yields a finite (zero) output.

Scores use exp2 with log2(e) folded into the scale. tl.dot gets bf16/fp16 operands on the GPU and fp32 (ieee) ones
in the interpreter or for fp32 caches (DOT_FP32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import triton.language as tl
from gptoss_cluster.kernels.triton._jit import (
    cdiv,
    check_device,
    dot_fp32,
    interpreting,
    jit,
    launch,
    next_power_of_2,
    num_sms,
)

LOG2E = 1.4426950408889634
MAX_SPLITS = 32
MIN_SPLIT_KEYS = 256  # below this a split's fixed costs (q load, partial write, combine read) outweigh its keys


@jit
def _query_rows(tile, kv_head, num_q, BLOCK_Q: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr):
    """A program's M = BLOCK_Q·GROUP_PAD rows, query-major: each row's query index, query head, and whether it is
    real (past the last query or in GROUP's padding to a power of two it is not)."""
    r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    qi = tile * BLOCK_Q + r // GROUP_PAD
    head_in_group = r % GROUP_PAD
    row_ok = (qi < num_q) & (head_in_group < GROUP)
    return qi, kv_head * GROUP + head_in_group, row_ok


@jit
def _attend_keys(q, k, v, visible, m_i, l_i, acc, qk_scale, DT: tl.constexpr, DOT_FP32: tl.constexpr):
    """One online-softmax step over a tile of keys: the scores q·k^T (base 2: log2(e) is in qk_scale) where
    `visible`, folded into the running max `m_i`, running sum `l_i` and unnormalised output `acc`."""
    if DOT_FP32:
        s = tl.dot(q, tl.trans(k.to(DT)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k.to(DT)))
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen neither a key nor a sink (a split's partial starts at -inf) keeps p = alpha = 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_FP32:
        acc = tl.dot(p, v.to(DT), acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(DT), v.to(DT), acc * alpha[:, None])
    return m_new, l_i, acc


@jit
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, block_tables_ptr, qsl_ptr, seq_lens_ptr, sinks_ptr,
                            out_ptr, part_acc_ptr, part_ml_ptr,
                            num_seqs, num_tokens, num_q_heads, num_splits, min_split_keys, window, qk_scale,
                            q_stride_t, q_stride_h, o_stride_t, o_stride_h,
                            k_stride_b, k_stride_t, k_stride_h, v_stride_b, v_stride_t, v_stride_h, bt_stride,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                            SLIDING: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # The sequence owning tile `pid`: the largest b with query_start_loc[b] // BLOCK_Q + b <= pid.
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid
        else:
            hi = mid - 1
    seq = lo
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    M: tl.constexpr = BLOCK_Q * GROUP_PAD
    qi, head, row_ok = _query_rows(tile, kv_head, q_len, BLOCK_Q, GROUP, GROUP_PAD)
    pos = seq_len - q_len + qi  # query positions
    token = (q_start + qi).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + token[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                mask=row_ok[:, None], other=0.0)
    DT: tl.constexpr = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
    q = q.to(DT)

    # This tile's keys: [k_lo, k_hi), then this program's share of them.
    first_pos = seq_len - q_len + tile * BLOCK_Q
    k_hi = seq_len - q_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)
    if SLIDING:
        k_lo = tl.maximum(first_pos - window + 1, 0)
    else:
        k_lo = first_pos * 0
    if SPLIT:
        # Equal chunks of whole key tiles, at least min_split_keys each: short contexts use fewer splits, and the
        # programs left without keys only mark their partial empty.
        chunk = tl.cdiv(tl.maximum(tl.cdiv(k_hi - k_lo, num_splits), min_split_keys), BLOCK_N) * BLOCK_N
        k_lo = k_lo + split * chunk
        k_hi = tl.minimum(k_hi, k_lo + chunk)
        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
    else:
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
        m_i = sink * 1.4426950408889634
        l_i = tl.full([M], 1.0, tl.float32)
    acc = tl.zeros([M, HEAD_DIM], tl.float32)

    table = block_tables_ptr + seq.to(tl.int64) * bt_stride
    for start in range(k_lo, k_hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        kmask = kpos < k_hi
        page = tl.load(table + kpos // PAGE, mask=kmask, other=0).to(tl.int64)
        slot = kpos % PAGE
        k = tl.load(k_ptr + (page * k_stride_b + slot * k_stride_t + kv_head * k_stride_h)[:, None] + d[None, :],
                    mask=kmask[:, None], other=0.0)
        v = tl.load(v_ptr + (page * v_stride_b + slot * v_stride_t + kv_head * v_stride_h)[:, None] + d[None, :],
                    mask=kmask[:, None], other=0.0)
        visible = kmask[None, :] & (kpos[None, :] <= pos[:, None])
        if SLIDING:
            visible = visible & (pos[:, None] - kpos[None, :] < window)
        m_i, l_i, acc = _attend_keys(q, k, v, visible, m_i, l_i, acc, qk_scale, DT, DOT_FP32)

    if SPLIT:
        part = (split * num_tokens + token) * num_q_heads + head  # [M] rows of [splits, T, Hq]
        if k_lo < k_hi:
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + token[:, None] * o_stride_t + head[:, None] * o_stride_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@jit
def _combine_kernel(part_acc_ptr, part_ml_ptr, sinks_ptr, out_ptr, num_tokens, num_q_heads, num_splits,
                    o_stride_t, o_stride_h, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    smask = splits < num_splits
    part = (splits * num_tokens + token).to(tl.int64) * num_q_heads + head
    m = tl.load(part_ml_ptr + part * 2, mask=smask, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=smask, other=0.0)
    sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
    m_all = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.exp2(m - m_all)  # 0 for empty splits (m = -inf)
    denom = tl.sum(l_s * w, axis=0) + tl.exp2(sink - m_all)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=(smask & (l_s > 0))[:, None],
                  other=0.0)  # empty splits wrote no acc
    out = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(out_ptr + token.to(tl.int64) * o_stride_t + head * o_stride_h + d, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class AttentionConfig:
    block_q: int  # query tokens per program (x GROUP heads = M rows)
    block_n: int  # keys per iteration
    num_splits: int
    num_warps: int
    num_stages: int


def attention_config(num_tokens: int, num_seqs: int, num_kv_heads: int, group: int, device: torch.device,
                     num_splits: int | None = None) -> AttentionConfig:
    """Block sizes from shapes the host knows (no context lengths: those live on the device)."""
    group_pad = next_power_of_2(group)
    decode_like = num_tokens <= num_seqs
    rows = 16 if decode_like else 64
    block_q = max(1, rows // group_pad)
    if block_q * group_pad < 16:
        block_q = 16 // group_pad
    tiles = num_tokens // block_q + num_seqs
    if num_splits is None:
        programs = tiles * num_kv_heads
        sms = num_sms(device)
        num_splits = 1
        if num_tokens <= 4 * num_seqs and programs < 4 * sms:  # decode-like and fewer than ~4 programs per SM
            num_splits = min(MAX_SPLITS, cdiv(4 * sms, programs))
            if interpreting():  # the interpreter runs programs one after another: splitting buys nothing there
                num_splits = min(num_splits, 2)
    block_n = 64
    return AttentionConfig(block_q, block_n, max(1, num_splits), 4, 2)


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
    *,
    num_splits: int | None = None,
    min_split_keys: int = MIN_SPLIT_KEYS,
) -> torch.Tensor:
    """q [T, Hq, D] over the paged k/v [num_blocks, block_size, Hkv, D] of each sequence -> [T, Hq, D].

    Same contract as kernels.paged.paged_attention; `num_splits` forces the split-K factor and `min_split_keys` the
    smallest key range worth a split of its own (tests, benchmarks).
    """
    check_device(q, k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = block_tables.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV head groups")
    if head_dim != next_power_of_2(head_dim) or page != next_power_of_2(page):
        raise ValueError(f"head_dim ({head_dim}) and block_size ({page}) must be powers of two")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache / v_cache need a unit stride in head_dim")
    group = num_q_heads // num_kv_heads
    cfg = attention_config(num_tokens, num_seqs, num_kv_heads, group, q.device, num_splits)
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    qsl = query_start_loc.to(torch.int32) if query_start_loc.dtype != torch.int32 else query_start_loc
    lens = seq_lens.to(torch.int32) if seq_lens.dtype != torch.int32 else seq_lens
    split = cfg.num_splits > 1
    if split:
        part_acc = torch.empty((cfg.num_splits, num_tokens, num_q_heads, head_dim), dtype=torch.float32,
                               device=q.device)
        part_ml = torch.empty((cfg.num_splits, num_tokens, num_q_heads, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out
    window = sliding_window if sliding_window is not None else 0
    grid = (num_tokens // cfg.block_q + num_seqs, num_kv_heads, cfg.num_splits)
    launch(_paged_attention_kernel, grid, q, k_cache, v_cache, block_tables, qsl, lens, sinks, out, part_acc,
           part_ml, num_seqs, num_tokens, num_q_heads, cfg.num_splits, max(1, min_split_keys), window,
           float(scale) * LOG2E,
           q.stride(0), q.stride(1), out.stride(0), out.stride(1),
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
           v_cache.stride(2), block_tables.stride(0),
           GROUP=group, GROUP_PAD=next_power_of_2(group), BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n,
           HEAD_DIM=head_dim, PAGE=page, SLIDING=sliding_window is not None, SPLIT=split,
           DOT_FP32=dot_fp32(q, k_cache), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split:
        launch(_combine_kernel, (num_tokens, num_q_heads), part_acc, part_ml, sinks, out, num_tokens, num_q_heads,
               cfg.num_splits, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
               BLOCK_S=max(MAX_SPLITS, next_power_of_2(cfg.num_splits)), num_warps=2, num_stages=1)
    return out


# ---------------------------------------------------------------------------------------------------- contiguous
@jit
def _dense_attention_kernel(q_ptr, k_ptr, v_ptr, sinks_ptr, q_pos_ptr, k_pos_ptr, out_ptr,
                            num_q, num_k, window, qk_scale,
                            q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                            o_stride_t, o_stride_h,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SLIDING: tl.constexpr,
                            DOT_FP32: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    M: tl.constexpr = BLOCK_Q * GROUP_PAD
    qi, head, row_ok = _query_rows(tile, kv_head, num_q, BLOCK_Q, GROUP, GROUP_PAD)
    pos = tl.load(q_pos_ptr + qi, mask=qi < num_q, other=0)
    d = tl.arange(0, HEAD_DIM)
    qi64 = qi.to(tl.int64)
    DT: tl.constexpr = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
    q = tl.load(q_ptr + qi64[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                mask=row_ok[:, None], other=0.0).to(DT)
    sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
    m_i = sink * 1.4426950408889634
    l_i = tl.full([M], 1.0, tl.float32)
    acc = tl.zeros([M, HEAD_DIM], tl.float32)
    for start in range(0, num_k, BLOCK_N):
        kj = start + tl.arange(0, BLOCK_N)
        kmask = kj < num_k
        kpos = tl.load(k_pos_ptr + kj, mask=kmask, other=0)
        kj64 = kj.to(tl.int64)
        k = tl.load(k_ptr + kj64[:, None] * k_stride_t + kv_head * k_stride_h + d[None, :], mask=kmask[:, None],
                    other=0.0)
        v = tl.load(v_ptr + kj64[:, None] * v_stride_t + kv_head * v_stride_h + d[None, :], mask=kmask[:, None],
                    other=0.0)
        delta = pos[:, None] - kpos[None, :]
        visible = kmask[None, :] & (delta >= 0)
        if SLIDING:
            visible = visible & (delta < window)
        m_i, l_i, acc = _attend_keys(q, k, v, visible, m_i, l_i, acc, qk_scale, DT, DOT_FP32)
    out = acc / l_i[:, None]
    tl.store(out_ptr + qi64[:, None] * o_stride_t + head[:, None] * o_stride_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


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
    """One sequence's attention, q [T, Hq, D] over k, v [S, Hkv, D] -> [T, Hq, D]; see the reference."""
    check_device(q, k, v)
    num_q, num_q_heads, head_dim = q.shape
    num_k, num_kv_heads = k.shape[0], k.shape[1]
    out = torch.empty_like(q)
    if num_q == 0:
        return out
    if head_dim != next_power_of_2(head_dim):
        raise ValueError(f"head_dim ({head_dim}) must be a power of two")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    group = num_q_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    block_q = max(1, (64 if num_q > 8 else 16) // group_pad)
    grid = (cdiv(num_q, block_q), num_kv_heads)
    launch(_dense_attention_kernel, grid, q, k, v, sinks, q_positions.to(torch.int32).contiguous(),
           k_positions.to(torch.int32).contiguous(), out, num_q, num_k,
           sliding_window if sliding_window is not None else 0, float(scale) * LOG2E,
           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
           GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=64, HEAD_DIM=head_dim,
           SLIDING=sliding_window is not None, DOT_FP32=dot_fp32(q, k), num_warps=4, num_stages=2)
    return out

