"""kernels.paged.paged_attention against the one-sequence reference (attention_with_sinks over contiguous keys)."""

import pytest
import torch

from gptoss_cluster.kernels.dispatch import TORCH_KERNELS
from gptoss_cluster.kernels.paged import paged_attention
from gptoss_cluster.kernels.reference import attention_with_sinks


def scatter_into_pool(keys, values, num_blocks, block_size, generator, shared_pool=None):
    """Put each sequence's contiguous k/v into randomly chosen blocks of one pool; returns pools and tables."""
    hkv, d = keys[0].shape[1:]
    k_pool = torch.randn(num_blocks, block_size, hkv, d, generator=generator)  # junk everywhere else
    v_pool = torch.randn(num_blocks, block_size, hkv, d, generator=generator)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for k, v in zip(keys, values, strict=True):
        n = -(-k.shape[0] // block_size)
        ids = [order.pop() for _ in range(n)]
        for j, b in enumerate(ids):
            part = slice(j * block_size, min((j + 1) * block_size, k.shape[0]))
            k_pool[b, :part.stop - part.start] = k[part]
            v_pool[b, :part.stop - part.start] = v[part]
        tables.append(ids)
    width = max(len(t) for t in tables)
    table = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    return k_pool, v_pool, table


@pytest.mark.parametrize("window", [None, 8, 128])
@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_prefill_and_decode_batch(window, block_size):
    g = torch.Generator().manual_seed(block_size * 1000 + (window or 0))
    hq, hkv, d = 8, 2, 16
    # (context length after the step, queries this step): fresh prompts, chunks continuing a prefix, decodes
    shape = [(1, 1), (37, 37), (150, 1), (300, 45), (20, 1), (129, 1), (64, 17), (7, 3)]
    keys = [torch.randn(n, hkv, d, generator=g) for n, _ in shape]
    values = [torch.randn(n, hkv, d, generator=g) for n, _ in shape]
    sinks = torch.randn(hq, generator=g)
    q = torch.randn(sum(t for _, t in shape), hq, d, generator=g)
    k_pool, v_pool, table = scatter_into_pool(keys, values, 200, block_size, g)
    qsl = torch.tensor([0] + torch.cumsum(torch.tensor([t for _, t in shape]), 0).tolist(), dtype=torch.int32)
    seq_lens = torch.tensor([n for n, _ in shape], dtype=torch.int32)
    out = paged_attention(q, k_pool, v_pool, table, qsl, seq_lens, sinks, window, 0.25)
    assert out.shape == q.shape
    for b, (n, t) in enumerate(shape):
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        ref = attention_with_sinks(q[rows], keys[b], values[b], sinks, torch.arange(n - t, n), torch.arange(n),
                                   window, 0.25)
        torch.testing.assert_close(out[rows], ref, rtol=1e-5, atol=1e-5)


def test_blocks_outside_the_window_are_never_read():
    g = torch.Generator().manual_seed(1)
    hq, hkv, d, bs, window = 4, 2, 8, 4, 6
    shape = [(40, 1), (33, 1), (50, 5)]
    keys = [torch.randn(n, hkv, d, generator=g) for n, _ in shape]
    values = [torch.randn(n, hkv, d, generator=g) for n, _ in shape]
    sinks = torch.randn(hq, generator=g)
    q = torch.randn(7, hq, d, generator=g)
    k_pool, v_pool, table = scatter_into_pool(keys, values, 64, bs, g)
    qsl = torch.tensor([0, 1, 2, 7], dtype=torch.int32)
    seq_lens = torch.tensor([n for n, _ in shape], dtype=torch.int32)
    before = paged_attention(q, k_pool, v_pool, table, qsl, seq_lens, sinks, window, 0.3)
    # Point every block wholly before each sequence's window at a poisoned block: nothing may change.
    poisoned = table.clone()
    k_pool[63], v_pool[63] = float("nan"), float("nan")
    for b, (n, t) in enumerate(shape):
        first_visible = max(0, n - t - window + 1)
        poisoned[b, :first_visible // bs] = 63
    after = paged_attention(q, k_pool, v_pool, poisoned, qsl, seq_lens, sinks, window, 0.3)
    assert torch.equal(before, after)


def test_bf16_pools_and_dispatch():
    g = torch.Generator().manual_seed(2)
    keys = [torch.randn(30, 2, 16, generator=g).bfloat16() for _ in range(3)]
    values = [torch.randn(30, 2, 16, generator=g).bfloat16() for _ in range(3)]
    k_pool, v_pool, table = scatter_into_pool([k.float() for k in keys], [v.float() for v in values], 32, 8, g)
    k_pool, v_pool = k_pool.bfloat16(), v_pool.bfloat16()
    q = torch.randn(3, 8, 16, generator=g).bfloat16()
    sinks = torch.zeros(8)
    qsl = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    seq_lens = torch.full((3,), 30, dtype=torch.int32)
    out = TORCH_KERNELS.paged_attention(q, k_pool, v_pool, table, qsl, seq_lens, sinks, None, 0.25)
    assert out.dtype == torch.bfloat16
    for b in range(3):
        ref = attention_with_sinks(q[b:b + 1], keys[b], values[b], sinks, torch.tensor([29]), torch.arange(30), None,
                                   0.25)
        torch.testing.assert_close(out[b:b + 1].float(), ref.float(), rtol=2e-2, atol=2e-2)
