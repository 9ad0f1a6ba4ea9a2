"""The one place that picks the kernel implementation: Triton on CUDA, the torch reference elsewhere.

`GPTOSS_KERNELS=torch|triton` overrides the default. Callers receive a `Kernels` bundle once (at model build time)
and call through it; both implementations share these signatures.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import reference

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Kernels:
    name: str
    rms_norm: Callable[..., torch.Tensor]
    apply_rope: Callable[..., torch.Tensor]
    attention: Callable[..., torch.Tensor]
    route: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    moe_experts: Callable[..., torch.Tensor]


TORCH_KERNELS = Kernels(
    name="torch",
    rms_norm=reference.rms_norm,
    apply_rope=reference.apply_rope,
    attention=reference.attention_with_sinks,
    route=reference.route,
    moe_experts=reference.moe_experts,
)


def select_kernels(device: torch.device | str = "cpu", backend: str | None = None) -> Kernels:
    """Kernels for `device`; `backend` (or $GPTOSS_KERNELS) forces one."""
    device = torch.device(device)
    backend = backend or os.environ.get("GPTOSS_KERNELS") or ("triton" if device.type == "cuda" else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"GPTOSS_KERNELS must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return TORCH_KERNELS
    raise ValueError("the Triton kernels are not available in this build yet; use GPTOSS_KERNELS=torch")
