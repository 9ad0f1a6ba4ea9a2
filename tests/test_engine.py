"""The engine end to end on a small random model (float32): continuous batching, prefix caching, preemption, aborts,
seeded sampling, invalid input, streaming, stop conditions and statistics."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from gptoss_cluster.workers.config import ModelConfig
from gptoss_cluster.workers.engine import Engine, EngineConfig, Executor, LocalExecutor, RequestStatus
from gptoss_cluster.workers.engine.executor import sample_step
from gptoss_cluster.workers.model import GptOssModel
from gptoss_cluster.workers.sampling import SamplingParams
from tests.helpers import ForwardingExecutor

VOCAB = 4096
EOS = 4095
GREEDY = dict(temperature=0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(small_model):
    return small_model


def ids(n, seed):
    return torch.randint(0, VOCAB - 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


_reference_cache: dict = {}


def reference_greedy(model, prompt, n):
    """The request alone: contiguous KVCache, one token at a time, no engine."""
    key = (tuple(prompt), n)
    if key not in _reference_cache:
        cache = model.new_kv_cache(len(prompt) + n)
        tokens = list(prompt)
        logits = model(torch.tensor(tokens), cache.positions(len(tokens)), cache, torch.tensor([len(tokens) - 1]))
        cache.advance(len(tokens))
        out = []
        for _ in range(n):
            out.append(int(logits[-1].argmax()))
            logits = model(torch.tensor(out[-1:]), cache.positions(1), cache, torch.tensor([0]))
            cache.advance(1)
        _reference_cache[key] = out
    return _reference_cache[key]


class HookExecutor(ForwardingExecutor):
    """A LocalExecutor that records logits and calls `hook(step)` while a step executes (outside the engine lock)."""

    def __init__(self, model):
        super().__init__(LocalExecutor(model))
        self.hook = None
        self.steps = 0
        self.logits = []

    def execute(self, plan, bitmask=None):
        logits = self.inner.forward_logits(plan)
        self.steps += 1
        self.logits.append(logits.clone())
        if self.hook is not None:
            self.hook(self.steps)
        return sample_step(logits, plan, bitmask).to_host()


MIX = [(5, 12), (40, 8), (150, 6), (300, 10), (17, 30), (129, 3), (64, 5)]  # (prompt, max_tokens)


@pytest.mark.parametrize("config", [
    dict(max_num_batched_tokens=64),  # chunked prefill, chunks not aligned to 128 or 16
    dict(max_num_batched_tokens=512, enable_chunked_prefill=False),
    dict(num_blocks=40, max_num_batched_tokens=100),  # tiny pool: preemption
], ids=["chunked", "unchunked", "preempting"])
def test_continuous_batching_matches_each_request_alone(model, config):
    prompts = [ids(n, seed=i) for i, (n, _) in enumerate(MIX)]
    engine = Engine.from_model(model, EngineConfig(**{"num_blocks": 400, **config}))
    results = engine.generate([(p, SamplingParams(max_tokens=m, **GREEDY))
                               for p, (_, m) in zip(prompts, MIX, strict=True)])
    for p, (_, m), r in zip(prompts, MIX, results, strict=True):
        assert r.finish_reason == "length" and r.token_ids == reference_greedy(model, p, m)
    stats = engine.stats()
    if config.get("num_blocks") == 40:
        assert stats.num_preemptions > 0
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_blocks_free == stats.kv_blocks_total
    engine.kv.check()


def test_prefix_cache_hit_gives_the_cold_output(model):
    shared = ids(250, seed=100)
    first, second = shared + ids(50, seed=101), shared + ids(20, seed=102)
    params = SamplingParams(max_tokens=6, **GREEDY)
    executor = HookExecutor(model)
    engine = Engine(executor, model.config, EngineConfig(num_blocks=200, max_num_batched_tokens=100))
    engine.generate([(first, params)])
    before = engine.stats()
    executor.logits.clear()
    warm = engine.generate([(second, params)])[0]
    after = engine.stats()
    assert after.prefix_cache_hits - before.prefix_cache_hits == 240  # 15 full blocks, past the 128 window
    assert after.prefix_cache_queries - before.prefix_cache_queries == 270
    assert warm.usage.cached_prompt_tokens == 240
    warm_logits = executor.logits[0]  # the first sampled row (the 30 uncached prompt tokens fit one step)
    cold_executor = HookExecutor(model)
    cold_engine = Engine(cold_executor, model.config,
                         EngineConfig(num_blocks=200, max_num_batched_tokens=100, enable_prefix_caching=False))
    cold = cold_engine.generate([(second, params)])[0]
    assert cold_engine.stats().prefix_cache_hits == 0
    assert warm.token_ids == cold.token_ids == reference_greedy(model, second, 6)
    cold_logits = next(x for x in cold_executor.logits if x.shape[0])
    torch.testing.assert_close(warm_logits, cold_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["serial", "async"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_preemption_with_prefix_caching_keeps_the_greedy_tokens(model, block_size, async_scheduling):
    """A tight pool (preemptions, evictions, cache hits of preempted requests) gives the tokens of a roomy one.
    The bug this pins: a hit block of the full group, unreferenced in the free queue, was handed out as the sliding
    group's fresh block of the same admission (KVCacheManager.allocate_slots), so the new tokens overwrote the
    cached prefix's keys/values (3 to 8 of these 12 requests changed tokens)."""
    rng = random.Random(2)
    requests = [([rng.randrange(VOCAB - 1) for _ in range(rng.randrange(16, 48))],
                 SamplingParams(max_tokens=20, **GREEDY)) for _ in range(12)]
    roomy = Engine.from_model(model, EngineConfig(num_blocks=400, block_size=block_size, async_scheduling=False))
    expected = [r.token_ids for r in roomy.generate(requests)]
    engine = Engine.from_model(model, EngineConfig(num_blocks=20, block_size=block_size, max_num_batched_tokens=64,
                                                   async_scheduling=async_scheduling))
    results = engine.generate(requests)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0 and engine.kv.pool.num_evictions > 0
    assert [r.token_ids for r in results] == expected
    engine.kv.check()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_abort_on_the_last_step_reports_aborted_and_frees(model):
    executor = HookExecutor(model)
    # the serial loop: step 2's tokens are processed before step 3 runs, so the abort falls after exactly two. Under
    # async scheduling they are processed while step 3 runs, and an abort then may also drop step 2's token
    # (tests/test_async_scheduling.py covers aborts there).
    engine = Engine(executor, model.config, EngineConfig(num_blocks=100, async_scheduling=False))
    rid = engine.submit(ids(30, seed=5), SamplingParams(max_tokens=3, **GREEDY), request_id="job")
    other = engine.submit(ids(20, seed=6), SamplingParams(max_tokens=6, **GREEDY))
    executor.hook = lambda step: engine.abort("job") if step == 3 else None  # step 3 samples job's last token
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    job = [o for o in outputs if o.request_id == rid]
    assert [len(o.new_token_ids) for o in job] == [1, 1, 0]
    assert job[-1].finished and job[-1].finish_reason == "aborted" and job[-1].usage.completion_tokens == 2
    assert [o for o in outputs if o.request_id == other][-1].finish_reason == "length"
    assert engine.stats().kv_blocks_free == 100 and engine.stats().num_aborted == 1
    engine.kv.check()
    # the id is free again once its request ended
    executor.hook = None
    again = engine.generate([(ids(30, seed=5), SamplingParams(max_tokens=3, **GREEDY))])[0]
    engine.submit(ids(30, seed=5), SamplingParams(max_tokens=3, **GREEDY), request_id="job")
    with pytest.raises(ValueError, match="already in use"):
        engine.submit(ids(4, seed=1), SamplingParams(max_tokens=1), request_id="job")
    final = [o for _ in range(5) for o in engine.step() if o.finished]
    assert final[0].request_id == "job" and final[0].finish_reason == "length"
    assert again.token_ids == reference_greedy(model, ids(30, seed=5), 3)
    assert not engine.abort("job") and not engine.abort("never-existed")


class RandomExecutor(Executor):
    """No model: random logits, and a check that no two tokens of a step write the same KV slot."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(0)

    def kv_block_bytes(self, layout):
        return 1

    def available_kv_memory(self):
        return 1 << 30

    def initialize_cache(self, layout, num_blocks):
        self.num_blocks, self.block_size = num_blocks, layout.block_size

    def execute(self, plan, bitmask=None):
        return sample_step(self.forward_logits(plan), plan, bitmask).to_host()

    def forward_logits(self, plan):
        for slots in plan.slot_mappings:
            assert slots.unique().numel() == slots.numel()
            assert int(slots.max()) < self.num_blocks * self.block_size
        return torch.randn(plan.logits_indices.shape[0], self.vocab, generator=self.gen)


def test_a_thousand_random_aborts_leak_nothing():
    config = ModelConfig.preset("tiny", num_hidden_layers=4, vocab_size=512, eos_token_id=511, pad_token_id=510)
    engine = Engine(RandomExecutor(512), config,
                    EngineConfig(num_blocks=48, max_num_batched_tokens=96, max_num_seqs=40))
    rng = random.Random(0)
    prefixes = [[rng.randrange(500) for _ in range(rng.randrange(10, 200))] for _ in range(5)]
    live: dict[str, int] = {}  # request id -> the step at which it gets aborted
    submitted = aborted = step = 0
    statuses = set()
    while submitted < 1000 or live:
        while submitted < 1000 and len(live) < 40:
            prompt = rng.choice(prefixes)[: rng.randrange(1, 200)] + [rng.randrange(500)] * rng.randrange(0, 30)
            rid = f"r{submitted % 50}"  # ids are reused once their request has ended
            if rid in live:
                break
            engine.submit(prompt, SamplingParams(max_tokens=rng.randrange(1, 120), ignore_eos=True), request_id=rid)
            live[rid] = step + rng.randrange(0, 25)
            submitted += 1
        for out in engine.step():
            if out.finished and out.finish_reason != "aborted":  # (an abort's own delta comes a step later)
                live.pop(out.request_id, None)
        step += 1
        for rid, when in list(live.items()):
            if when <= step:
                statuses.add(engine.requests[rid].status)
                assert engine.abort(rid)
                del live[rid]
                aborted += 1
        if step % 50 == 0:
            engine.kv.check()
    assert aborted >= 700  # most end by abort, at every stage of their life
    assert {RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED} <= statuses
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.num_aborted + stats.num_finished == 1000
    engine.kv.check()
    pool = engine.kv.pool
    assert pool.num_free == pool.num_blocks == 48 and all(b.ref_cnt == 0 for b in pool.blocks)
    assert sorted(pool.free) == list(range(48)) and not engine.requests and not engine.kv._tables


def test_seeded_request_is_the_same_alone_and_in_a_busy_batch(model):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, seed=1234, max_tokens=8, ignore_eos=True)
    prompt = ids(70, seed=9)
    alone = Engine.from_model(model, EngineConfig(num_blocks=100)).generate([(prompt, seeded)])[0]
    busy_engine = Engine.from_model(model, EngineConfig(num_blocks=60, max_num_batched_tokens=48, seed=7))
    others = [(ids(n, seed=20 + n), SamplingParams(temperature=t, max_tokens=m, ignore_eos=True, seed=s))
              for n, t, m, s in [(90, 1.0, 9, None), (12, 0, 12, None), (150, 0.7, 5, 99), (33, 1.2, 7, None)]]
    results = busy_engine.generate(others[:2] + [(prompt, seeded)] + others[2:])
    assert results[2].token_ids == alone.token_ids
    assert len(set(alone.token_ids)) > 1


def test_invalid_requests_are_refused_and_the_rest_keep_running(model):
    engine = Engine.from_model(model, EngineConfig(num_blocks=100, max_model_len=1024))
    good = [ids(40, seed=1), ids(8, seed=2)]
    for i, p in enumerate(good):
        engine.submit(p, SamplingParams(max_tokens=6, **GREEDY), request_id=f"good{i}")
    done = {}
    for out in engine.step():
        done.setdefault(out.request_id, []).extend(out.new_token_ids)
    bad_params = [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"max_tokens": -1},
                  {"min_p": 2}, {"presence_penalty": 3}, {"repetition_penalty": 0}, {"logprobs": 100},
                  {"seed": "x"}, {"stop_token_ids": [-1]}, {"min_tokens": 9, "max_tokens": 2}, {"bogus": 1}]
    for bad in bad_params:
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            engine.submit(ids(5, seed=3), bad)
    for prompt, message in [([], "empty"), ([1, VOCAB], "outside the vocabulary"), ("text", "token ids"),
                            (ids(1020, seed=4), "exceed the context")]:
        with pytest.raises(ValueError, match=message):
            engine.submit(prompt, SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="stop token id"):
        engine.submit([1, 2], SamplingParams(stop_token_ids=[VOCAB + 5]))
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.submit([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.submit(ids(900, seed=5), SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="already in use"):
        engine.submit([1, 2], SamplingParams(), request_id="good0")
    while engine.has_unfinished_requests():
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert set(done) == {"good0", "good1"}
    for i, p in enumerate(good):
        assert done[f"good{i}"] == reference_greedy(model, p, 6)


def test_streaming_deltas_abort_and_concurrent_requests(model):
    engine = Engine.from_model(model, EngineConfig(num_blocks=100))
    prompts = [ids(20, seed=30), ids(45, seed=31)]

    async def consume(stream, abort_after=None):
        deltas = []
        async for delta in stream:
            deltas.append(delta)
            if abort_after is not None and len(deltas) == abort_after:
                stream.abort()
        return deltas

    async def main():
        a = engine.add_request(prompts[0], SamplingParams(max_tokens=5, logprobs=2, **GREEDY), "a")
        b = engine.add_request(prompts[1], SamplingParams(max_tokens=50, **GREEDY), "b")
        got = await asyncio.wait_for(asyncio.gather(consume(a), consume(b, abort_after=3)), timeout=120)
        assert engine.stats().num_running == 0
        await engine.shutdown()
        return got

    a, b = asyncio.run(main())
    assert [t for d in a for t in d.new_token_ids] == reference_greedy(model, prompts[0], 5)
    assert a[-1].finished and a[-1].finish_reason == "length" and a[-1].usage.completion_tokens == 5
    assert all(len(d.logprobs) == 1 and len(d.logprobs[0].top) == 2 for d in a)
    assert all(d.logprobs[0].top[0][0] == d.new_token_ids[0] for d in a)  # greedy: the sampled token is the top
    assert b[-1].finish_reason == "aborted" and len(b) == 4 and not any(d.finished for d in b[:-1])
    assert engine.stats().kv_blocks_free == 100
    with pytest.raises(RuntimeError, match="event loop"):
        engine.add_request([1, 2], SamplingParams())


def test_abort_from_another_thread_while_a_step_runs(model):
    executor = HookExecutor(model)
    engine = Engine(executor, model.config, EngineConfig(num_blocks=100))
    started, release = threading.Event(), threading.Event()

    def hook(step):
        if step == 2:
            started.set()
            release.wait(timeout=30)

    executor.hook = hook

    async def main():
        stream = engine.add_request(ids(10, seed=40), SamplingParams(max_tokens=20, **GREEDY), "x")
        deltas = []
        first_token = asyncio.Event()

        async def abort_mid_step():
            await asyncio.to_thread(started.wait, 30)
            # step 1's token is delivered while step 2 runs (async scheduling processes step N during step N + 1):
            # wait for it, so that the abort falls while step 2 executes and after exactly one token
            await asyncio.wait_for(first_token.wait(), 30)
            assert engine.abort("x")  # the step is still executing in the engine's worker thread
            assert engine.kv.num_free_blocks == 100  # blocks are back at once
            release.set()

        aborter = asyncio.create_task(abort_mid_step())
        async for delta in stream:
            deltas.append(delta)
            if delta.new_token_ids:
                first_token.set()
        await aborter
        await engine.shutdown()
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason == "aborted" and sum(len(d.new_token_ids) for d in deltas) == 1
    engine.kv.check()


def test_stop_tokens_strings_min_tokens_and_eos(model):
    from gptoss_cluster.workers.harmony import get_tokenizer

    tokenizer = get_tokenizer()
    engine = Engine.from_model(model, EngineConfig(num_blocks=100), tokenizer=tokenizer)
    prompt = ids(25, seed=50)
    free_run = engine.generate([(prompt, SamplingParams(max_tokens=12, **GREEDY))])[0]
    tokens = free_run.token_ids
    assert free_run.text == tokenizer.decode(tokens)
    stop_id = tokens[4]
    first = tokens.index(stop_id)
    by_id = engine.generate([(prompt, SamplingParams(max_tokens=12, stop_token_ids=[stop_id], **GREEDY))])[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id and by_id.token_ids == tokens[:first + 1]
    assert by_id.text == tokenizer.decode(tokens[:first])  # the stop token is not text
    by_eos = engine.generate([(prompt, SamplingParams(max_tokens=12, temperature=0))], eos_token_ids=[stop_id])[0]
    assert by_eos.token_ids == by_id.token_ids
    late = engine.generate([(prompt, SamplingParams(max_tokens=12, min_tokens=first + 1, stop_token_ids=[stop_id],
                                                    **GREEDY))])[0]
    assert stop_id not in late.token_ids[:first + 1] and len(late.token_ids) > first + 1
    text = free_run.text
    stop_text = text[len(text) // 2:len(text) // 2 + 3]
    cut = engine.generate([(prompt, SamplingParams(max_tokens=12, stop=[stop_text], **GREEDY))])[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_text
    assert cut.text == text[:text.index(stop_text)]
    kept = engine.generate([(prompt, SamplingParams(max_tokens=12, stop=stop_text, include_stop_str_in_output=True,
                                                    **GREEDY))])[0]
    assert kept.text == text[:text.index(stop_text) + len(stop_text)]

    async def streamed():
        chunks = []
        async for d in engine.add_request(prompt, SamplingParams(max_tokens=12, stop=[stop_text], **GREEDY)):
            chunks.append(d.text)
        await engine.shutdown()
        return chunks

    assert "".join(asyncio.run(streamed())) == cut.text  # held-back text never leaks a partial stop string


def test_statistics_and_expert_counts(model):
    engine = Engine.from_model(model, EngineConfig(num_blocks=100, max_num_batched_tokens=32))
    engine.generate([(ids(50, seed=60), SamplingParams(max_tokens=4, **GREEDY)),
                     (ids(10, seed=61), SamplingParams(max_tokens=4, **GREEDY))])
    stats = engine.stats()
    computed = 50 + 10 + 2 * 3  # prompts, then every generated token but the last is fed back
    assert stats.num_prefill_tokens + stats.num_decode_tokens - 2 == computed
    assert stats.num_decode_tokens == 8 and stats.num_finished == 2
    assert stats.num_steps >= 3 and stats.mean_tokens_per_step == pytest.approx(computed / stats.num_steps)
    assert stats.kv_capacity_tokens == 1600 and stats.kv_usage == 0.0 and stats.prefix_cache_queries == 60
    counts = stats.expert_counts
    assert counts.shape == (2, 8) and counts.dtype == torch.int64
    assert counts.sum(dim=1).tolist() == [computed * model.config.experts_per_token] * 2
    assert 0 < stats.overhead_fraction < 1
    assert engine.num_kv_blocks == 100


def test_dequantize_once_moe_is_bit_identical(model):
    from gptoss_cluster.kernels.reference import moe_experts
    from gptoss_cluster.workers.engine.experts import DequantizedMoE

    mlp = model.mlp[0]
    g = torch.Generator().manual_seed(70)
    x = torch.randn(37, model.config.hidden_size, generator=g)
    weights, experts = torch.softmax(torch.randn(37, 4, generator=g), -1), torch.randint(0, 8, (37, 4), generator=g)
    args = (x, weights, experts, mlp.gate_up_blocks, mlp.gate_up_scales, mlp.gate_up_bias, mlp.down_blocks,
            mlp.down_scales, mlp.down_bias, 7.0, 1.702)
    cached = DequantizedMoE()
    assert torch.equal(cached(*args), moe_experts(*args))
    assert torch.equal(cached(*args, first_expert=4), moe_experts(*args, first_expert=4))  # an expert-parallel rank
    assert len(cached._cache) == 2  # gate_up and down, dequantized once


def test_kv_capacity_from_a_memory_fraction():
    config = ModelConfig.preset("tiny", num_hidden_layers=2, vocab_size=512, eos_token_id=511, pad_token_id=510)

    class Sized(RandomExecutor):
        def kv_block_bytes(self, layout):
            return 1024

        def available_kv_memory(self):
            return 1 << 20

    engine = Engine(Sized(512), config, EngineConfig(kv_memory_fraction=0.25))
    assert engine.num_kv_blocks == 256 and engine.stats().kv_capacity_tokens == 256 * 16
    with pytest.raises(ValueError, match="holds no KV block"):
        Engine(Sized(512), config, EngineConfig(kv_memory_fraction=1e-6))
    with pytest.raises(ValueError, match="kv_memory_fraction"):
        EngineConfig(kv_memory_fraction=1.5)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="lifo")


# ---------------------------------------------------------------------------------------------------- sampling
class FixedLogitsExecutor(RandomExecutor):
    """No model: a row's logits are a fixed function of the token it was fed (its context's last token), so a
    request's logits do not depend on what runs beside it, and its tokens differ only by its draws."""

    def forward_logits(self, plan):
        super().forward_logits(plan)  # the KV slot checks
        rows = [torch.randn(self.vocab, generator=torch.Generator().manual_seed(t)) * 2
                for t in plan.token_ids[plan.logits_indices].tolist()]
        return torch.stack(rows) if rows else torch.zeros(0, self.vocab)


def test_with_fixed_logits_a_seeded_row_draws_the_same_tokens_alone_and_in_a_busy_batch():
    config = ModelConfig.preset("tiny", num_hidden_layers=2, vocab_size=512, eos_token_id=511, pad_token_id=510)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    prompt = list(range(40, 75))
    alone = Engine(FixedLogitsExecutor(512), config, EngineConfig(num_blocks=64)).generate([(prompt, seeded)])[0]
    others = [(list(range(n, 2 * n)), SamplingParams(max_tokens=m, ignore_eos=True, **extra)) for n, m, extra in [
        (90, 30, dict(temperature=1.0)), (12, 9, dict(temperature=0, logprobs=3)),
        (150, 20, dict(temperature=0.7, seed=99, repetition_penalty=1.2)),
        (33, 26, dict(temperature=1.2, top_k=5, min_p=0.1, frequency_penalty=0.5, logprobs=2)),
        (20, 18, dict(temperature=0.5, seed=1234))]]  # the same seed in another request: its own stream
    busy = Engine(FixedLogitsExecutor(512), config, EngineConfig(num_blocks=64, max_num_batched_tokens=40, seed=9))
    results = busy.generate(others[:2] + [(prompt, seeded)] + others[2:])
    assert results[2].token_ids == alone.token_ids and len(set(alone.token_ids)) > 5


def test_mixed_batch_gives_the_tokens_and_logprobs_of_the_previous_engine(model):
    """The engine with sampling on the executor against the engine as it was (tests/sampler_oracle.py: the full
    logits back to the engine, its old host sampler): the same tokens, stops and logprobs, in one mixed batch."""
    from tests.sampler_oracle import OracleEngine, assert_same_results

    prompt = ids(30, seed=80)
    free = reference_greedy(model, prompt, 8)
    stop = free[3]
    requests = [
        (prompt, SamplingParams(max_tokens=8, **GREEDY)),
        (prompt, SamplingParams(max_tokens=8, stop_token_ids=[stop], temperature=0)),
        (prompt, SamplingParams(max_tokens=10, min_tokens=6, stop_token_ids=[stop], temperature=0)),
        (ids(50, seed=81), SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=7, logprobs=5,
                                          ignore_eos=True)),
        (ids(17, seed=82), SamplingParams(max_tokens=7, temperature=1.1, top_k=50, min_p=0.02, ignore_eos=True)),
        (ids(64, seed=83), SamplingParams(max_tokens=9, temperature=0.7, seed=11, repetition_penalty=1.3,
                                          frequency_penalty=0.5, presence_penalty=0.3, ignore_eos=True)),
        (ids(9, seed=84), SamplingParams(max_tokens=6, repetition_penalty=0.8, presence_penalty=-1.0, logprobs=0,
                                         **GREEDY)),
        (ids(40, seed=85), SamplingParams(max_tokens=8, logprobs=5, **GREEDY)),
    ]
    config = EngineConfig(num_blocks=200, max_num_batched_tokens=64, seed=3)
    new = Engine.from_model(model, config).generate(requests)
    old = OracleEngine(LocalExecutor(model), model.config, config).generate(requests)
    assert_same_results(new, old, "G=1")
    assert new[1].finish_reason == "stop" and new[1].token_ids == free[:free.index(stop) + 1]
    assert new[2].token_ids[:6].count(stop) == 0 and new[3].logprobs and len(new[3].logprobs[0].top) == 5


@pytest.mark.parametrize("kernels_name", ["triton", "stand-ins"])
def test_a_step_reads_nothing_back_from_the_device_until_its_tokens(kernels_name):
    """LocalExecutor.run_step (forward with expert counting, then the sampler) on a model on the meta device: any
    read-back (.cpu(), .item(), .tolist(), a boolean mask, bincount's data-sized output) raises there. With the
    Triton kernels (what runs on GPUs) their host wrappers run and the launches are recorded, not run; with
    stand-ins for paged attention and the MoE (the torch references read the data on purpose: they are the CPU
    path), without triton."""
    import contextlib
    import dataclasses

    from gptoss_cluster.kernels.dispatch import TORCH_KERNELS
    from gptoss_cluster.workers.engine import KVCacheLayout

    config = ModelConfig.preset("tiny", num_hidden_layers=2, vocab_size=512, eos_token_id=511, pad_token_id=510)
    recording = contextlib.nullcontext([])
    if kernels_name == "triton":
        pytest.importorskip("triton")
        from gptoss_cluster.kernels import dispatch
        from gptoss_cluster.kernels.triton import record_launches

        kernels, recording = dispatch.TRITON_KERNELS, record_launches()
    else:
        kernels = dataclasses.replace(TORCH_KERNELS, paged_attention=lambda q, *args: torch.empty_like(q),
                                      moe_experts=lambda x, weights, *args: x * weights.sum(-1, keepdim=True))
    with torch.device("meta"):
        meta_model = GptOssModel(config, torch.float32, kernels=kernels)
    executor = LocalExecutor(meta_model, count_expert_tokens=True, dequantize_experts=False)

    class Capture(RandomExecutor):
        plans = []

        def execute(self, plan, bitmask=None):
            self.plans.append(plan)
            return super().execute(plan, bitmask)

    capture = Capture(512)
    engine = Engine(capture, config, EngineConfig(num_blocks=32, max_num_batched_tokens=40))
    engine.generate([(list(range(1, 60)), SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, top_k=7,
                                                         min_p=0.1, seed=1, logprobs=2, ignore_eos=True)),
                     (list(range(5, 20)), SamplingParams(max_tokens=4, repetition_penalty=1.1, min_tokens=3,
                                                         **GREEDY))])
    executor.initialize_cache(KVCacheLayout.from_model_config(config, 16), 32)
    assert len(capture.plans) >= 4
    with recording as launches:
        for plan in capture.plans:
            out = executor.run_step(plan)
            assert out.token_ids.device.type == "meta" and out.token_ids.shape == (plan.num_sampled,)
    assert executor.model.expert_counts.device.type == "meta"
    assert (len(launches) > 0) == (kernels_name == "triton")
