"""RMSNorm and rotary embedding (YaRN-scaled cos/sin) as Triton kernels; same signatures as kernels.reference.

Both are one memory pass: RMSNorm reads a row once (float32 math, weight applied, cast back); RoPE reads the two
halves of each head once and writes the rotated head, from any strided [T, H, D] view (q and k come straight out of
the fused qkv projection without a copy).
"""

from __future__ import annotations

import torch

import triton.language as tl
from gptoss_cluster.kernels.triton._jit import check_device, jit, launch, next_power_of_2


@jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, x_stride, out_stride, eps,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = cols[None, :] < n_cols
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / n_cols
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(mean_sq + eps)[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * out_stride + cols[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, scaled by `weight`, returned in x's dtype."""
    check_device(x, weight)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], shape[-1]), dtype=x.dtype, device=x.device)
    n_rows, n_cols = x2.shape
    block = next_power_of_2(n_cols)
    # One row per program; the row stays in registers (hidden 2880 -> 4096 lanes over 8 warps).
    num_warps = 8 if block >= 2048 else 4
    launch(_rms_norm_kernel, (n_rows,), x2, weight, out, n_cols, x2.stride(0), out.stride(0), float(eps),
           BLOCK=block, ROWS=1, num_warps=num_warps, num_stages=1)
    return out.reshape(shape)


@jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, x_stride_t, x_stride_h, cos_stride,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    mask = heads[:, None] < n_heads
    base = x_ptr + t.to(tl.int64) * x_stride_t + heads[:, None] * x_stride_h + d[None, :]
    first = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + t.to(tl.int64) * cos_stride + d).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t.to(tl.int64) * cos_stride + d).to(tl.float32)[None, :]
    out = out_ptr + t.to(tl.int64) * (n_heads * 2 * HALF) + heads[:, None] * (2 * HALF) + d[None, :]
    tl.store(out, (first * cos - second * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (second * cos + first * sin).to(out_ptr.dtype.element_ty), mask=mask)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] (any strides with a unit last stride) rotated in two halves; cos/sin [T, head_dim/2]."""
    check_device(x, cos, sin)
    num_tokens, num_heads, head_dim = x.shape
    half = head_dim // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape != (num_tokens, half) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{num_tokens}, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if half != next_power_of_2(half):
        raise ValueError(f"head_dim {head_dim} must be twice a power of two for the Triton RoPE kernel")
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=x.dtype, device=x.device)
    block_h = min(next_power_of_2(num_heads), 16)
    grid = (num_tokens, -(-num_heads // block_h))
    launch(_rope_kernel, grid, x, cos, sin, out, num_heads, x.stride(0), x.stride(1), cos.stride(0),
           HALF=half, BLOCK_H=block_h, num_warps=4, num_stages=1)
    return out
