"""SamplingParams validation and the batched sampler, on synthetic logits (no model)."""

import math

import pytest
import torch

from gptoss_cluster.workers.engine.request import Request
from gptoss_cluster.workers.engine.sampler import Sampler, apply_penalties, sample_rows
from gptoss_cluster.workers.sampling import SamplingParams, sample_token

V = 64


def request(params, prompt=(1, 2, 3), output=(), rid="r", eos=()):
    r = Request(rid, list(prompt), params, eos_token_ids=eos)
    r.token_ids.extend(output)
    return r


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
        for t in sample_rows(rows, [params] * n, [None] * n, gen):
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
    apply_penalties(got, [0, 1, 2], reqs)
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
    tokens = sample_rows(logits.expand(n, -1).clone(), [SamplingParams(temperature=1.0)] * n, [None] * n, gen)
    assert set(tokens) <= set(allowed) and {0, V // 2} <= set(tokens)
