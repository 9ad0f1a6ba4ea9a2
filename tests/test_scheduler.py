"""The scheduler without a model: token budget, max running, chunked prefill, preemption, admission checks, order."""

import pytest

from gptoss_cluster.workers.config import ModelConfig
from gptoss_cluster.workers.engine.config import EngineConfig
from gptoss_cluster.workers.engine.kv_cache import KVCacheLayout, KVCacheManager
from gptoss_cluster.workers.engine.request import Request, RequestStatus
from gptoss_cluster.workers.engine.scheduler import Scheduler
from gptoss_cluster.workers.sampling import SamplingParams

CFG = ModelConfig.preset("tiny", num_hidden_layers=2)


def make_scheduler(num_blocks=256, **overrides):
    config = EngineConfig(num_blocks=num_blocks, **overrides)
    kv = KVCacheManager(KVCacheLayout.from_model_config(CFG, config.block_size), num_blocks,
                        config.enable_prefix_caching)
    return Scheduler(config, kv, max_model_len=4096)


def req(rid, n, max_tokens=8, priority=0, t=None, first=0):
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   priority=priority, arrival_time=t)


def run_step(s):
    """Schedule, pretend the model ran, append a token to each sampling request, finish at max_tokens."""
    out = s.schedule()
    for item in out.scheduled:
        r = item.request
        r.num_computed_tokens = item.start + item.num_new_tokens
        if item.samples:
            r.token_ids.append(1)
            s.kv.register_computed(r)
            if r.num_output_tokens >= r.params.max_tokens:
                s.finish(r, RequestStatus.FINISHED_LENGTH)
        else:
            s.kv.register_computed(r)
    return out


def test_budget_mixes_decodes_with_prefill_chunks():
    s = make_scheduler(max_num_batched_tokens=64)
    s.add(req("a", 10, t=0))
    out = run_step(s)
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 10)]
    s.add(req("b", 100, t=1, first=500))
    s.add(req("c", 5, t=2, first=900))
    out = run_step(s)  # a decodes (1), b takes the remaining 63 of the budget, c waits
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 63)]
    assert not out.scheduled[1].samples
    out = run_step(s)  # running first: a (1), b's last 37 (samples), then c (5)
    assert [(i.request.request_id, i.num_new_tokens, i.start) for i in out.scheduled] == [
        ("a", 1, 11), ("b", 37, 63), ("c", 5, 0)]
    assert all(i.samples for i in out.scheduled)
    assert out.num_batched_tokens == 43


def test_chunked_prefill_off_runs_prompts_whole():
    s = make_scheduler(max_num_batched_tokens=64, enable_chunked_prefill=False)
    s.add(req("a", 10, t=0))
    run_step(s)
    s.add(req("b", 60, t=1, first=500))
    out = run_step(s)  # 1 + 60 fits
    assert [i.num_new_tokens for i in out.scheduled] == [1, 60]
    s.add(req("c", 63, t=2, first=900))
    out = run_step(s)  # 2 decodes + 63 > 64: c waits whole
    assert [i.request.request_id for i in out.scheduled] == ["a", "b"]
    with pytest.raises(ValueError, match="exceeds max_num_batched_tokens"):
        s.add(req("d", 65))


def test_max_num_seqs_caps_running():
    s = make_scheduler(max_num_seqs=2)
    for i in range(4):
        s.add(req(f"r{i}", 5, t=i, first=100 * i))
    out = run_step(s)
    assert [i.request.request_id for i in out.scheduled] == ["r0", "r1"]
    assert len(s.waiting) == 2


def test_preempts_the_newest_when_blocks_run_out_and_resumes_it():
    # 2 groups x 1 block per 16 tokens: 8 blocks hold two requests of <= 32 tokens
    s = make_scheduler(num_blocks=8, max_num_batched_tokens=256)
    s.add(req("old", 30, max_tokens=4, t=0))
    s.add(req("new", 30, max_tokens=20, t=1, first=100))
    run_step(s)
    run_step(s)
    run_step(s)  # both at 32 computed tokens: the 33rd needs a third block per group
    out = run_step(s)
    assert [r.request_id for r in out.preempted] == ["new"]
    assert [i.request.request_id for i in out.scheduled] == ["old"]
    new = s.waiting[0]
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0 and new.num_output_tokens == 3
    assert not s.running  # old finished in that step
    # new's freed blocks went back tail first: old's two fresh blocks evicted new's block 1 of each group, so
    # resuming reuses block 0 of both groups and recomputes the rest (prompt + 3 outputs = 33 tokens)
    out = run_step(s)
    item = out.scheduled[0]
    assert item.request is new and item.start == 16 and item.num_new_tokens == 17 and item.samples
    assert s.num_preemptions == 1 and new.num_preemptions == 1
    while s.num_unfinished:
        run_step(s)
    assert new.num_output_tokens == 20
    s.kv.check()
    assert s.kv.num_free_blocks == 8


def test_requests_that_can_never_fit_are_refused():
    s = make_scheduler(num_blocks=8)
    with pytest.raises(ValueError, match="exceed the context of 4096"):
        s.add(req("a", 4000, max_tokens=100))
    with pytest.raises(ValueError, match="KV blocks"):
        s.add(req("b", 60, max_tokens=20))  # 79 tokens: 5 full + 5 sliding blocks > 8
    s.add(req("c", 50, max_tokens=14))  # 63 tokens: 4 + 4 blocks
    assert len(s.waiting) == 1


def test_fcfs_and_priority_order():
    s = make_scheduler(max_num_seqs=1)
    s.add(req("late-urgent", 4, priority=-5, t=2))
    s.add(req("early", 4, priority=3, t=1))
    assert run_step(s).scheduled[0].request.request_id == "early"
    p = make_scheduler(max_num_seqs=1, scheduling_policy="priority")
    p.add(req("late-urgent", 4, priority=-5, t=2))
    p.add(req("early", 4, priority=3, t=1))
    assert run_step(p).scheduled[0].request.request_id == "late-urgent"


def test_priority_preemption_picks_the_least_urgent():
    s = make_scheduler(num_blocks=8, scheduling_policy="priority")
    s.add(req("low", 30, max_tokens=20, priority=5, t=0))
    s.add(req("high", 30, max_tokens=20, priority=0, t=1, first=100))
    for _ in range(4):
        out = run_step(s)
    assert [r.request_id for r in out.preempted] == ["low"]
    assert [i.request.request_id for i in out.scheduled] == ["high"]
    s.kv.check()


def test_finish_frees_from_any_state():
    s = make_scheduler()
    a, b = req("a", 40, t=0), req("b", 40, t=1, first=100)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    c = req("c", 5, t=2)
    s.add(c)
    s.finish(c, RequestStatus.FINISHED_ABORTED)
    assert not s.running and not s.waiting
    assert s.kv.num_free_blocks == 256
    s.kv.check()
