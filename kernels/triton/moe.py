"""Mixture of MXFP4 experts in Triton: group token-slots by expert, two grouped GEMMs that dequantize MXFP4 in
registers, combine back to token order. Same signature and meaning as kernels.reference.moe_experts.

The pipeline for x [T, H] routed to k experts per token (N = T·k token-slots, slot s = t·k + j):

1. grouping (three small kernels, no host synchronisation, deterministic):
   `_moe_hist_kernel`     per block of slots, how many go to each local expert          -> hist [NB, E_local]
   `_moe_offsets_kernel`  exclusive prefix of hist over blocks (in place), per-expert row offsets
                          `expert_start` [E_local + 1] and M-tile offsets `tile_start` [E_local + 1]
   `_moe_scatter_kernel`  each slot's row in expert-sorted order (stable: token order within an expert):
                          `sorted_slot` [rows] and its inverse `slot_row` [N] (-1: the expert lives on another rank)
   Slots routed to experts outside [first_expert, first_expert + E_local) get no row: they contribute nothing.
2. `_moe_gemm_kernel` (GATE_UP=True): row r of expert e gathers x[sorted_slot[r] // k] and multiplies by the
   expert's [2I, H] weight, dequantized tile by tile from MXFP4 in registers; the epilogue adds the bias and applies
   the clamped SwiGLU to the interleaved (gate, linear) column pairs -> inter [rows, I].
3. `_moe_gemm_kernel` (GATE_UP=False): inter @ down^T + bias, times the slot's routing weight -> y [rows, H].
4. `_moe_combine_kernel`: out[t] = sum_j y[slot_row[t·k + j]] in slot order (float32 sum, no atomics).

The GEMM grid is an upper bound on the number of (expert, M-tile) pairs, N // BLOCK_M + min(N, E_local); each
program finds its expert in `tile_start` and surplus programs return at once. So every shape launches the same
kernels without reading a count back to the host, experts with no tokens cost nothing, and decode-sized batches
(one row per expert) read each needed expert weight exactly once per N-tile.

MXFP4 dequantisation (`_mxfp4_tile`): a tile of packed bytes [BLOCK_N, BLOCK_K/32, 16] splits into low/high
nibbles; e2m1 code c maps to float16 bits ((c & 7) << 9) | ((c & 8) << 12), which is exactly value · 2^-14 (code 1,
the subnormal 0.5, becomes the float16 subnormal 2^-15); the e8m0 scale byte s becomes float32 2^(s-127) · 2^14 by
placing s in the exponent field. Nibbles are interleaved low-first with tl.join, matching kernels.mxfp4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import triton.language as tl
from gptoss_cluster.kernels import reference
from gptoss_cluster.kernels.reference import ExpertLora
from gptoss_cluster.kernels.triton._jit import cdiv, check_device, dot_fp32, interpreting, jit, launch, next_power_of_2


# ---------------------------------------------------------------------------------------------------- grouping
@jit
def _moe_hist_kernel(ids_ptr, hist_ptr, n_slots, first_expert, n_local,
                     BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    block = tl.program_id(0)
    slots = block * BLOCK_S + tl.arange(0, BLOCK_S)
    local = tl.load(ids_ptr + slots, mask=slots < n_slots, other=-1).to(tl.int32) - first_expert
    valid = (slots < n_slots) & (local >= 0) & (local < n_local)
    experts = tl.arange(0, BLOCK_E)
    hits = tl.sum(((local[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32), axis=0)
    tl.store(hist_ptr + block * n_local + experts, hits, mask=experts < n_local)


@jit
def _moe_offsets_kernel(hist_ptr, expert_start_ptr, tile_start_ptr, n_blocks, n_local, block_m,
                        BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    emask = experts < n_local
    running = tl.zeros([BLOCK_E], tl.int32)
    for b0 in range(0, n_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        ptrs = hist_ptr + blocks[:, None] * n_local + experts[None, :]
        mask = (blocks[:, None] < n_blocks) & emask[None, :]
        h = tl.load(ptrs, mask=mask, other=0)
        inclusive = tl.cumsum(h, axis=0)
        tl.store(ptrs, inclusive - h + running[None, :], mask=mask)  # exclusive prefix over blocks, in place
        running += tl.sum(h, axis=0)
    ends = tl.cumsum(running, axis=0)
    tl.store(expert_start_ptr + experts, ends - running, mask=emask)
    tl.store(expert_start_ptr + n_local, tl.sum(running, axis=0))
    tiles = (running + block_m - 1) // block_m
    tile_ends = tl.cumsum(tiles, axis=0)
    tl.store(tile_start_ptr + experts, tile_ends - tiles, mask=emask)
    tl.store(tile_start_ptr + n_local, tl.sum(tiles, axis=0))


@jit
def _moe_scatter_kernel(ids_ptr, hist_ptr, expert_start_ptr, sorted_slot_ptr, slot_row_ptr, n_slots, first_expert,
                        n_local, BLOCK_S: tl.constexpr):
    block = tl.program_id(0)
    lane = tl.arange(0, BLOCK_S)
    slots = block * BLOCK_S + lane
    in_range = slots < n_slots
    local = tl.load(ids_ptr + slots, mask=in_range, other=-1).to(tl.int32) - first_expert
    valid = in_range & (local >= 0) & (local < n_local)
    local = tl.where(valid, local, 0)
    # Rank among the earlier slots of this block with the same expert.
    same = (local[:, None] == local[None, :]) & valid[None, :] & (lane[None, :] < lane[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(expert_start_ptr + local, mask=valid, other=0)
    before = tl.load(hist_ptr + block * n_local + local, mask=valid, other=0)
    row = base + before + rank
    tl.store(sorted_slot_ptr + row, slots, mask=valid)
    tl.store(slot_row_ptr + slots, tl.where(valid, row, -1), mask=in_range)


# ---------------------------------------------------------------------------------------------------- GEMMs
@jit
def _mxfp4_tile(w_ptr, s_ptr, rows, n_rows, k0, n_groups, row_bytes, row_scales,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT: tl.constexpr):
    """Rows `rows` [BLOCK_N], K columns [k0, k0 + BLOCK_K) of an MXFP4 matrix -> [BLOCK_N, BLOCK_K] of OUT."""
    G: tl.constexpr = BLOCK_K // 32
    g = k0 // 32 + tl.arange(0, G)
    byte = tl.arange(0, 16)
    rmask = rows < n_rows
    gmask = g < n_groups
    rows64 = rows.to(tl.int64)
    packed = tl.load(w_ptr + rows64[:, None, None] * row_bytes + g[None, :, None] * 16 + byte[None, None, :],
                     mask=rmask[:, None, None] & gmask[None, :, None], other=0).to(tl.int16)
    scale_bits = tl.load(s_ptr + rows64[:, None] * row_scales + g[None, :],
                         mask=rmask[:, None] & gmask[None, :], other=0).to(tl.int32)
    scale = (scale_bits << 23).to(tl.float32, bitcast=True) * 16384.0  # 2^(s-127) undoes the 2^-14 below
    lo = (((packed & 0x7) << 9) | ((packed & 0x8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (((packed & 0x70) << 5) | ((packed & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)
    lo = lo.to(tl.float32)
    hi = hi.to(tl.float32)
    lo = lo * scale[:, :, None]
    hi = hi * scale[:, :, None]
    w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])  # byte j -> values 2j (low nibble), 2j + 1 (high)
    return w.to(OUT)


@jit
def _moe_gemm_kernel(a_ptr, sorted_slot_ptr, expert_start_ptr, tile_start_ptr, route_w_ptr,
                     w_ptr, s_ptr, bias_ptr, out_ptr,
                     n_out, k_dim, a_stride, out_stride, top_k, n_local, limit, alpha,
                     GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_E: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which expert and M-tile this program owns; surplus programs of the upper-bound grid leave.
    experts = tl.arange(0, BLOCK_E)
    tile_ends = tl.load(tile_start_ptr + 1 + experts, mask=experts < n_local, other=2147483647)
    expert = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)
    if expert >= n_local:
        return
    m_tile = pid_m - tl.load(tile_start_ptr + expert)
    row_start = tl.load(expert_start_ptr + expert)
    row_end = tl.load(expert_start_ptr + expert + 1)
    rows = row_start + m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    slot = tl.load(sorted_slot_ptr + rows, mask=row_ok, other=0)
    if GATE_UP:
        a_rows = slot // top_k  # the token
    else:
        a_rows = rows
    a_base = a_ptr + a_rows.to(tl.int64)[:, None] * a_stride

    # Weight rows of this N-tile: for GATE_UP, 2·BLOCK_N interleaved (gate, linear) rows -> BLOCK_N outputs.
    W_ROWS: tl.constexpr = 2 * BLOCK_N if GATE_UP else BLOCK_N
    w_rows = pid_n * W_ROWS + tl.arange(0, W_ROWS)
    n_w_rows = n_out * 2 if GATE_UP else n_out
    n_groups = k_dim // 32
    expert64 = expert.to(tl.int64)
    w_expert = w_ptr + expert64 * n_w_rows * (n_groups * 16)
    s_expert = s_ptr + expert64 * n_w_rows * n_groups
    DT: tl.constexpr = tl.float32 if DOT_FP32 else a_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_M, W_ROWS], tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, k_dim, BLOCK_K):
        a = tl.load(a_base + (k0 + ks)[None, :], mask=row_ok[:, None] & ((k0 + ks)[None, :] < k_dim), other=0.0)
        w = _mxfp4_tile(w_expert, s_expert, w_rows, n_w_rows, k0, n_groups, n_groups * 16, n_groups,
                        W_ROWS, BLOCK_K, DT)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(DT), tl.trans(w), acc)

    bias = tl.load(bias_ptr + expert64 * n_w_rows + w_rows, mask=w_rows < n_w_rows, other=0.0).to(tl.float32)
    acc = acc + bias[None, :]
    if GATE_UP:
        gate, linear = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
        gate = tl.minimum(gate, limit)
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        result = (linear + 1.0) * gate * tl.sigmoid(alpha * gate)
    else:
        route_w = tl.load(route_w_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
        result = acc * route_w[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :],
             result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < n_out))


@jit
def _moe_combine_kernel(y_ptr, slot_row_ptr, out_ptr, n_cols, top_k, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < n_cols
    acc = tl.zeros([BLOCK], tl.float32)
    for j in range(top_k):
        row = tl.load(slot_row_ptr + token * top_k + j)
        if row >= 0:
            acc += tl.load(y_ptr + row.to(tl.int64) * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * n_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------------- host side
@dataclass(frozen=True)
class MoEConfig:
    """Block sizes the wrapper picks for one call (the compile test builds exactly these)."""

    block_m: int
    gate_up_n: int  # outputs (intermediate columns) per program; reads 2x as many weight rows
    gate_up_k: int
    down_n: int
    down_k: int
    num_warps: int
    num_stages: int
    block_s: int  # slots per grouping program


def moe_config(num_slots: int, num_local_experts: int, hidden: int = 2880, inter: int = 2880) -> MoEConfig:
    """Block sizes from the average rows per expert: decode-sized groups take the smallest M tile tl.dot allows.

    Under the interpreter, whose cost is per operation rather than per element, whole rows in one tile instead.
    """
    rows_per_expert = num_slots / max(1, min(num_local_experts, num_slots))
    block_s = 128  # one grouping program covers a decode batch of 32 tokens x top-4
    if interpreting():
        block_n, block_k = min(256, next_power_of_2(max(hidden, inter))), min(256, next_power_of_2(max(hidden, inter)))
        return MoEConfig(16 if rows_per_expert <= 16 else 64, block_n, block_k, block_n, block_k, 4, 1, block_s)
    if rows_per_expert <= 16:
        return MoEConfig(16, 32, 128, 64, 128, 4, 3, block_s)
    if rows_per_expert <= 64:
        return MoEConfig(64, 32, 128, 64, 128, 4, 3, block_s)
    return MoEConfig(128, 64, 64, 128, 64, 8, 3, block_s)


@dataclass(frozen=True)
class ExpertGroups:
    """Token-slots grouped by local expert (all int32, on the device; nothing is read back to the host)."""

    sorted_slot: torch.Tensor  # [N]: slot (t·k + j) of each expert-sorted row; rows past expert_start[-1] unused
    slot_row: torch.Tensor  # [N]: the row of each slot, -1 where its expert is not local
    expert_start: torch.Tensor  # [E_local + 1]: first row of each local expert; [-1] = rows in use
    tile_start: torch.Tensor  # [E_local + 1]: first BLOCK_M tile of each local expert; [-1] = tiles in use

    @property
    def counts(self) -> torch.Tensor:
        """Routed slots per local expert [E_local] (the MoE load histogram)."""
        return self.expert_start[1:] - self.expert_start[:-1]


def group_by_expert(expert_ids: torch.Tensor, first_expert: int, num_local: int, block_m: int,
                    block_s: int = 128) -> ExpertGroups:
    """Stable grouping of the flat slots `expert_ids` [N] by local expert, and the GEMMs' M-tile offsets."""
    ids = expert_ids.reshape(-1)
    num_slots, device = ids.numel(), ids.device
    block_e = next_power_of_2(num_local)
    n_blocks = cdiv(num_slots, block_s)
    hist = torch.empty((n_blocks, num_local), dtype=torch.int32, device=device)
    expert_start = torch.empty(num_local + 1, dtype=torch.int32, device=device)
    tile_start = torch.empty(num_local + 1, dtype=torch.int32, device=device)
    sorted_slot = torch.empty(num_slots, dtype=torch.int32, device=device)
    slot_row = torch.empty(num_slots, dtype=torch.int32, device=device)
    launch(_moe_hist_kernel, (n_blocks,), ids, hist, num_slots, first_expert, num_local,
           BLOCK_S=block_s, BLOCK_E=block_e, num_warps=4, num_stages=1)
    launch(_moe_offsets_kernel, (1,), hist, expert_start, tile_start, n_blocks, num_local, block_m,
           BLOCK_E=block_e, CHUNK=16, num_warps=4, num_stages=1)
    launch(_moe_scatter_kernel, (n_blocks,), ids, hist, expert_start, sorted_slot, slot_row, num_slots,
           first_expert, num_local, BLOCK_S=block_s, num_warps=4, num_stages=1)
    return ExpertGroups(sorted_slot, slot_row, expert_start, tile_start)


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
    config: MoEConfig | None = None,
    lora: ExpertLora | None = None,
) -> torch.Tensor:
    """x [T, H] -> [T, H]: each token the routing-weighted sum of its top-k experts held here (see module doc).

    With `lora` (adapters' expert additions) this call runs the torch reference MoE instead: the gate_up delta must
    land before SwiGLU, which this kernel fuses into its first grouped GEMM. A fused Triton LoRA (Punica-style
    shrink / expand per expert tile) is future work.
    """
    if lora is not None:
        return reference.moe_experts(x, expert_weights, expert_ids, gate_up_blocks, gate_up_scales, gate_up_bias,
                                     down_blocks, down_scales, down_bias, swiglu_limit, swiglu_alpha, first_expert,
                                     lora=lora)
    check_device(x, gate_up_blocks, down_blocks)
    num_tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    num_local, gate_up_rows = gate_up_blocks.shape[:2]
    inter = gate_up_rows // 2
    if gate_up_blocks.shape[2] * 32 != hidden or down_blocks.shape[1] != hidden or down_blocks.shape[2] * 32 != inter:
        raise ValueError(f"expert shapes {tuple(gate_up_blocks.shape)} / {tuple(down_blocks.shape)} do not fit "
                         f"hidden {hidden}")
    device = x.device
    num_slots = num_tokens * top_k
    if num_slots == 0:
        return torch.zeros_like(x)
    cfg = config or moe_config(num_slots, num_local, hidden, inter)
    x = x.contiguous()
    ids = expert_ids.reshape(-1).contiguous()
    route_w = expert_weights.reshape(-1).contiguous()
    gate_up_blocks, gate_up_scales = gate_up_blocks.contiguous(), gate_up_scales.contiguous()
    down_blocks, down_scales = down_blocks.contiguous(), down_scales.contiguous()
    gate_up_bias, down_bias = gate_up_bias.contiguous(), down_bias.contiguous()

    g = group_by_expert(ids, first_expert, num_local, cfg.block_m, cfg.block_s)
    sorted_slot, slot_row, expert_start, tile_start = g.sorted_slot, g.slot_row, g.expert_start, g.tile_start
    block_e = next_power_of_2(num_local)
    max_tiles = num_slots // cfg.block_m + min(num_slots, num_local)
    fp32 = dot_fp32(x)
    hidden_rows = torch.empty((num_slots, inter), dtype=x.dtype, device=device)
    launch(_moe_gemm_kernel, (max_tiles, cdiv(inter, cfg.gate_up_n)), x, sorted_slot, expert_start, tile_start,
           route_w, gate_up_blocks, gate_up_scales, gate_up_bias, hidden_rows,
           inter, hidden, x.stride(0), hidden_rows.stride(0), top_k, num_local, float(swiglu_limit),
           float(swiglu_alpha), GATE_UP=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.gate_up_n, BLOCK_K=cfg.gate_up_k,
           BLOCK_E=block_e, DOT_FP32=fp32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    y = torch.empty((num_slots, hidden), dtype=x.dtype, device=device)
    launch(_moe_gemm_kernel, (max_tiles, cdiv(hidden, cfg.down_n)), hidden_rows, sorted_slot, expert_start,
           tile_start, route_w, down_blocks, down_scales, down_bias, y,
           hidden, inter, hidden_rows.stride(0), y.stride(0), top_k, num_local, float(swiglu_limit),
           float(swiglu_alpha), GATE_UP=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.down_n, BLOCK_K=cfg.down_k,
           BLOCK_E=block_e, DOT_FP32=fp32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = torch.empty_like(x)
    block = min(1024, next_power_of_2(hidden))
    launch(_moe_combine_kernel, (num_tokens, cdiv(hidden, block)), y, slot_row, out, hidden, top_k,
           BLOCK=block, num_warps=4, num_stages=1)
    return out
