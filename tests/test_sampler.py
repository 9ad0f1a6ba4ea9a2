"""SamplingParams validation and the batched sampler (SamplingBatch built on the host, `sample` where the logits
are), on synthetic logits (no model): its math, its equality with the engine's previous host sampler, and that it
never reads a device tensor back."""

import math

import pytest
import torch

from gptoss_cluster.workers.engine.request import Request
from gptoss_cluster.workers.engine.sampler import (
    SamplingBatch,
    TokenBitmask,
    apply_penalties,
    build_sampling_batch,
    sample,
    sample_rows,
    token_logprobs,
)
from gptoss_cluster.workers.sampling import SamplingParams, sample_token
from tests.sampler_oracle import Sampler as OldSampler

V = 64


def request(params, prompt=(1, 2, 3), output=(), rid="r", eos=()):
    r = Request(rid, list(prompt), params, eos_token_ids=eos)
    r.token_ids.extend(output)
    return r


class Sampler:
    """The engine's two halves in one call: the SamplingBatch of `requests` (uniforms from the requests' generators
    or this one's), then `sample` over `logits`; token ids and TokenLogprobs as the engine unpacks them."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, logits, requests, bitmask=None):
        batch = build_sampling_batch(requests, self.generator, logits.shape[1])
        out = sample(logits, batch, bitmask)
        tokens = out.token_ids.tolist()
        return tokens, token_logprobs(out, requests, tokens)


def batch_of(params, generators, generator, vocab=V):
    return SamplingBatch.from_params(params, generators, generator, vocab)


@pytest.mark.parametrize("bad, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"min_p": -0.5}, "min_p"), ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"seed": "7"}, "seed"), ({"seed": 2**64}, "seed"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": "eos"}, "stop_token_ids"), ({"stop": [""]}, "stop"), ({"stop": [3]}, "stop"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"ignore_eos": 1}, "ignore_eos"),
])
def test_invalid_values_are_refused_with_the_field_name(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


def test_valid_values_normalize():
    p = SamplingParams(stop="###", stop_token_ids=[5, 6], top_k=0, logprobs=0, seed=-1)
    assert p.stop == ("###",) and p.stop_token_ids == (5, 6)
    assert SamplingParams(stop_token_ids=9).stop_token_ids == (9,)
    assert SamplingParams(stop=None).stop == ()
    assert not SamplingParams().has_penalties and SamplingParams(presence_penalty=0.1).has_penalties


def test_greedy_and_top_k_one_agree_and_batch_mixes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=g)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=1, seed=3),
              SamplingParams(temperature=1.3, top_p=1e-6), SamplingParams(temperature=0.5, min_p=1.0),
              SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_k=1)]
    reqs = [request(p, rid=str(i)) for i, p in enumerate(params)]
    tokens, logprobs = Sampler(0).sample(logits.clone(), reqs)
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs == [None] * 6


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -5.0]])
    n = 4000
    gen = torch.Generator().manual_seed(1)

    def freq(params):
        counts = torch.zeros(6)
        rows = logits.expand(n, -1).clone()
        for t in sample_rows(rows, batch_of([params] * n, [None] * n, gen)).tolist():
            counts[t] += 1
        return counts / n

    probs = torch.softmax(logits[0] / 0.8, -1)
    assert (freq(SamplingParams(temperature=0.8)) - probs).abs().max() < 0.03
    top2 = freq(SamplingParams(top_k=2))
    assert top2[2:].sum() == 0 and abs(top2[0] - 1 / (1 + math.exp(-1))) < 0.03
    # top_p 0.8: the smallest prefix reaching 0.8 of the mass is the top three tokens (0.61, 0.22, then 0.14)
    top_p = freq(SamplingParams(top_p=0.8))
    assert top_p[3:].sum() == 0 and top_p[2] > 0
    min_p = freq(SamplingParams(min_p=0.3))  # keeps tokens with p >= 0.3 * p_max: 2.0 and 1.0 (e^-1 = 0.37)
    assert min_p[2:].sum() == 0 and min_p[1] > 0


def test_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, V, generator=g)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone_req = request(seeded)
    alone = [Sampler(0).sample(logits[2:3].clone(), [alone_req])[0][0] for _ in range(1)]
    for _ in range(5):  # further draws continue the request's own generator
        alone.append(Sampler(0).sample(logits[2:3].clone(), [alone_req])[0][0])
    busy_req = request(seeded)
    others = [request(SamplingParams(temperature=1.0), rid="u"), request(SamplingParams(temperature=0), rid="g"),
              request(SamplingParams(temperature=0.5, seed=7), rid="s"), request(SamplingParams(top_k=3), rid="k")]
    busy = []
    for step in range(6):
        batch = [others[0], others[1], busy_req, others[2], others[3]][: 3 + step % 3]
        busy.append(Sampler(step).sample(logits[: len(batch)].clone(), batch)[0][2])
    assert busy == alone
    # and sample_token (one row) draws exactly as the engine does for a seeded request
    gen = SamplingParams(temperature=1.0, top_p=0.9, seed=42).make_generator()
    assert [sample_token(logits[2], seeded, gen) for _ in range(6)] == alone


def test_penalties_match_their_definitions():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, V, generator=g) * 3
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0)]
    reqs = [request(params[0], prompt=[1, 2, 2], output=[3, 3]), request(params[1], prompt=[4], output=[5, 5, 6]),
            request(params[2], prompt=[7], output=[8, 8])]
    got = logits.clone()
    apply_penalties(got, build_sampling_batch(reqs, torch.Generator(), V).penalties)
    want = logits.clone()
    for t in (1, 2, 3):
        want[0, t] = want[0, t] / 1.5 if want[0, t] > 0 else want[0, t] * 1.5
    want[1, 5] -= 0.5 * 2 + 0.25
    want[1, 6] -= 0.5 * 1 + 0.25
    for t in (7, 8):
        want[2, t] = want[2, t] / 0.8 if want[2, t] > 0 else want[2, t] * 0.8
    want[2, 8] += 1.0
    torch.testing.assert_close(got, want)


def test_min_tokens_masks_stop_tokens_and_logprobs_are_raw():
    logits = torch.zeros(2, V)
    logits[:, 9] = 10.0  # the stop token is by far the most likely
    logits[:, 4] = 5.0
    early = request(SamplingParams(temperature=0, min_tokens=2, logprobs=2), output=[1], eos=(9,), rid="a")
    late = request(SamplingParams(temperature=0, min_tokens=2, logprobs=0), output=[1, 1], eos=(9,), rid="b")
    raw = torch.log_softmax(logits, -1)
    tokens, logprobs = Sampler(0).sample(logits.clone(), [early, late])
    assert tokens == [4, 9]
    assert logprobs[0].token_id == 4 and logprobs[0].logprob == pytest.approx(raw[0, 4].item())
    assert [t for t, _ in logprobs[0].top] == [9, 4]
    assert logprobs[0].top[0][1] == pytest.approx(raw[0, 9].item())
    assert logprobs[1].top == [] and logprobs[1].logprob == pytest.approx(raw[1, 9].item())


def _top_p_by_full_sort(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The nucleus by definition: sort everything, keep the smallest prefix whose mass reaches top_p."""
    values, order = torch.sort(probs, dim=-1, descending=True)
    kept = values.masked_fill(torch.cumsum(values, dim=-1) - values >= top_p[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, kept)


def test_top_p_candidates_give_the_nucleus_of_the_full_sort():
    from gptoss_cluster.workers.engine.sampler import TOP_P_CANDIDATES, _top_p

    g = torch.Generator().manual_seed(5)
    vocab = 4 * TOP_P_CANDIDATES
    logits = torch.randn(6, vocab, generator=g)
    logits[:3, :40] += 8  # a trained model's head: the nucleus within the candidates
    logits[3] *= 0.01  # flat: known at once to need the full sort
    logits[4, :TOP_P_CANDIDATES] += 3.0  # candidates hold some mass but not enough: sorted again in full
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.9, 0.95, 0.3])
    assert torch.equal(_top_p(probs, top_p), _top_p_by_full_sort(probs, top_p))


def test_masked_tokens_are_never_drawn():
    logits = torch.full((1, V), float("-inf"))
    allowed = [0, 7, V // 2, V - 2]  # the last token stays masked: the draw's upper end must not land on it
    logits[0, allowed] = torch.tensor([0.0, -30.0, 1.0, -60.0])  # 7 and V - 2 are (nearly) impossible
    n = 3000
    gen = torch.Generator().manual_seed(3)
    tokens = sample_rows(logits.expand(n, -1).clone(), batch_of([SamplingParams(temperature=1.0)] * n, [None] * n,
                                                                gen)).tolist()
    assert set(tokens) <= set(allowed) and {0, V // 2} <= set(tokens)


# ---------------------------------------------------------------------------------------------------- the old path
MIXED = [  # (params, stop/eos ids, constrained)
    (SamplingParams(temperature=0), (), False),
    (SamplingParams(temperature=0, logprobs=5), (), False),
    (SamplingParams(temperature=0.8, top_p=0.9, seed=7, logprobs=5), (), False),
    (SamplingParams(temperature=1.2, top_k=20, min_p=0.05), (), False),
    (SamplingParams(temperature=0.7, seed=11, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3),
     (), False),
    (SamplingParams(temperature=0, repetition_penalty=0.8, presence_penalty=-1.0, logprobs=0), (), False),
    (SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5, 6]), (9,), False),
    (SamplingParams(temperature=1.0, top_p=0.5, top_k=40, seed=3, min_tokens=4), (9,), True),
    (SamplingParams(temperature=0.9, seed=5, min_p=0.1, frequency_penalty=1.0), (), True),
]


def test_mixed_batch_gives_the_previous_host_sampler_s_tokens_and_logprobs():
    """Greedy, seeded and unseeded draws, top-k / top-p / min-p, penalties, min_tokens, logprobs and two
    constrained rows, over several steps: exactly the tokens and logprobs of the engine's old host sampler (kept in
    tests/sampler_oracle.py), which read the requests and drew the uniforms itself."""
    import xgrammar as xgr

    vocab = 300  # not a multiple of 32: the bitmask's last word is partly unused
    g = torch.Generator().manual_seed(11)

    def make():
        out = []
        for i, (params, eos, constrained) in enumerate(MIXED):
            r = request(params, prompt=torch.randint(0, vocab, (5 + i,), generator=torch.Generator().manual_seed(i))
                        .tolist(), rid=str(i), eos=eos)
            r.constraint = object() if constrained else None  # only its presence matters to the sampler
            out.append(r)
        return out

    new_reqs, old_reqs = make(), make()
    new, old = Sampler(seed=4), OldSampler(seed=4)
    constrained = [i for i, (_, _, c) in enumerate(MIXED) if c]
    for step in range(8):
        logits = torch.randn(len(MIXED), vocab, generator=g) * 3
        logits[:, 9] += 6.0 * (step % 2)  # the stop token is likely on every other step
        allowed = torch.randint(-2 ** 31, 2 ** 31 - 1, (len(constrained), (vocab + 31) // 32), generator=g,
                                dtype=torch.int64).to(torch.int32)
        full = xgr.allocate_token_bitmask(len(MIXED), vocab)
        full[constrained] = allowed
        old_tokens, old_logprobs = old.sample(logits.clone(), old_reqs, (full, constrained, _xgrammar_apply))
        new_tokens, new_logprobs = new.sample(logits.clone(), new_reqs,
                                              TokenBitmask(allowed, torch.tensor(constrained)))
        assert new_tokens == old_tokens, step
        assert new_logprobs == old_logprobs, step
        for r_new, r_old, t in zip(new_reqs, old_reqs, new_tokens, strict=True):
            r_new.token_ids.append(t)
            r_old.token_ids.append(t)
    assert all(lp is not None and len(lp.top) == 5 for lp in (new_logprobs[1], new_logprobs[2]))
    assert new_logprobs[5].top == [] and new_logprobs[0] is None


def _xgrammar_apply(logits, bitmask, rows):
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)


def test_apply_token_bitmask_matches_xgrammar_s_kernel():
    """The CPU apply (numpy unpackbits, all-allowed rows skipped) and the device one (torch shifts): exactly
    xgrammar's result, for all rows, a subset, all-allowed rows, logits wider than the vocabulary."""
    import numpy as np
    import xgrammar as xgr

    from gptoss_cluster.workers.engine.sampler import _apply_bitmask_torch, allows_all, apply_token_bitmask

    vocab = 201088
    g = torch.Generator().manual_seed(0)
    bitmask = xgr.allocate_token_bitmask(6, vocab)
    words = bitmask.shape[1]
    bitmask[0] = torch.randint(-2 ** 31, 2 ** 31 - 1, (words,), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[1] = 0
    bitmask[1, 7] = 1 << 3  # one token allowed
    bitmask[2, 100:] = 0  # the first 3200 tokens allowed
    bitmask[4, -1] = (1 << 31) - 1  # all but the last token
    bitmask[5] = torch.randint(-2 ** 31, 2 ** 31 - 1, (words,), generator=g, dtype=torch.int64).to(torch.int32)
    for pad in (0, 5):
        for rows in ([0, 1, 2, 3, 4, 5], [1, 3, 4], [3], [5, 0]):
            logits = torch.randn(6, vocab + pad, generator=g)
            expected = logits.clone()
            xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab, indices=rows)
            index = torch.tensor(rows)
            got = logits.clone()
            apply_token_bitmask(got, bitmask[index], index, vocab)  # one bitmask row per constrained row
            assert torch.equal(got, expected), (pad, rows)
            got = logits.clone()
            _apply_bitmask_torch(got, bitmask[index], index, vocab)
            assert torch.equal(got, expected), (pad, rows)
    row = np.full(3, -1, dtype=np.int32)
    assert allows_all(row, 96) and allows_all(row, 70)
    row[2] = 0b0111111
    assert allows_all(row, 70) and not allows_all(row, 71)
    row[0] = -2
    assert not allows_all(row, 70)


def test_the_device_sampler_never_reads_a_device_tensor_back():
    """`sample` on meta tensors (shapes only: any read-back, .item(), .tolist(), a boolean mask, raises there) with
    every feature at once: on an accelerator it only queues work; the step's one sync is SampledTokens.to_host."""
    vocab = 1000
    reqs = [request(params, output=(4, 4, 7), rid=str(i), eos=eos) for i, (params, eos, _) in enumerate(MIXED)]
    reqs[-1].constraint = object()
    batch = build_sampling_batch(reqs, torch.Generator().manual_seed(0), vocab)
    assert batch.penalties is not None and batch.banned_rows is not None and batch.min_p is not None
    assert batch.max_top_k == 40 and batch.top_p_rows.numel() == 2 and batch.max_logprobs == 5
    bitmask = TokenBitmask(torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32), torch.tensor([len(reqs) - 1]))
    logits = torch.empty(len(reqs), vocab, device="meta")
    out = sample(logits, batch.to("meta"), bitmask.to("meta"))
    assert out.token_ids.device.type == "meta" and out.token_ids.shape == (len(reqs),)
    assert out.logprobs.shape == (3,) and out.top_ids.shape == out.top_logprobs.shape == (3, 5)
    from gptoss_cluster.workers.engine.sampler import sample_vocab_parallel

    parts: dict = {}
    for rank in (1, 0):  # the vocab-parallel path too (its batch stays on the host; the logits do not)
        local = torch.empty(len(reqs), vocab // 2, device="meta")
        out = sample_vocab_parallel(local, batch, bitmask if rank == 0 else None, rank * vocab // 2,
                                    _GatherToRoot(parts, rank), is_root=rank == 0)
    assert out.token_ids.device.type == "meta" and out.top_ids.shape == (3, 5)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the harness does catch a read-back
        torch.empty(3, device="meta").tolist()
    with pytest.raises((RuntimeError, NotImplementedError)):
        logits[logits[:, 0] > 0]


class _GatherToRoot:
    """The gather-to-rank-0 collective of G ranks run one after another in one process: ranks 1..G-1 run first and
    leave each call's part in `parts[rank]`; rank 0's k-th call concatenates every rank's k-th part in rank order
    (what TorchDistributedCollective(gather_dst=0) returns there)."""

    def __init__(self, parts: dict, rank: int) -> None:
        self.parts, self.rank, self.calls = parts, rank, 0
        parts.setdefault(rank, [])

    def all_gather(self, tensor, dim):
        self.calls += 1
        if self.rank:
            self.parts[self.rank].append(tensor.clone())
            return torch.empty(0)
        others = [self.parts[r][self.calls - 1] for r in sorted(self.parts) if r]
        return torch.cat([tensor, *others], dim=dim)


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_sampling_equals_sampling_the_gathered_rows(world_size):
    """sample_vocab_parallel over G slices: exactly `sample` on the whole rows (greedy rows reduced slice by slice,
    ties to the first maximum across slices; drawn, logprob and constrained rows gathered)."""
    from gptoss_cluster.workers.engine.sampler import sample_vocab_parallel

    vocab = 256 * world_size
    g = torch.Generator().manual_seed(world_size)
    reqs = [request(params, output=(3, 3, vocab - 2, 17), rid=str(i), eos=eos + (vocab - 1,))
            for i, (params, eos, _) in enumerate(MIXED)]
    reqs += [request(SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=1.0), rid="p"),
             request(SamplingParams(temperature=0, min_tokens=9), rid="m", eos=(0, vocab - 1)),
             request(SamplingParams(temperature=0), rid="tie")]
    reqs[len(MIXED) - 1].constraint = object()
    logits = torch.randn(len(reqs), vocab, generator=g) * 3
    logits[-1, 5] = logits[-1, vocab - 3] = 50.0  # a tie across slices: the first one wins, as argmax
    logits[-2, vocab - 1] = 60.0  # the banned stop token would win
    constrained = [len(MIXED) - 1]
    allowed = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, vocab // 32), generator=g, dtype=torch.int64)
    bitmask = TokenBitmask(allowed.to(torch.int32), torch.tensor(constrained))
    batch = build_sampling_batch(reqs, torch.Generator().manual_seed(1), vocab)
    assert set(batch.argmax_rows.tolist()) == {0, 6, len(reqs) - 3, len(reqs) - 2, len(reqs) - 1}
    want = sample(logits.clone(), batch, bitmask)
    width = vocab // world_size
    parts: dict = {}
    for rank in [*range(1, world_size), 0]:
        local = logits[:, rank * width:(rank + 1) * width].clone()
        got = sample_vocab_parallel(local, batch, bitmask if rank == 0 else None, rank * width,
                                    _GatherToRoot(parts, rank), is_root=rank == 0)
        assert (got is None) == (rank != 0)
    assert torch.equal(got.token_ids, want.token_ids)
    assert got.token_ids[-1] == 5 and got.token_ids[-2] != vocab - 1
    for name in ("logprobs", "top_ids", "top_logprobs"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_select_keeps_rows_and_renumbers_their_inputs():
    reqs = [request(params, output=(4, 5), rid=str(i), eos=eos) for i, (params, eos, _) in enumerate(MIXED)]
    batch = build_sampling_batch(reqs, torch.Generator().manual_seed(0), V)
    rows = torch.tensor([i for i in range(len(reqs)) if i not in batch.argmax_rows.tolist()])
    sub = batch.select(rows)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(len(reqs), V, generator=g)
    whole = sample(logits.clone(), batch)  # the same draws: the batch carries them
    part = sample(logits[rows].clone(), sub)
    assert torch.equal(part.token_ids, whole.token_ids[rows])
    assert torch.equal(part.logprobs, whole.logprobs) and torch.equal(part.top_ids, whole.top_ids)


def test_vocab_parallel_rows_with_logprobs_or_a_bitmask_are_never_reduced_slice_by_slice():
    from gptoss_cluster.workers.engine.sampler import sample_vocab_parallel

    vocab, rows = 128, 4
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(3))
    batch = SamplingBatch.greedy(rows)  # every row an argmax row ...
    batch.logprob_rows, batch.max_logprobs = torch.tensor([1, 3]), 2  # ... but two want logprobs: gathered
    parts: dict = {}
    for rank in (1, 0):
        local = logits[:, rank * 64:(rank + 1) * 64].clone()
        got = sample_vocab_parallel(local, batch, None, rank * 64, _GatherToRoot(parts, rank), is_root=rank == 0)
    want = sample(logits.clone(), batch)
    assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.top_ids, want.top_ids)
    mask = TokenBitmask(torch.full((1, vocab // 32), -1, dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(ValueError, match="argmax_rows"):
        sample_vocab_parallel(logits[:, :64].clone(), batch, mask, 0, _GatherToRoot({}, 0), is_root=True)
