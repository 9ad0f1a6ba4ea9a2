"""MXFP4 (OCP microscaling FP4) packing: the storage format of gpt-oss expert weights.

A row of K values is stored as K/32 blocks. Each block has 32 e2m1 values packed two per byte (low nibble first,
16 bytes) and one shared e8m0 scale byte (a power of two, biased by 127). This module is the definition of the
format: the writer quantizes with it, the torch reference dequantizes with it, and Triton kernels are tested against it.
"""

from __future__ import annotations

import torch

BLOCK = 32
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127
# e2m1 code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., G, 16] uint8 blocks + [..., G] uint8 scales -> [..., G * 32] values of `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    # bf16 shares float32's exponent range, so e2m1 values times a power of two are exact in either.
    compute = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    lut = torch.tensor(FP4_VALUES, dtype=compute, device=blocks.device)
    byte_to_pair = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)  # byte -> (low, high nibble)
    values = torch.index_select(byte_to_pair, 0, blocks.reshape(-1).int()).reshape(*blocks.shape[:-1], BLOCK)
    scale = torch.exp2(scales.to(torch.float32) - SCALE_BIAS).to(compute).unsqueeze(-1)
    return (values * scale).flatten(-2).to(dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float -> ([..., K/32, 16] uint8 blocks, [..., K/32] uint8 scales), round to nearest (even) e2m1.

    The shared scale is the smallest power of two that brings the block's largest magnitude within e2m1's range
    (6.0), so no value saturates.
    """
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {weight.shape[-1]} is not a multiple of the MXFP4 block size {BLOCK}")
    w = weight.float().reshape(*weight.shape[:-1], weight.shape[-1] // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1, keepdim=True)
    # exponent e with amax / 2**e <= 6; blocks of zeros get the smallest scale.
    exponent = torch.ceil(torch.log2(amax.clamp_min(2.0**-126) / FP4_MAX)).clamp(-SCALE_BIAS, 127)
    scaled = w * torch.exp2(-exponent)  # exact: a power-of-two scale
    magnitude = scaled.abs()
    # e2m1 code of the magnitude = how many rounding midpoints it passes; a tie goes to the even code
    # (round-to-nearest-even, as the OCP MX spec converts). Seven comparisons beat torch.bucketize here.
    codes = torch.zeros(magnitude.shape, dtype=torch.uint8, device=w.device)
    for upper_code in range(1, 8):
        midpoint = (FP4_VALUES[upper_code - 1] + FP4_VALUES[upper_code]) / 2
        codes += magnitude >= midpoint if upper_code % 2 == 0 else magnitude > midpoint
    codes |= (scaled < 0).to(torch.uint8) << 3
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent.squeeze(-1) + SCALE_BIAS).to(torch.uint8)
    return packed.contiguous(), scales.contiguous()
