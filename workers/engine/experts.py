"""Dequantize-once MoE for small models: the executor's weight preparation (like transformers' `dequantize=True`).

The reference `moe_experts` dequantizes each routed expert's MXFP4 weights on every call, which on CPU costs as much
as the expert matmuls themselves. When the dense copy of all experts is small (the tiny test / benchmark models), the
executor swaps in this version: every expert tensor is dequantized once, on first use, and cached; the per-token math
is the reference's own (`kernels.reference.mix_experts`), so outputs are bit-identical. Large models keep the MXFP4
path (a dense fp32 copy of gpt-oss-20b's experts would be ~76 GB).
"""

from __future__ import annotations

import dataclasses

import torch

from gptoss_cluster.kernels.dispatch import Kernels
from gptoss_cluster.kernels.mxfp4 import dequantize_mxfp4
from gptoss_cluster.kernels.reference import ExpertLora, mix_experts

DEFAULT_LIMIT_BYTES = 1 << 30


def dense_expert_bytes(model) -> int:
    """Bytes a dense copy of every local expert of every layer would take, in the model's dtype."""
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    total = 0
    for mlp in model.mlp:
        total += (mlp.gate_up_blocks.numel() + mlp.down_blocks.numel()) * 2 * itemsize  # 2 values per byte
    return total


class DequantizedMoE:
    """A drop-in `moe_experts` that caches each weight tensor's dequantized copy (keyed by storage and dtype)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def _dense(self, blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (blocks.data_ptr(), dtype, blocks.device)
        dense = self._cache.get(key)
        if dense is None:
            dense = self._cache[key] = dequantize_mxfp4(blocks, scales, dtype)
        return dense

    def __call__(self, x: torch.Tensor, expert_weights: torch.Tensor, expert_ids: torch.Tensor,
                 gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
                 down_blocks: torch.Tensor, down_scales: torch.Tensor, down_bias: torch.Tensor, swiglu_limit: float,
                 swiglu_alpha: float, first_expert: int = 0, *, lora: ExpertLora | None = None) -> torch.Tensor:
        w1_all = self._dense(gate_up_blocks, gate_up_scales, x.dtype)  # [E_local, 2I, H]
        w2_all = self._dense(down_blocks, down_scales, x.dtype)  # [E_local, H, I]
        return mix_experts(x, expert_weights, expert_ids, gate_up_blocks.shape[0],
                           lambda expert: (w1_all[expert], w2_all[expert]), gate_up_bias, down_bias, swiglu_limit,
                           swiglu_alpha, first_expert, lora=lora)


def with_dequantized_experts(kernels: Kernels) -> Kernels:
    return dataclasses.replace(kernels, moe_experts=DequantizedMoE())
