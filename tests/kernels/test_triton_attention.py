"""Attention with sinks in Triton vs the torch references: contiguous (kernels.reference.attention_with_sinks) and
paged (kernels.paged.paged_attention): decode, prefill, chunked prefill over a cached prefix, split-K, GQA, windows."""

from __future__ import annotations

import pytest
import torch

from gptoss_cluster.kernels import paged, reference
from gptoss_cluster.kernels.triton import attention

pytestmark = pytest.mark.usefixtures("run_kernels")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(out: torch.Tensor, ref: torch.Tensor, tol: float = 2e-5) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.float() - ref.float()).abs().max().item()
    assert err < tol, f"max abs error {err:.3g}"


# ---------------------------------------------------------------------------------------------------- contiguous
@pytest.mark.parametrize(("num_q", "num_k", "hq", "hkv", "window"), [
    (1, 1, 8, 2, None),      # a single token
    (1, 37, 8, 8, None),     # decode, MHA
    (9, 9, 6, 2, 4),         # prefill, GQA group of 3 (padded to 4), window
    (20, 70, 8, 1, 16),      # continuing a prefix past several key tiles, MQA
])
def test_dense_attention(num_q, num_k, hq, hkv, window):
    d = 32
    g = gen(num_q * 100 + num_k)
    q, k, v = torch.randn(num_q, hq, d, generator=g), torch.randn(num_k, hkv, d, generator=g), \
        torch.randn(num_k, hkv, d, generator=g)
    sinks = torch.randn(hq, generator=g)
    k_pos = torch.arange(num_k) + 5
    q_pos = k_pos[-num_q:]
    out = attention.attention_with_sinks(q, k, v, sinks, q_pos, k_pos, window, d**-0.5)
    close(out, reference.attention_with_sinks(q, k, v, sinks, q_pos, k_pos, window, d**-0.5))


def test_dense_attention_bf16():
    g = gen(3)
    q, k, v = (torch.randn(5, n, 64, generator=g).bfloat16() for n in (8, 2, 2))
    sinks = torch.randn(8, generator=g)
    pos = torch.arange(5)
    out = attention.attention_with_sinks(q, k, v, sinks, pos, pos, None, 0.125)
    close(out, reference.attention_with_sinks(q, k, v, sinks, pos, pos, None, 0.125), tol=2e-2)


# ---------------------------------------------------------------------------------------------------- paged
class PagedBatch:
    """A random paged cache and a batch of (context length, query count) sequences with shuffled block tables."""

    def __init__(self, seqs, hq=8, hkv=2, d=32, page=4, seed=0, dtype=torch.float32, poison_before=None):
        g = gen(seed)
        self.lens = [n for n, _ in seqs]
        qlens = [m for _, m in seqs]
        max_blocks = max(-(-n // page) for n in self.lens)
        num_blocks = len(seqs) * max_blocks + 3
        self.k = torch.randn(num_blocks, page, hkv, d, generator=g).to(dtype)
        self.v = torch.randn(num_blocks, page, hkv, d, generator=g).to(dtype)
        perm = torch.randperm(num_blocks - 1, generator=g) + 1  # block 0 stays free
        self.tables = perm[: len(seqs) * max_blocks].reshape(len(seqs), max_blocks).int()
        if poison_before is not None:
            # Blocks wholly before a sequence's window may have been freed: point them at block 0, full of NaN.
            self.k[0], self.v[0] = float("nan"), float("nan")
            for b, (n, m) in enumerate(seqs):
                first_visible = max(0, n - m - poison_before + 1)
                self.tables[b, : first_visible // page] = 0
        self.qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
        self.q = torch.randn(sum(qlens), hq, d, generator=g).to(dtype)
        self.sinks = torch.randn(hq, generator=g)
        self.scale = d**-0.5

    def run(self, fn, window, **kwargs):
        return fn(self.q, self.k, self.v, self.tables, self.qsl, torch.tensor(self.lens, dtype=torch.int32),
                  self.sinks, window, self.scale, **kwargs)

    def check(self, window, tol=2e-5, **kwargs):
        kwargs.setdefault("min_split_keys", 1)  # let the short test contexts split into several chunks
        out = self.run(attention.paged_attention, window, **kwargs)
        close(out, self.run(paged.paged_attention, window), tol)
        return out


@pytest.mark.parametrize(("window", "num_splits"), [(None, 1), (5, 3)])
def test_paged_mixed_batch(window, num_splits):
    """Fresh prefill, a prefill chunk continuing a cached prefix, decodes, and a sequence with no query this step."""
    batch = PagedBatch([(11, 11), (23, 6), (9, 1), (5, 0), (30, 1)], seed=1)
    batch.check(window, num_splits=num_splits)


@pytest.mark.parametrize("window", [None, 7])
def test_chunked_prefill_attends_to_the_cached_prefix(window):
    """Keys before the chunk's first query are attended: the chunk's rows equal the same rows of a full prefill."""
    n, m = 26, 8
    batch = PagedBatch([(n, m)], seed=2)
    chunk = batch.check(window, num_splits=1)
    full = PagedBatch([(n, n)], seed=2)
    full.k, full.v, full.tables, full.sinks = batch.k, batch.v, batch.tables, batch.sinks
    full.q = torch.cat((torch.randn(n - m, *batch.q.shape[1:]), batch.q))
    close(chunk, attention.paged_attention(full.q, full.k, full.v, full.tables, full.qsl,
                                           torch.tensor([n], dtype=torch.int32), full.sinks, window,
                                           full.scale)[n - m:])
    # and differs from attending to the chunk alone
    alone = reference.attention_with_sinks(batch.q, *(c[batch.tables[0].long()].flatten(0, 1)[n - m:n]
                                                      for c in (batch.k, batch.v)), batch.sinks,
                                           torch.arange(n - m, n), torch.arange(n - m, n), window, batch.scale)
    assert (chunk - alone).abs().max() > 1e-3


@pytest.mark.parametrize("window", [1, 4, 9])
def test_window_boundaries(window):
    """Windows of 1, of exactly one page, a page plus one; queries on and around page edges; freed (NaN) blocks
    before the window are never read."""
    batch = PagedBatch([(16, 1), (17, 1), (12, 5), (21, 9)], seed=3, poison_before=window)
    out = batch.check(window, num_splits=2)
    assert not out.isnan().any()


@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_over_many_blocks_split_k(num_splits):
    """Long contexts across dozens of pages, split into uneven KV chunks and combined with the sink."""
    batch = PagedBatch([(150, 1), (97, 1), (3, 1)], hq=8, hkv=1, page=4, seed=4)
    batch.check(None, num_splits=num_splits)


def test_long_decode_with_default_split_granularity():
    """Splits of at least MIN_SPLIT_KEYS: some programs get no keys and only mark their partial empty."""
    batch = PagedBatch([(700, 1), (300, 1)], hq=4, hkv=1, page=16, seed=7)
    batch.check(None, num_splits=4, min_split_keys=attention.MIN_SPLIT_KEYS)
    batch.check(128, num_splits=4, min_split_keys=attention.MIN_SPLIT_KEYS)


def test_paged_page16_head64_bf16():
    batch = PagedBatch([(40, 1), (33, 7)], hq=8, hkv=1, d=64, page=16, seed=5, dtype=torch.bfloat16)
    batch.check(128, tol=3e-2)
    batch.check(None, tol=3e-2, num_splits=2)


def test_single_query_single_key():
    batch = PagedBatch([(1, 1)], hq=2, hkv=2, seed=6)
    batch.check(None)
    batch.check(None, num_splits=4)  # all but one split see no keys
