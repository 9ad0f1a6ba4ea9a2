"""The one place that picks the kernel implementation: Triton on CUDA, the torch reference elsewhere.

`GPTOSS_KERNELS=torch|triton` overrides the default. Callers receive a `Kernels` bundle once (at model build time)
and call through it; both implementations share these signatures.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from gptoss_cluster.kernels import paged, reference

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Kernels:
    name: str
    rms_norm: Callable[..., torch.Tensor]
    apply_rope: Callable[..., torch.Tensor]
    attention: Callable[..., torch.Tensor]
    route: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    moe_experts: Callable[..., torch.Tensor]
    paged_attention: Callable[..., torch.Tensor]


def _bundle(name: str, impl: ModuleType, paged_impl: ModuleType) -> Kernels:
    """The bundle of module `impl`'s kernels and `paged_impl`'s paged_attention (both backends use the same names)."""
    return Kernels(
        name=name,
        rms_norm=impl.rms_norm,
        apply_rope=impl.apply_rope,
        attention=impl.attention_with_sinks,
        route=impl.route,
        moe_experts=impl.moe_experts,
        paged_attention=paged_impl.paged_attention,
    )


TORCH_KERNELS = _bundle("torch", reference, paged)


def select_kernels(device: torch.device | str = "cpu", backend: str | None = None) -> Kernels:
    """Kernels for `device`; `backend` (or $GPTOSS_KERNELS) forces one."""
    device = torch.device(device)
    backend = backend or os.environ.get("GPTOSS_KERNELS") or ("triton" if device.type == "cuda" else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"GPTOSS_KERNELS must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return TORCH_KERNELS
    bundle = _triton_kernels()
    from gptoss_cluster.kernels.triton import runs_on_cpu_tensors

    if device.type != "cuda" and not runs_on_cpu_tensors():
        raise ValueError(f"the Triton kernels run on CUDA devices, not {device.type}; use GPTOSS_KERNELS=torch there "
                         "(or TRITON_INTERPRET=1 to run them on CPU through the Triton interpreter, for tests)")
    return bundle


@functools.cache
def _triton_kernels() -> Kernels:
    """The Triton bundle; kernels.triton (and triton itself) is imported on first use only."""
    try:
        from gptoss_cluster.kernels import triton as tk
    except ImportError as exc:
        raise RuntimeError(f"GPTOSS_KERNELS=triton needs the triton package, which does not import here ({exc}); "
                           "install triton or use GPTOSS_KERNELS=torch") from exc
    return _bundle("triton", tk, tk)


def __getattr__(name: str):
    """kernels.dispatch.TRITON_KERNELS, built lazily so that importing dispatch never needs triton."""
    if name == "TRITON_KERNELS":
        return _triton_kernels()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
