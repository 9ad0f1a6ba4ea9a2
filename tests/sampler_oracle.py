"""Test oracle: the engine's sampling path as it was before sampling moved onto the executor (commit ccb71de).

`Sampler` below is that commit's `workers/engine/sampler.py` verbatim (the host sampler over full logits, reading
the requests); `OracleEngine` runs the old step: the executor's full logits (`forward_logits`) come back to the
engine, which samples them on the host. The product has one sampler (`workers.engine.sampler`); this copy exists
only so tests can check that the new path gives the old tokens and logprobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gptoss_cluster.workers.engine import Engine, EngineConfig, SampledTokens
from gptoss_cluster.workers.engine.request import Request, TokenLogprob
from gptoss_cluster.workers.sampling import SamplingParams
from tests.helpers import ForwardingExecutor


class OracleExecutor(ForwardingExecutor):
    """The old contract: the inner executor's full logits, sampled here on the host by the old `Sampler` over the
    requests the engine is stepping (set by `OracleEngine` before each call)."""

    def __init__(self, inner, seed: int) -> None:
        super().__init__(inner)
        self.sampler = Sampler(seed)
        self.requests: list[Request] = []

    def execute(self, plan, bitmask=None):
        logits = self.inner.forward_logits(plan)
        masks = None
        if bitmask is not None:
            mask = bitmask.result()
            if mask is not None:
                full = torch.full((len(self.requests), mask.bitmask.shape[1]), -1, dtype=torch.int32)
                rows = mask.rows.tolist()
                full[rows] = mask.bitmask
                masks = (full, rows, _xgrammar_apply)
        with torch.inference_mode():
            tokens, logprobs = self.sampler.sample(logits, self.requests, masks) if self.requests else ([], [])
        return to_sampled_tokens(tokens, logprobs)


def _xgrammar_apply(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)


def to_sampled_tokens(tokens: list[int], logprobs: list[TokenLogprob | None]) -> SampledTokens:
    """The old sampler's lists in the new result's shape (what the engine unpacks again: exact float32 round trip)."""
    rows = [i for i, lp in enumerate(logprobs) if lp is not None]
    if not rows:
        return SampledTokens(torch.tensor(tokens, dtype=torch.long))
    width = max(len(logprobs[i].top) for i in rows)
    top_ids = torch.zeros(len(rows), width, dtype=torch.long)
    top_values = torch.zeros(len(rows), width, dtype=torch.float32)
    for j, i in enumerate(rows):
        for k, (token, value) in enumerate(logprobs[i].top):
            top_ids[j, k], top_values[j, k] = token, value
    chosen = torch.tensor([logprobs[i].logprob for i in rows], dtype=torch.float32)
    return SampledTokens(torch.tensor(tokens, dtype=torch.long), chosen, top_ids if width else None,
                         top_values if width else None)


class OracleEngine(Engine):
    """An engine whose steps sample the old way: no SamplingBatch (so no uniforms drawn by the engine), the old
    host sampler in `OracleExecutor` instead."""

    def __init__(self, executor, model_config, config=None, tokenizer=None) -> None:
        oracle = OracleExecutor(executor, (config.seed if config is not None else 0))
        # the engine as it was: serial (the oracle samples from the requests' state when the step runs)
        config = dataclasses.replace(config or EngineConfig(), async_scheduling=False)
        super().__init__(oracle, model_config, config, tokenizer)

    def _sampling_batch(self, requests):
        self.executor.requests = list(requests)
        return None


# ---------------------------------------------------------------------------------------------------- verbatim
class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor, requests: Sequence[Request], masks: Any = None
               ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [S, V] float32 (row i belongs to requests[i]; modified in place) -> token ids and logprobs.

        `masks`: (bitmask [S, words] int32, constrained rows, apply) from the engine's constraint states; applied
        after the penalties, in one call. A constrained row decides its own end, so min_tokens does not mask it."""
        params = [r.params for r in requests]
        num_rows, vocab = logits.shape
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None

        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        if penalized:
            apply_penalties(logits, penalized, requests)
        for i, request in enumerate(requests):
            if request.constraint is not None:
                continue
            if request.stop_token_ids and request.num_output_tokens < request.params.min_tokens:
                ids = [t for t in request.stop_token_ids if t < vocab]
                logits[i, ids] = float("-inf")

        if masks is not None:
            bitmask, rows, apply = masks
            apply(logits, bitmask, rows)
        tokens = sample_rows(logits, params, [r.generator for r in requests], self.generator)

        logprobs: list[TokenLogprob | None] = [None] * num_rows
        if raw_logprobs is not None:
            sampled = torch.tensor([tokens[i] for i in logprob_rows], device=raw_logprobs.device)
            chosen = raw_logprobs.gather(1, sampled[:, None])[:, 0].tolist()
            max_n = max(params[i].logprobs for i in logprob_rows)
            top_values, top_ids = (raw_logprobs.topk(max_n, dim=-1) if max_n else (None, None))
            for j, i in enumerate(logprob_rows):
                n = params[i].logprobs
                top = (list(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist(), strict=True)) if n else [])
                logprobs[i] = TokenLogprob(tokens[i], chosen[j], top)
        return tokens, logprobs


def apply_penalties(logits: torch.Tensor, rows: Sequence[int], requests: Sequence[Request]) -> None:
    """Repetition (prompt + output tokens), then frequency and presence (output tokens), in place on `rows`."""
    vocab = logits.shape[1]
    device = logits.device
    flat = logits.view(-1)
    rep_rows = [i for i in rows if requests[i].params.repetition_penalty != 1.0]
    if rep_rows:
        keys = torch.cat([torch.as_tensor(requests[i].token_ids, dtype=torch.long) + i * vocab for i in rep_rows])
        keys = torch.unique(keys).to(device)
        penalty = torch.tensor([r.params.repetition_penalty for r in requests], dtype=logits.dtype,
                               device=device)[keys // vocab]
        values = flat[keys]
        flat[keys] = torch.where(values > 0, values / penalty, values * penalty)
    add_rows = [i for i in rows if requests[i].params.frequency_penalty or requests[i].params.presence_penalty]
    add_rows = [i for i in add_rows if requests[i].num_output_tokens]
    if add_rows:
        keys = torch.cat([torch.as_tensor(requests[i].output_token_ids, dtype=torch.long) + i * vocab
                          for i in add_rows])
        keys, counts = torch.unique(keys, return_counts=True)
        keys, counts = keys.to(device), counts.to(device)
        row = keys // vocab
        frequency = torch.tensor([r.params.frequency_penalty for r in requests], dtype=logits.dtype, device=device)
        presence = torch.tensor([r.params.presence_penalty for r in requests], dtype=logits.dtype, device=device)
        flat[keys] -= frequency[row] * counts.to(logits.dtype) + presence[row]


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                default_generator: torch.Generator | None) -> list[int]:
    """One token per row of logits [S, V]: greedy rows by argmax, the others by temperature / top-k / top-p / min-p
    and an inverse-CDF draw (row i's uniform from generators[i], else from `default_generator`)."""
    num_rows, vocab = logits.shape
    device = logits.device
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    if len(greedy) == num_rows:
        return argmax_rows(logits).tolist()
    out = torch.empty(num_rows, dtype=torch.long, device=device)
    if greedy:
        index = torch.tensor(greedy, device=device)
        out[index] = argmax_rows(logits[index])
    rand = [i for i, p in enumerate(params) if p.temperature != 0]
    rand_params = [params[i] for i in rand]
    index = torch.tensor(rand, device=device)
    x = logits if len(rand) == num_rows else logits[index]
    x = x / torch.tensor([p.temperature for p in rand_params], dtype=x.dtype, device=device)[:, None]

    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in rand_params]
    if any(ks):
        k = torch.tensor(ks, device=device)
        top_values = x.topk(max(ks), dim=-1).values
        kth = top_values.gather(1, (k - 1).clamp(min=0)[:, None])
        kth = kth.masked_fill((k == 0)[:, None], float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)

    top_p_rows = [j for j, p in enumerate(rand_params) if p.top_p < 1]
    if top_p_rows:
        top_p = torch.tensor([rand_params[j].top_p for j in top_p_rows], dtype=probs.dtype, device=device)
        probs[torch.tensor(top_p_rows, device=device)] = _top_p(probs[top_p_rows], top_p)
    if any(p.min_p > 0 for p in rand_params):
        min_p = torch.tensor([p.min_p for p in rand_params], dtype=probs.dtype, device=device)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)

    # inverse CDF: one uniform per row, from the request's own generator (so a seeded row does not depend on the
    # batch), else from the engine's. 1 - u lies in (0, 1], so the target is above 0 and at most the row's total:
    # the first index whose cumulative mass reaches it always has a probability above 0 (masked tokens never).
    uniforms = torch.empty(len(rand), dtype=torch.float64)
    unseeded = []
    for j, i in enumerate(rand):
        generator = generators[i]
        if generator is None:
            unseeded.append(j)
        else:
            uniforms[j] = torch.rand((), dtype=torch.float64, generator=generator)
    if unseeded:
        uniforms[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, generator=default_generator)
    cdf = torch.cumsum(probs, dim=-1)
    target = (1.0 - uniforms).to(device=device, dtype=cdf.dtype) * cdf[:, -1]
    out[index] = torch.searchsorted(cdf, target[:, None])[:, 0]
    return out.tolist()


TOP_P_CANDIDATES = 1024  # sort only this many of the most likely tokens first; rows they do not cover sort all


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs [R, V] -> the same with everything outside each row's nucleus set to 0: the smallest prefix of the
    tokens sorted by probability whose mass reaches top_p (the first token always stays). A full sort of a 201k
    vocabulary costs ~10 ms per row on a CPU core, and a trained model's nucleus is almost always among its top few
    hundred tokens: those are sorted first (topk), and only rows whose candidates hold less than top_p of the mass
    (known at once when even k times the largest probability falls short: a flat distribution) sort everything."""
    num_rows, vocab = probs.shape
    k = min(vocab, TOP_P_CANDIDATES)
    rows = torch.arange(num_rows, device=probs.device)
    maybe_head = probs.amax(dim=-1) * k >= top_p
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, sorted values, their token ids)
    full = rows[~maybe_head]
    if maybe_head.any():
        head = rows[maybe_head]
        values, order = probs[head].topk(k, dim=-1)  # descending
        covered = values.sum(dim=-1) >= top_p[head]
        parts.append((head[covered], values[covered], order[covered]))
        full = torch.cat([full, head[~covered]])
    if len(full):
        values, order = torch.sort(probs[full], dim=-1, descending=True)
        parts.append((full, values, order))
    out = torch.zeros_like(probs)
    for part_rows, values, order in parts:
        if len(part_rows):
            kept = values.masked_fill(torch.cumsum(values, dim=-1) - values >= top_p[part_rows][:, None], 0.0)
            out[part_rows] = torch.zeros(len(part_rows), vocab, dtype=probs.dtype,
                                         device=probs.device).scatter_(-1, order, kept)
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum (the first one on ties, as torch.argmax). On CPU numpy's SIMD argmax is ~3x
    faster than torch's over a 200k vocabulary, which matters: greedy sampling reads every logit once."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        return torch.from_numpy(np.argmax(x.numpy(), axis=1))
    return x.argmax(dim=-1)


def assert_same_results(got: list, want: list, what: str, atol: float = 1e-5) -> None:
    """GenerationResults of the same requests: identical tokens, finish and stop reasons; logprobs (the sampled
    token's and the top ones: same ids, values within `atol`)."""
    assert len(got) == len(want), what
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        where = f"{what}, request {k}"
        assert a.token_ids == b.token_ids, where
        assert (a.finish_reason, a.stop_reason) == (b.finish_reason, b.stop_reason), where
        assert (a.logprobs is None) == (b.logprobs is None), where
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) <= atol, where
            assert [t for t, _ in x.top] == [t for t, _ in y.top], where
            assert all(abs(u - v) <= atol for (_, u), (_, v) in zip(x.top, y.top, strict=True)), where
