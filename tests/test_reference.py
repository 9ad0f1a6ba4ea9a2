"""The reference math against independent definitions (naive loops, and transformers' own functions as oracle)."""

import math

import pytest
import torch

from gptoss_cluster.kernels import reference
from gptoss_cluster.kernels.mxfp4 import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4
from gptoss_cluster.workers.config import ModelConfig


def test_mxfp4_layout_low_nibble_first_and_scale_bias():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x2F  # low nibble 0xF (-6.0), high nibble 0x2 (+1.0)
    scales = torch.tensor([128], dtype=torch.uint8)  # 2**(128-127) = 2
    values = dequantize_mxfp4(blocks, scales)
    assert values.shape == (32,)
    assert values[0].item() == -12.0 and values[1].item() == 2.0 and values[2:].abs().sum() == 0


def test_mxfp4_ties_round_to_even_code():
    # with scale 1 (amax 6): 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0
    w = torch.zeros(32)
    w[:8] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, -5.0])
    back = dequantize_mxfp4(*quantize_mxfp4(w))
    assert back[:8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, -4.0]


def test_mxfp4_quantize_round_trip_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(4, 7, 96) * 3
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (4, 7, 3, 16) and scales.shape == (4, 7, 3)
    back = dequantize_mxfp4(blocks, scales)
    # every dequantized value is exactly representable, and re-quantizing it is lossless
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(back)), back)
    # error per element at most half the largest e2m1 gap (1.0 between 4 and 6) times the block scale
    scale = torch.ldexp(torch.ones(scales.shape), scales.int() - 127).repeat_interleave(32, dim=-1)
    assert ((back - w).abs() <= scale * 1.0 + 1e-6).all()
    assert set(torch.unique((back / scale).abs()).tolist()) <= set(abs(v) for v in FP4_VALUES)


def test_yarn_matches_transformers():
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for truncate in (False, True):
        cfg = ModelConfig.preset("20b", rope_truncate=truncate)
        hf_cfg = GptOssConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "quantization_config"})
        ref_inv_freq, ref_scaling = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
        inv_freq, scaling = reference.yarn_inv_freq(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_original_context, cfg.rope_beta_fast,
            cfg.rope_beta_slow, cfg.rope_truncate)
        assert torch.allclose(inv_freq, ref_inv_freq, rtol=1e-6, atol=0)
        assert scaling == pytest.approx(ref_scaling) == pytest.approx(0.1 * math.log(32) + 1)
    untruncated = reference.yarn_inv_freq(64, 150000.0, 32.0, 4096, 32.0, 1.0, False)[0]
    truncated = reference.yarn_inv_freq(64, 150000.0, 32.0, 4096, 32.0, 1.0, True)[0]
    assert not torch.allclose(untruncated, truncated)  # the detail matters


def naive_attention(q, k, v, sinks, q_pos, k_pos, window, scale):
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    for t in range(T):
        for h in range(Hq):
            logits, values = [], []
            for s in range(k.shape[0]):
                d = q_pos[t] - k_pos[s]
                if d < 0 or (window is not None and d >= window):
                    continue
                logits.append(float(q[t, h].double() @ k[s, h // group].double()) * scale)
                values.append(v[s, h // group].double())
            denom = sum(math.exp(x) for x in logits) + math.exp(float(sinks[h]))
            for x, val in zip(logits, values, strict=True):
                out[t, h] += math.exp(x) / denom * val
    return out


@pytest.mark.parametrize("window", [None, 4])
def test_attention_with_sinks_matches_naive(window):
    torch.manual_seed(0)
    T, S, Hq, Hkv, D = 5, 11, 4, 2, 8
    q, k, v = torch.randn(T, Hq, D), torch.randn(S, Hkv, D), torch.randn(S, Hkv, D)
    sinks = torch.randn(Hq)
    q_pos = torch.arange(S - T, S)  # a chunk continuing 6 cached tokens
    k_pos = torch.arange(S)
    out = reference.attention_with_sinks(q, k, v, sinks, q_pos, k_pos, window, 0.3)
    expected = naive_attention(q, k, v, sinks, q_pos, k_pos, window, 0.3)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_sliding_window_boundary():
    # With window 4 the query at position 10 sees keys 7..10 and not 6.
    q = torch.zeros(1, 1, 2)
    k = torch.zeros(11, 1, 2)
    v = torch.zeros(11, 1, 2)
    v[6, 0, 0] = 100.0
    v[7, 0, 1] = 100.0
    out = reference.attention_with_sinks(q, k, v, torch.tensor([-1e9]), torch.tensor([10]), torch.arange(11), 4, 1.0)
    assert out[0, 0, 0] == 0 and out[0, 0, 1] == pytest.approx(25.0)


def test_route_topk_then_softmax():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    weights, ids = reference.route(logits, 2)
    assert ids.tolist() == [[1, 3]]
    assert torch.allclose(weights, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))
    assert reference.expert_histogram(torch.tensor([[1, 3], [1, 0]]), 5).tolist() == [1, 2, 0, 1, 0]


def test_swiglu_clamp_and_plus_one():
    gate_up = torch.tensor([[10.0, 10.0, -2.0, -9.0]])  # pairs (gate, linear)
    out = reference.swiglu(gate_up, 7.0, 1.702)
    g1, g2 = 7.0, -2.0
    expected = [(7.0 + 1) * g1 * torch.sigmoid(torch.tensor(1.702 * g1)), (-7.0 + 1) * g2 * torch.sigmoid(
        torch.tensor(1.702 * g2))]
    assert torch.allclose(out, torch.tensor([expected]))


def test_moe_experts_matches_dense_and_expert_parallel_split():
    torch.manual_seed(0)
    T, H, inter, E, K = 6, 64, 32, 4, 2
    x = torch.randn(T, H)
    w1, w2 = torch.randn(E, 2 * inter, H) / 8, torch.randn(E, H, inter) / 6
    b1, b2 = torch.randn(E, 2 * inter) / 10, torch.randn(E, H) / 10
    (bl1, sc1), (bl2, sc2) = quantize_mxfp4(w1), quantize_mxfp4(w2)
    d1, d2 = dequantize_mxfp4(bl1, sc1), dequantize_mxfp4(bl2, sc2)
    weights, ids = reference.route(torch.randn(T, E), K)
    ids[0] = torch.tensor([3, 1])
    out = reference.moe_experts(x, weights, ids, bl1, sc1, b1, bl2, sc2, b2, 7.0, 1.702)
    expected = torch.zeros(T, H)
    for t in range(T):
        for slot in range(K):
            e = ids[t, slot]
            h = reference.swiglu(x[t] @ d1[e].T + b1[e], 7.0, 1.702)
            expected[t] += weights[t, slot] * (h @ d2[e].T + b2[e])
    assert torch.allclose(out, expected, atol=1e-5)
    # two ranks of two experts each sum to the whole
    halves = [reference.moe_experts(x, weights, ids, bl1[r:r + 2], sc1[r:r + 2], b1[r:r + 2], bl2[r:r + 2],
                                    sc2[r:r + 2], b2[r:r + 2], 7.0, 1.702, first_expert=r) for r in (0, 2)]
    assert torch.allclose(halves[0] + halves[1], out, atol=1e-5)
    # no tokens at all
    empty = reference.moe_experts(x[:0], weights[:0], ids[:0], bl1, sc1, b1, bl2, sc2, b2, 7.0, 1.702)
    assert empty.shape == (0, H)


def test_rms_norm_and_rope():
    x = torch.randn(3, 16)
    w = torch.rand(16)
    expected = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(reference.rms_norm(x, w, 1e-5), expected, atol=1e-6)
    inv_freq = torch.rand(4)
    cos, sin = reference.rope_cos_sin(torch.arange(3), inv_freq, 1.0, torch.float32)
    q = torch.randn(3, 2, 8)
    rotated = reference.apply_rope(q, cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation keeps length
    assert torch.allclose(rotated[0], q[0])  # position 0 is unrotated
