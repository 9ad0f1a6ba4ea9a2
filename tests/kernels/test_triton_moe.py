"""MXFP4 MoE in Triton vs kernels.reference.moe_experts: grouping, both grouped GEMMs, SwiGLU clamps, combine."""

from __future__ import annotations

import pytest
import torch

from gptoss_cluster.kernels import reference
from gptoss_cluster.kernels.mxfp4 import quantize_mxfp4
from gptoss_cluster.kernels.triton import moe

pytestmark = pytest.mark.usefixtures("run_kernels")

LIMIT, ALPHA = 7.0, 1.702


def make_experts(num_experts: int, hidden: int, inter: int, seed: int = 0, bias_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.2
    down = torch.randn(num_experts, hidden, inter, generator=g) * 0.2
    gu_blocks, gu_scales = quantize_mxfp4(gate_up)
    dn_blocks, dn_scales = quantize_mxfp4(down)
    gu_bias = torch.randn(num_experts, 2 * inter, generator=g) * bias_scale
    dn_bias = torch.randn(num_experts, hidden, generator=g)
    return gu_blocks, gu_scales, gu_bias, dn_blocks, dn_scales, dn_bias


def routing(num_tokens: int, num_experts: int, top_k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    return reference.route(logits, top_k)


def check(x, weights, ids, experts, first_expert=0, rtol=1e-4, config=None):
    local = experts
    out = moe.moe_experts(x, weights, ids, *local, LIMIT, ALPHA, first_expert, config=config)
    ref = reference.moe_experts(x, weights.to(x.dtype), ids, *local, LIMIT, ALPHA, first_expert)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = ref.float().abs().max().clamp_min(1.0)
    err = (out.float() - ref.float()).abs().max() / scale
    assert err < rtol, f"max relative error {err:.3g}"
    return out, ref


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [(1, 8, 4), (3, 8, 2), (37, 6, 3)])
def test_moe_matches_reference(num_tokens, num_experts, top_k):
    hidden, inter = 160, 96  # 5 and 3 MXFP4 groups: neither a multiple of BLOCK_K = 128
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(2))
    weights, ids = routing(num_tokens, num_experts, top_k)
    check(x, weights, ids, make_experts(num_experts, hidden, inter))


def test_partial_tiles_and_many_slot_blocks():
    """N-tiles that overhang the outputs, several M-tiles per expert, more slots than one grouping block."""
    hidden, inter, num_experts = 96, 96, 4
    x = torch.randn(40, hidden, generator=torch.Generator().manual_seed(3))
    weights, ids = routing(40, num_experts, 4)  # 160 slots: two grouping blocks of 128
    config = moe.MoEConfig(block_m=16, gate_up_n=64, gate_up_k=64, down_n=64, down_k=64, num_warps=4,
                           num_stages=2, block_s=128)
    check(x, weights, ids, make_experts(num_experts, hidden, inter), config=config)


@pytest.mark.parametrize("num_slots", [4, 160, 1200], ids=["decode", "mid", "prefill"])
def test_gpu_block_configs(monkeypatch, num_slots):
    """The block sizes the wrapper picks on a GPU (BLOCK_M 16 / 64 / 128), run here through the interpreter."""
    with monkeypatch.context() as m:
        m.setattr(moe, "interpreting", lambda: False)
        config = moe.moe_config(num_slots, 8)
    assert config.block_m == {4: 16, 160: 64, 1200: 128}[num_slots]
    hidden, inter, num_experts, top_k = 128, 64, 8, 4
    tokens = max(1, num_slots // top_k // 6) if num_slots > 4 else 1  # fewer tokens: partial M-tiles
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(10))
    weights, ids = routing(tokens, num_experts, top_k)
    check(x, weights, ids, make_experts(num_experts, hidden, inter), config=config)


def test_experts_without_tokens_and_all_tokens_on_one_expert():
    hidden, inter, num_experts = 64, 64, 8
    x = torch.randn(20, hidden, generator=torch.Generator().manual_seed(4))
    ids = torch.zeros(20, 2, dtype=torch.int64)
    ids[:, 1] = 5  # experts 1-4, 6, 7 get nothing; expert 0 gets 20 rows (two M-tiles of 16)
    weights = torch.full((20, 2), 0.5)
    check(x, weights, ids, make_experts(num_experts, hidden, inter))


def test_swiglu_clamps_are_exercised():
    """Large biases push gate above +limit and the linear half beyond ±limit."""
    hidden, inter, num_experts = 64, 64, 4
    experts = make_experts(num_experts, hidden, inter, bias_scale=12.0)
    x = torch.randn(6, hidden, generator=torch.Generator().manual_seed(5))
    weights, ids = routing(6, num_experts, 2)
    pre = x @ reference.dequantize_mxfp4(experts[0][0], experts[1][0]).T + experts[2][0]
    assert (pre[:, 0::2] > LIMIT).any() and (pre[:, 1::2].abs() > LIMIT).any()
    check(x, weights, ids, experts)


@pytest.mark.parametrize("first_expert", [0, 3, 5])
def test_expert_parallel_slice(first_expert):
    """A rank owning experts [first, first + 3) of 8: other experts' slots contribute nothing, and the ranks sum up."""
    hidden, inter, num_experts = 64, 64, 8
    experts = make_experts(num_experts, hidden, inter)
    x = torch.randn(9, hidden, generator=torch.Generator().manual_seed(6))
    weights, ids = routing(9, num_experts, 2)
    ids[0] = torch.tensor([0, 1])  # token 0 has no expert on ranks starting at 3 or 5
    local = tuple(t[first_expert:first_expert + 3] for t in experts)
    out, _ = check(x, weights, ids, local, first_expert=first_expert)
    if first_expert > 1:
        assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_expert_parallel_ranks_sum_to_full():
    hidden, inter, num_experts = 64, 64, 8
    experts = make_experts(num_experts, hidden, inter)
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(7))
    weights, ids = routing(5, num_experts, 4)
    full = moe.moe_experts(x, weights, ids, *experts, LIMIT, ALPHA, 0)
    parts = sum(moe.moe_experts(x, weights, ids, *(t[r * 4:(r + 1) * 4] for t in experts), LIMIT, ALPHA, r * 4)
                for r in range(2))
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)


def test_bf16_within_tolerance():
    hidden, inter, num_experts = 96, 64, 4
    experts = make_experts(num_experts, hidden, inter)
    experts = (*experts[:2], experts[2].bfloat16(), *experts[3:5], experts[5].bfloat16())
    x = torch.randn(7, hidden, generator=torch.Generator().manual_seed(8)).bfloat16()
    weights, ids = routing(7, num_experts, 2)
    check(x, weights.bfloat16(), ids, experts, rtol=3e-2)


def test_zero_tokens():
    experts = make_experts(4, 64, 64)
    out = moe.moe_experts(torch.empty(0, 64), torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int64), *experts,
                          LIMIT, ALPHA)
    assert out.shape == (0, 64)


def test_grouping_is_stable_and_counts_experts():
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 10, (300,), generator=g)
    first, num_local, block_m = 2, 6, 16
    groups = moe.group_by_expert(ids, first, num_local, block_m, block_s=64)  # 5 slot blocks
    local = ids - first
    valid = (local >= 0) & (local < num_local)
    counts = torch.bincount(local[valid], minlength=num_local)
    assert torch.equal(groups.counts.long(), counts)
    starts = torch.cat((torch.zeros(1, dtype=torch.long), counts.cumsum(0)))
    assert torch.equal(groups.expert_start.long(), starts)
    tiles = (counts + block_m - 1) // block_m
    assert torch.equal(groups.tile_start.long(), torch.cat((torch.zeros(1, dtype=torch.long), tiles.cumsum(0))))
    # rows in expert order, token order within an expert (a stable sort of the valid slots)
    expected = torch.nonzero(valid).flatten()[torch.sort(local[valid], stable=True).indices]
    used = int(starts[-1])
    assert torch.equal(groups.sorted_slot[:used].long(), expected)
    rows = groups.slot_row.long()
    assert torch.equal(rows[~valid], torch.full_like(rows[~valid], -1))
    assert torch.equal(groups.sorted_slot.long()[rows[valid]], torch.nonzero(valid).flatten())
