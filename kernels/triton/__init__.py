"""Triton kernels for gpt-oss, one host wrapper per reference function with the same signature.

    rms_norm, apply_rope          kernels/triton/norm_rope.py
    route, expert_histogram       kernels/triton/routing.py
    moe_experts                   kernels/triton/moe.py  (MXFP4 grouped GEMMs, fused SwiGLU, combine)
    paged_attention,
    attention_with_sinks          kernels/triton/attention.py  (paged prefill/decode with split-K; contiguous)

Picked through kernels.dispatch (GPTOSS_KERNELS=triton, default on CUDA). Every kernel runs compiled on CUDA
tensors, or through Triton's interpreter on CPU tensors while TRITON_INTERPRET=1 (decided per launch, see _jit.py).
"""

from gptoss_cluster.kernels.triton._jit import interpreting, offload_launches, record_launches, runs_on_cpu_tensors
from gptoss_cluster.kernels.triton.attention import attention_with_sinks, paged_attention
from gptoss_cluster.kernels.triton.moe import moe_experts
from gptoss_cluster.kernels.triton.norm_rope import apply_rope, rms_norm
from gptoss_cluster.kernels.triton.routing import expert_histogram, route, route_with_histogram

__all__ = [
    "apply_rope",
    "attention_with_sinks",
    "expert_histogram",
    "interpreting",
    "moe_experts",
    "offload_launches",
    "paged_attention",
    "record_launches",
    "rms_norm",
    "route",
    "route_with_histogram",
    "runs_on_cpu_tensors",
]
