"""RMSNorm, RoPE, routing and the expert histogram in Triton vs kernels.reference."""

from __future__ import annotations

import pytest
import torch

from gptoss_cluster.kernels import reference
from gptoss_cluster.kernels.triton import norm_rope, routing

pytestmark = pytest.mark.usefixtures("run_kernels")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("rows", "hidden", "dtype", "tol"), [
    (1, 2880, torch.float32, 1e-5),     # one token, gpt-oss width (not a power of two)
    (7, 192, torch.bfloat16, 1e-2),
])
def test_rms_norm(rows, hidden, dtype, tol):
    g = gen(rows)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    w = torch.randn(hidden, generator=g)
    out = norm_rope.rms_norm(x, w, 1e-5)
    ref = reference.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_rms_norm_3d_input():
    x = torch.randn(2, 3, 64, generator=gen(1))
    w = torch.randn(64, generator=gen(2))
    torch.testing.assert_close(norm_rope.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize(("tokens", "heads", "head_dim", "dtype"), [(1, 8, 64, torch.float32),
                                                                     (5, 20, 32, torch.bfloat16)])
def test_rope_on_strided_qkv_views(tokens, heads, head_dim, dtype):
    """q and k are column slices of the fused qkv output; cos/sin carry YaRN's attention scaling."""
    g = gen(tokens)
    qkv = torch.randn(tokens, (heads + 2 * 2) * head_dim, generator=g).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim: (heads + 2) * head_dim].view(tokens, 2, head_dim)
    inv_freq, scaling = reference.yarn_inv_freq(head_dim, 150000.0, 32.0, 4096, 32.0, 1.0, False)
    cos, sin = reference.rope_cos_sin(torch.arange(100, 100 + tokens), inv_freq, scaling, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for x in (q, k):
        out = norm_rope.apply_rope(x, cos, sin)
        torch.testing.assert_close(out.float(), reference.apply_rope(x, cos, sin).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize(("tokens", "experts", "top_k", "dtype"), [
    (1, 8, 4, torch.float32),
    (37, 32, 4, torch.float32),
    (5, 128, 4, torch.bfloat16),
    (9, 6, 1, torch.float32),
])
def test_route(tokens, experts, top_k, dtype):
    # distinct logits: top-k of tied values is implementation-defined
    g = gen(tokens + experts)
    logits = torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)]).to(dtype) * 0.25 - 3
    weights, ids = routing.route(logits, top_k)
    ref_w, ref_ids = reference.route(logits, top_k)
    assert ids.dtype == torch.int64 and weights.dtype == dtype
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights.float(), ref_w.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-6)


def test_route_ties_pick_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    _, ids = routing.route(logits, 2)
    assert ids.tolist() == [[1, 2]]


def test_histograms():
    g = gen(7)
    logits = torch.randn(300, 32, generator=g)
    weights, ids, counts = routing.route_with_histogram(logits, 4)
    expected = reference.expert_histogram(ids, 32)
    assert torch.equal(counts.long(), expected)
    assert torch.equal(routing.expert_histogram(ids, 32), expected)
    assert int(counts.sum()) == 300 * 4


@pytest.mark.interpreter_only
def test_offloaded_launches_run_on_storage_copies_and_write_back():
    """`offload_launches` (how these tests run on a GPU): each launch sees copies of its tensors' storages, views
    keep their offsets and strides, and what the kernel wrote comes back. Offloading to "cpu" under the interpreter
    takes the same copy path, minus the GPU."""
    from gptoss_cluster.kernels.triton import offload_launches

    g = torch.Generator().manual_seed(7)
    storage = torch.randn(6, 2 * 48, generator=g)
    x = storage[1:, 48:]  # a view: storage offset 48, row stride 96
    w = torch.randn(48, generator=g)
    expected = reference.rms_norm(x, w, 1e-5)
    with offload_launches("cpu"):
        out = norm_rope.rms_norm(x, w, 1e-5)
        weights, ids = routing.route(storage[:, :8], 2)
    torch.testing.assert_close(out, expected)
    ref_weights, ref_ids = reference.route(storage[:, :8], 2)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)


@pytest.mark.interpreter_only
def test_interpreted_launch_leaves_triton_language_as_it_was():
    """rms_norm calls tl.sum, one of triton.language's own jit helpers: interpreting it must not leave interpreter
    versions of the language behind, or a later triton.compile in the same process (the Hopper compile test after
    the benchmark smoke run) fails inside them."""
    import triton.language as tl

    namespaces = [tl, tl.core, tl.math, tl.core.tensor]
    before = [dict(vars(namespace)) for namespace in namespaces]
    norm_rope.rms_norm(torch.randn(2, 64), torch.randn(64), 1e-5)
    for namespace, members in zip(namespaces, before, strict=True):
        now = vars(namespace)
        changed = sorted(name for name in members.keys() | now.keys() if members.get(name) is not now.get(name))
        assert not changed, f"{namespace.__name__}: {changed[:8]}"
