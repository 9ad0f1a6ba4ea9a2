"""Async scheduling (issue 13.3): the engine schedules step N + 1 while step N runs and processes step N's tokens
while step N + 1 runs; the serial loop (EngineConfig(async_scheduling=False)) stays for debugging. Both give the
same tokens and logprobs (greedy and seeded rows, stop tokens, max_tokens ends, penalties, min_tokens); aborts,
preemption and a request finishing while its next step is in flight stay correct.

Behind Ray (G = 1 and 2: RayExecutor.submit sends step N + 1 before step N's tokens are back, the shards fill its
placeholder rows): async and serial give the same tokens, and steps do go out ahead; preemption and abort; a shard
that fails a step fails the step behind it with the same ShardFailure, and a shard killed mid-run fails the run at
once. The mixed batch with a constrained row at G = 2 and 4: tests/test_parallel (check_mixed_batch runs async,
serial and the oracle)."""

from __future__ import annotations

import random
from dataclasses import replace as dataclasses_replace

import pytest
import torch

from gptoss_cluster.workers.engine import Engine, EngineConfig, LocalExecutor
from gptoss_cluster.workers.sampling import SamplingParams
from tests.helpers import ForwardingExecutor
from tests.sampler_oracle import assert_same_results

VOCAB = 4096
EOS = 4095


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(small_model):
    return small_model


class CountingExecutor(ForwardingExecutor):
    """A LocalExecutor that counts the steps and the sampled rows it ran."""

    def __init__(self, model):
        super().__init__(LocalExecutor(model))
        self.steps = 0
        self.rows = 0

    def execute(self, plan, bitmask=None):
        self.steps += 1
        self.rows += plan.num_sampled
        return self.inner.execute(plan, bitmask)


def workload(n: int, seed: int) -> list[tuple]:
    """W, small: prompts and outputs of random exact lengths; greedy and seeded top-p rows (some with logprobs),
    stop tokens (the EOS of a tiny random model is rare: stop on frequent tokens instead), penalties, min_tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(VOCAB - 1) for _ in range(rng.randrange(16, 48))]
        kind = i % 5
        extra = {}
        if kind == 1:
            extra = dict(temperature=0.9, top_p=0.9, seed=100 + i, logprobs=3)
        elif kind == 2:
            extra = dict(temperature=0, stop_token_ids=[rng.randrange(VOCAB - 1) for _ in range(200)])
        elif kind == 3:
            extra = dict(temperature=0.8, seed=200 + i, repetition_penalty=1.2, presence_penalty=0.5)
        elif kind == 4:
            extra = dict(temperature=0, min_tokens=4, stop_token_ids=[rng.randrange(VOCAB - 1) for _ in range(300)],
                         logprobs=0)
        else:
            extra = dict(temperature=0)
        out.append((prompt, SamplingParams(max_tokens=rng.randrange(4, 24), ignore_eos=True, **extra)))
    return out


def run(model, requests, **config):
    executor = CountingExecutor(model)
    engine = Engine(executor, model.config, EngineConfig(**config))
    results = engine.generate(requests)
    engine.kv.check()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.requests
    return results, engine, executor


def test_async_gives_the_serial_tokens_and_logprobs(model):
    requests = workload(16, seed=1)
    config = dict(num_blocks=400, max_num_batched_tokens=128, max_num_seqs=8, seed=3)
    serial, serial_engine, serial_exec = run(model, requests, async_scheduling=False, **config)
    overlapped, engine, async_exec = run(model, requests, async_scheduling=True, **config)
    assert_same_results(overlapped, serial, "async vs serial")
    assert {r.finish_reason for r in serial} == {"stop", "length"}
    # the async loop ran rows the serial one did not (computed for requests that stopped meanwhile, dropped)
    assert async_exec.rows > serial_exec.rows
    assert engine.stats().num_finished == len(requests)
    for stats in (engine.stats(), serial_engine.stats()):
        assert stats.time_execute_s > 0 and stats.num_steps > 0


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-caching", "no-caching"])
def test_preemption_under_async(model, caching):
    requests = [(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)) for p, _ in workload(8, seed=2)]
    requests += [(p, SamplingParams(max_tokens=20, temperature=0.9, seed=i, ignore_eos=True))
                 for i, (p, _) in enumerate(workload(4, seed=3))]
    roomy, _, _ = run(model, requests, num_blocks=400, async_scheduling=False)
    # (with caching on this needs the fix of KVCacheManager.allocate_slots: every hit block is taken before any
    # fresh block is allocated; tests/test_engine.py::test_preemption_with_prefix_caching_keeps_the_greedy_tokens)
    tight = dict(num_blocks=20, block_size=8, max_num_batched_tokens=64, enable_prefix_caching=caching)
    overlapped, engine, _ = run(model, requests, **tight)
    assert engine.stats().num_preemptions > 0
    assert (engine.stats().prefix_cache_hits > 0) == caching
    assert_same_results(overlapped, roomy, "preempted async vs roomy serial")


def test_abort_under_async(model):
    requests = workload(6, seed=4)
    serial, _, _ = run(model, requests, async_scheduling=False, num_blocks=200)
    check_abort_midway(Engine(CountingExecutor(model), model.config, EngineConfig(num_blocks=200)), requests, serial)


def check_abort_midway(engine: Engine, requests: list[tuple], serial: list) -> None:
    """Abort request r1 while the step that computes its next token is in flight: that row is dropped, its blocks
    come back, and every other request gets the serial loop's tokens (`serial`)."""
    ids = [engine.submit(p, params, request_id=f"r{i}") for i, (p, params) in enumerate(requests)]
    outputs = []
    for _ in range(4):
        outputs += engine.step()
    assert engine._inflight is not None and "r1" in engine.requests
    assert engine.abort("r1")  # its row in the step in flight is dropped, its blocks are back
    while engine.has_unfinished_requests():
        outputs += engine.step()
    outputs += engine.step()  # the last step in flight: nothing of it is delivered for r1
    by_id = {i: [o for o in outputs if o.request_id == i] for i in ids}
    r1 = by_id["r1"]
    assert r1[-1].finish_reason == "aborted" and sum(o.finished for o in r1) == 1
    tokens = [t for o in r1 for t in o.new_token_ids]
    assert tokens == serial[1].token_ids[:len(tokens)] and r1[-1].usage.completion_tokens == len(tokens)
    for i, rid in enumerate(ids):
        if rid != "r1":
            assert [t for o in by_id[rid] for t in o.new_token_ids] == serial[i].token_ids
    engine.kv.check()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_request_stopping_while_its_next_step_is_in_flight(model):
    """The stop token arrives with step N; step N + 1 already computed a row for it: that token is dropped, the
    request ends exactly at its stop token and its blocks come back."""
    prompt = workload(1, seed=5)[0][0]
    free = run(model, [(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))],
               async_scheduling=False, num_blocks=50)[0][0].token_ids
    stop = free[4]
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop])
    want = free[:free.index(stop) + 1]
    result, engine, executor = run(model, [(prompt, params)], num_blocks=50)
    assert result[0].token_ids == want and result[0].finish_reason == "stop" and result[0].stop_reason == stop
    assert executor.rows == len(want) + 1  # the dropped row of the step in flight
    serial, _, serial_exec = run(model, [(prompt, params)], num_blocks=50, async_scheduling=False)
    assert serial[0].token_ids == want and serial_exec.rows == len(want)
    # a max_tokens end is known at schedule time: no row after the last token
    _, _, executor = run(model, [(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))],
                         num_blocks=50)
    assert executor.rows == 5


# ---------------------------------------------------------------------------------------------------- behind Ray
# RayExecutor.submit sends step N + 1 before step N's tokens are back; the shards fill its placeholder rows from the
# tokens they sampled (rank 0 sends them to rank 1 at G = 2). One local Ray for all of these (Ray starts are slow).
RAY_FAST = dict(collective_timeout_s=10.0, step_timeout_s=60.0, start_timeout_s=120.0, placement_timeout_s=30.0,
                torch_threads=1)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """The `small_model` fixture's checkpoint (the same config and seed), for the shard actors to read."""
    from gptoss_cluster.workers.checkpoint import write_checkpoint
    from gptoss_cluster.workers.config import ModelConfig

    config = ModelConfig.preset("tiny", num_hidden_layers=2, vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=EOS - 1)
    return write_checkpoint(config, tmp_path_factory.mktemp("ckpt") / "tiny2", progress=False)


@pytest.fixture(scope="module")
def ray_executors(small_checkpoint):
    """{G: RayExecutor} for G = 1 and 2 on one local Ray (loopback), shut down with the module."""
    ray = pytest.importorskip("ray")
    from gptoss_cluster.workers.engine.ray_executor import RayExecutor, connect_ray

    assert not ray.is_initialized(), "another test left Ray running"
    assert connect_ray(num_cpus=4)
    executors = {}
    try:
        for g in (1, 2):
            executors[g] = RayExecutor(small_checkpoint, g, "float32", "cpu", **RAY_FAST)
        yield executors
    finally:
        for executor in executors.values():
            executor.shutdown()
        ray.shutdown()


class SendLog:
    """Watches a RayExecutor's calls to its shards: how many steps with placeholder rows it sent while the step sent
    just before had not come back from every shard yet (0 if each step waited for the one before it)."""

    def __init__(self, executor, monkeypatch) -> None:
        import ray

        self.filled = self.sent_ahead = 0
        previous: list = []
        send = executor._send

        def logged_send(plan, bitmask):
            if plan.fill_rows is not None:
                self.filled += 1
                ready, _ = ray.wait(previous, num_returns=len(previous), timeout=0)
                self.sent_ahead += len(ready) < len(previous)
            previous[:] = send(plan, bitmask)
            return list(previous)

        monkeypatch.setattr(executor, "_send", logged_send)


def run_on(executor, requests, **config):
    engine = Engine(executor, executor.model_config, EngineConfig(**config))
    results = engine.generate(requests)
    engine.kv.check()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.requests
    return results, engine


def pipelined_workload(n: int, seed: int) -> list[tuple]:
    """The rows that never wait for the step before them on the host (no penalties, no min_tokens)."""
    return [(p, s) for p, s in workload(n, seed) if not s.has_penalties and not s.min_tokens]


@pytest.mark.parametrize("g", [1, 2])
def test_async_over_ray_gives_the_serial_tokens(ray_executors, model, g, monkeypatch):
    executor = ray_executors[g]
    config = dict(num_blocks=400, max_num_batched_tokens=128, max_num_seqs=8, seed=3)
    for requests in (workload(16, seed=1), pipelined_workload(20, seed=6)):
        serial, _ = run_on(executor, requests, async_scheduling=False, **config)
        log = SendLog(executor, monkeypatch)
        overlapped, engine = run_on(executor, requests, async_scheduling=True, **config)
        monkeypatch.undo()
        assert_same_results(overlapped, serial, f"G={g}: async vs serial")
        assert engine.stats().num_finished == len(requests)
        assert log.filled > 0 and log.sent_ahead > 0, vars(log)  # steps went out before the one ahead came back
    if g == 2:  # greedy rows: the in-process engine's tokens (seeded rows may differ in the last float bits)
        local, _, _ = run(model, requests, async_scheduling=False, **config)
        greedy = [k for k, (_, params) in enumerate(requests) if params.temperature == 0]
        assert greedy and [overlapped[k].token_ids for k in greedy] == [local[k].token_ids for k in greedy]


def test_abort_and_preemption_under_async_over_ray(ray_executors):
    executor = ray_executors[2]
    # preemption: a tight pool against a roomy one (serial), both behind Ray
    requests = [(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)) for p, _ in workload(8, seed=2)]
    requests += [(p, SamplingParams(max_tokens=20, temperature=0.9, seed=i, ignore_eos=True))
                 for i, (p, _) in enumerate(workload(4, seed=3))]
    roomy, _ = run_on(executor, requests, num_blocks=400, async_scheduling=False)
    tight, engine = run_on(executor, requests, num_blocks=20, block_size=8, max_num_batched_tokens=64)
    assert engine.stats().num_preemptions > 0
    assert_same_results(tight, roomy, "preempted async vs roomy serial, G=2")
    # abort: the aborted request's row in the step in flight is dropped, the others are untouched
    requests = pipelined_workload(8, seed=4)
    serial, _ = run_on(executor, requests, async_scheduling=False, num_blocks=200)
    check_abort_midway(Engine(executor, executor.model_config, EngineConfig(num_blocks=200)), requests, serial)


def test_a_shard_failing_under_the_pipelined_path(ray_executors, monkeypatch):
    """A step a shard fails (here: placeholder rows that point past the tokens it sampled) fails the executor with
    ShardFailure naming the shard, and the step sent behind it fails with the same diagnosis; then a killed shard
    in the middle of an async run fails the run within seconds, with nothing left waiting."""
    import time

    import ray

    from gptoss_cluster.workers.engine.ray_executor import ShardFailure

    executor = ray_executors[1]
    engine = Engine(executor, executor.model_config, EngineConfig(num_blocks=50))
    engine.submit(list(range(10, 30)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    plan, _ = engine._build_plan(engine.scheduler.schedule())
    first = executor.submit(dataclasses_replace(plan))
    bad = dataclasses_replace(plan, fill_rows=torch.tensor([0]), fill_from=torch.tensor([7]))  # 1 row sampled
    failing = executor.submit(bad)
    behind = executor.submit(dataclasses_replace(plan))
    assert first.result(timeout=60).token_ids.shape == (1,)
    with pytest.raises(ShardFailure, match=r"shard 0 of 1 failed while running a step: IndexError"):
        failing.result(timeout=60)
    with pytest.raises(ShardFailure, match=r"shards are gone: shard 0 of 1 failed while running a step"):
        behind.result(timeout=60)
    assert executor.workers == []

    executor = ray_executors[2]
    futures = []
    submit = executor.submit
    monkeypatch.setattr(executor, "submit", lambda *a: futures.append(submit(*a)) or futures[-1])
    engine = Engine(executor, executor.model_config, EngineConfig(num_blocks=200))
    for i, (p, params) in enumerate(pipelined_workload(8, seed=7)):
        engine.submit(p, params, request_id=f"r{i}")
    for _ in range(3):
        engine.step()
    assert engine._inflight is not None
    ray.kill(executor.workers[1], no_restart=True)
    start = time.monotonic()
    with pytest.raises(ShardFailure, match=r"shard 1 of 2 died"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 30
    assert engine._inflight is None and all(r.num_pending_tokens == 0 for r in engine.requests.values())
    assert all(f.done() for f in futures)
    failed = [f.exception() for f in futures if f.exception() is not None]
    assert failed and all(isinstance(e, ShardFailure) and "shard 1 of 2 died" in str(e) for e in failed), failed
    with pytest.raises(ShardFailure, match="shard 1 of 2 died"):
        executor.submit(None)  # refused at once, nothing sent: the shards are gone
    assert executor.workers == []
