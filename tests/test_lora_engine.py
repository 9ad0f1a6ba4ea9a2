"""LoRA adapters in the engine: registration, residency over `max_loras` slots, scheduling, prefix cache, stats.

The scheduling tests run the real engine on the small model behind a recording executor that loads nothing: it
records `add_lora` / `remove_lora` and runs every step as the base model (its `lora_slots` dropped), so they check
the engine's bookkeeping alone (which adapter sits in which slot when a step uses it, pins, skipping, the cache
salt) and the greedy tokens against the same prompts without adapters. The end-to-end tests (PEFT adapters on the
tiny checkpoint through `LLM`) are at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from gptoss_cluster.workers.block_hash import hash_block, lora_salt, prefix_hashes
from gptoss_cluster.workers.engine import Engine, EngineConfig, LocalExecutor
from gptoss_cluster.workers.engine.lora_slots import LoraSlots
from gptoss_cluster.workers.lora.adapter import AdapterInfo, LoraError, LoraNotFoundError
from gptoss_cluster.workers.sampling import SamplingParams
from tests.helpers import ForwardingExecutor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def info(name: str) -> AdapterInfo:
    return AdapterInfo(name=name, path=f"/adapters/{name}", rank=4, lora_alpha=8.0, use_rslora=False,
                       target_modules=("q_proj",), layers=(0,), num_bytes=1000)


def prompt(seed: int, n: int = 20) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4000, (n,), generator=g).tolist()


class RecordingExecutor(ForwardingExecutor):
    """Records the LoRA calls in one log (with the engine's view of every planned step, see `record_steps`) and runs
    every step as the base model."""

    def __init__(self, inner, log: list) -> None:
        super().__init__(inner)
        self.log = log

    def add_lora(self, slot, source) -> None:
        self.log.append(("load", slot, source.name))

    def remove_lora(self, slot) -> None:
        self.log.append(("unload", slot))

    def execute(self, plan, bitmask=None):
        return self.inner.execute(dataclasses.replace(plan, lora_slots=None), bitmask)

    def forward_logits(self, plan):
        return self.inner.forward_logits(dataclasses.replace(plan, lora_slots=None))


def make_engine(model, *, names=("x", "y", "z"), **config) -> tuple[Engine, list]:
    log: list = []
    config = {"num_blocks": 64, "block_size": 16, **config}
    engine = Engine(RecordingExecutor(LocalExecutor(model), log), model.config, EngineConfig(**config))
    for name in names:  # registered as `add_lora` would after validating the folder
        engine.lora.register(info(name))
    record_steps(engine, log)
    return engine, log


def record_steps(engine: Engine, log: list) -> None:
    """Append ("step", [(adapter name or None, slot), ...], pins) to `log` for every plan the engine lays out, and
    check that the pins count the running requests of each slot."""
    build = engine._build_plan

    def recording(sched):
        plan, sampled = build(sched)
        rows = [(s.request.lora_name, s.request.lora_slot) for s in sched.scheduled]
        slots = [-1] * len(rows) if plan.lora_slots is None else plan.lora_slots.tolist()
        assert slots == [slot for _, slot in rows]
        pins = [engine.lora.pinned_by(i) for i in range(engine.lora.max_loras)]
        running = [r.lora_slot for r in engine.scheduler.running]
        assert pins == [running.count(i) for i in range(engine.lora.max_loras)], (pins, running)
        log.append(("step", rows, pins))
        return plan, sampled

    engine._build_plan = recording


def check_log(log: list, max_loras: int) -> int:
    """Every planned row's slot holds its adapter (the last load into that slot), at most `max_loras` adapters per
    step; returns the number of steps."""
    held: dict[int, str | None] = {}
    steps = 0
    for event in log:
        if event[0] == "load":
            held[event[1]] = event[2]
        elif event[0] == "unload":
            held[event[1]] = None
        else:
            steps += 1
            rows = event[1]
            for name, slot in rows:
                if name is None:
                    assert slot == -1
                else:
                    assert held.get(slot) == name, (event, held)
            assert len({name for name, _ in rows if name is not None}) <= max_loras
    return steps


# ---------------------------------------------------------------------------------------------------- hashing
def test_lora_salt_separates_adapters_and_keeps_base_hashes():
    tokens = list(range(40))
    base = prefix_hashes(tokens, 8, 10)
    chain, parent = [], b""
    for i in range(5):  # the chain as it was before salts existed
        parent = hash_block(parent, tokens[i * 8:(i + 1) * 8])
        chain.append(parent)
    assert base == chain == prefix_hashes(tokens, 8, 10, salt=lora_salt(None))
    assert lora_salt(None) == b""
    x, y = prefix_hashes(tokens, 8, 10, lora_salt("x")), prefix_hashes(tokens, 8, 10, lora_salt("y"))
    assert x == prefix_hashes(tokens, 8, 10, lora_salt("x"))
    assert len({*x, *y, *base}) == 15  # no block shared between base, x and y


def test_prefix_cache_is_per_adapter(small_model):
    engine, log = make_engine(small_model)
    p = prompt(1, 40)  # two full blocks of 16
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def hit_tokens(lora):
        before = engine.kv.prefix_hit_tokens
        engine.generate([(p, params)], lora=lora)
        return engine.kv.prefix_hit_tokens - before

    assert hit_tokens("x") == 0
    assert hit_tokens("y") == 0  # the same prompt under another adapter: nothing shared
    assert hit_tokens(None) == 0  # nor with the base model
    assert hit_tokens("x") == 32
    assert hit_tokens("y") == 32
    assert hit_tokens(None) == 32
    # the base model's blocks are named exactly as the router names them
    request = engine._make_request(p, params, None, 0, None)
    assert engine.kv.block_hashes(request) == prefix_hashes(p, 16, 10)
    # a name registered again (other weights, maybe) is another adapter: no block of the old registration serves it
    assert engine.remove_lora("x")
    engine.lora.register(info("x"))
    assert hit_tokens("x") == 0
    assert hit_tokens("x") == 32


# ---------------------------------------------------------------------------------------------------- residency
def test_more_adapters_than_slots_all_finish_with_at_most_max_loras_per_step(small_model):
    prompts = [prompt(10 + i, 12 + 3 * i) for i in range(6)]
    loras = ["x", "y", "z", "x", "y", "z"]
    params = [SamplingParams(temperature=0, max_tokens=3 + 2 * i, ignore_eos=True) for i in range(6)]
    reference, _ = make_engine(small_model, names=())
    want = [r.token_ids for r in reference.generate(list(zip(prompts, params, strict=True)))]
    for async_scheduling in (True, False):
        engine, log = make_engine(small_model, max_loras=2, async_scheduling=async_scheduling)
        got = engine.generate(list(zip(prompts, params, strict=True)), lora=loras)
        assert [r.token_ids for r in got] == want  # (the executor runs the base model: same tokens)
        assert check_log(log, max_loras=2) > 0
        loads = [e for e in log if e[0] == "load"]
        assert {name for _, _, name in loads} == {"x", "y", "z"}
        assert {slot for _, slot, _ in loads} <= {0, 1}
        assert engine.lora.num_resident == 2
        assert [engine.lora.pinned_by(i) for i in range(2)] == [0, 0]
        engine.kv.check()


def test_waiting_request_without_a_slot_is_passed_over(small_model):
    engine, log = make_engine(small_model, max_loras=1)
    first = engine.submit(prompt(1), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), lora="x")
    blocked = engine.submit(prompt(2), GREEDY, lora="y")
    base = engine.submit(prompt(3), GREEDY)
    same = engine.submit(prompt(4), GREEDY, lora="x")
    engine.step()
    step = [e for e in log if e[0] == "step"][0]
    assert [name for name, _ in step[1]] == ["x", None, "x"]  # y waits; the base and another x go ahead
    assert engine.requests[blocked].status.value == "waiting"
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert set(finished) == {first, blocked, base, same}
    assert finished.index(blocked) > finished.index(first)
    check_log(log, max_loras=1)
    assert [e[1:] for e in log if e[0] == "load"] == [(0, "x"), (0, "y")]


def test_least_recently_used_unpinned_slot_is_evicted(small_model):
    engine, log = make_engine(small_model, max_loras=2)
    for name in ("x", "y", "x", "z"):  # z evicts y (x was used after y)
        engine.generate([(prompt(5), GREEDY)], lora=name)
    assert [e[1:] for e in log if e[0] == "load"] == [(0, "x"), (1, "y"), (1, "z")]
    assert sorted(engine.lora.resident()) == ["x", "z"]


def test_abort_and_preemption_release_slots(small_model):
    engine, log = make_engine(small_model, max_loras=1)
    rid = engine.submit(prompt(6), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), lora="x")
    engine.step()
    assert engine.lora.pinned_by(0) == 1
    assert engine.abort(rid)
    assert engine.lora.pinned_by(0) == 0
    engine.generate([(prompt(7), GREEDY)], lora="y")  # the slot is free for another adapter
    assert [e[1:] for e in log if e[0] == "load"] == [(0, "x"), (0, "y")]

    # A pool too small for every request at once: running requests are preempted (their pins released, else the
    # pins check in record_steps fails) and resume, in any slot their adapter then holds.
    engine, log = make_engine(small_model, max_loras=2, num_blocks=12)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference, _ = make_engine(small_model, names=(), num_blocks=12)
    prompts = [prompt(20 + i, 30) for i in range(5)]
    want = [r.token_ids for r in reference.generate([(p, params) for p in prompts])]
    got = engine.generate([(p, params) for p in prompts], lora=["x", "y", "x", "z", None])
    assert engine.stats().num_preemptions > 0
    assert [r.token_ids for r in got] == want
    check_log(log, max_loras=2)
    assert [engine.lora.pinned_by(i) for i in range(2)] == [0, 0]


# ---------------------------------------------------------------------------------------------------- registry
def test_unknown_adapter_is_not_found_and_queues_nothing(small_model):
    engine, _ = make_engine(small_model)
    with pytest.raises(LoraNotFoundError, match="'nope'"):
        engine.submit(prompt(1), GREEDY, lora="nope")
    with pytest.raises(LoraNotFoundError):
        engine.generate([(prompt(1), GREEDY), (prompt(2), GREEDY)], lora=["x", "nope"])
    with pytest.raises(ValueError, match="2 LoRA adapter names for 1 requests"):
        engine.generate([(prompt(1), GREEDY)], lora=["x", "y"])
    with pytest.raises(ValueError, match="named by a string"):
        engine.submit(prompt(1), GREEDY, lora=3)
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_unfinished == 0


def test_add_request_streams_with_its_adapter(small_model):
    engine, log = make_engine(small_model, max_loras=1)
    reference, _ = make_engine(small_model, names=())
    names = ["x", "y", None, "x"]
    want = [r.token_ids for r in reference.generate([(prompt(i), GREEDY) for i in range(4)])]

    async def run():
        with pytest.raises(LoraNotFoundError):
            engine.add_request(prompt(0), GREEDY, lora="nope")
        streams = [engine.add_request(prompt(i), GREEDY, lora=name) for i, name in enumerate(names)]
        outs = [[delta async for delta in stream] for stream in streams]
        await engine.shutdown()
        return outs

    outs = asyncio.run(run())
    assert [[t for d in out for t in d.new_token_ids] for out in outs] == want
    assert all(out[-1].finish_reason == "length" for out in outs)
    check_log(log, max_loras=1)
    assert engine.stats().lora_requests == {"x": 2, "y": 1, "z": 0}


def test_remove_lora_lets_running_requests_finish(small_model):
    engine, log = make_engine(small_model, max_loras=2)
    rid = engine.submit(prompt(8), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), lora="x")
    queued = engine.submit(prompt(9), GREEDY, lora="y")
    engine.step()
    assert engine.remove_lora("x") and engine.remove_lora("y")
    assert not engine.remove_lora("x")
    assert [i.name for i in engine.list_loras()] == ["z"]
    with pytest.raises(LoraNotFoundError):
        engine.submit(prompt(8), GREEDY, lora="x")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done[rid].finish_reason == "length" and done[queued].finish_reason == "length"
    check_log(log, max_loras=2)
    # both slots were freed once their last request ended; the executor drops them before the next step
    assert engine.lora.resident() == [None, None] and engine.lora.num_resident == 2
    before = len(log)
    engine.generate([(prompt(8), GREEDY)], lora="z")
    work = [e for e in log[before:] if e[0] != "step"]  # z loads into one slot (replacing), the other is emptied
    z_slot = next(e[1] for e in work if e[0] == "load")
    assert sorted(work) == [("load", z_slot, "z"), ("unload", 1 - z_slot)]
    assert engine.stats().lora_resident == 1
    # idle: removing an unpinned resident adapter empties its slot at once
    assert engine.remove_lora("z")
    assert engine.lora.num_resident == 0 and log[-1] == ("unload", z_slot)


def test_slots_bookkeeping():
    slots = LoraSlots(2)
    x, y, z = (slots.register(info(n)) for n in "xyz")
    assert len({x.lora_id, y.lora_id, z.lora_id}) == 3
    assert len({x.cache_salt, y.cache_salt, z.cache_salt}) == 3
    with pytest.raises(LoraError, match="already registered"):
        slots.register(info("x"))
    assert slots.acquire(x) == 0 and slots.acquire(y) == 1 and slots.acquire(x) == 0
    assert slots.acquire(z) is None  # both pinned
    assert slots.take_work() == ([], [(0, x.source), (1, y.source)])
    slots.loaded(0), slots.loaded(1)
    slots.release(1)
    assert slots.acquire(z) == 1  # y unpinned: evicted
    slots.release(0), slots.release(0)
    with pytest.raises(RuntimeError, match="released more often"):
        slots.release(0)
    with pytest.raises(ValueError, match="max_loras"):
        LoraSlots(0)


def test_config_validates_lora_limits():
    for bad in ({"max_loras": 0}, {"max_lora_rank": -1}, {"max_loras": True}, {"max_lora_rank": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)
    assert EngineConfig().max_loras == 4 and EngineConfig().max_lora_rank == 16


def test_stats_count_by_adapter(small_model):
    engine, _ = make_engine(small_model, max_loras=2)
    engine.generate([(prompt(i), GREEDY) for i in range(4)], lora=["x", "x", None, "y"])
    rid = engine.submit(prompt(9), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), lora="y")
    engine.step(), engine.step(), engine.step()
    engine.abort(rid)
    stats = engine.stats()
    n_aborted = stats.lora_generation_tokens["y"] - GREEDY.max_tokens
    assert 1 <= n_aborted < 10
    assert stats.lora_requests == {"x": 2, "y": 1, "z": 0}
    assert stats.lora_generation_tokens == {"x": 2 * GREEDY.max_tokens, "y": GREEDY.max_tokens + n_aborted, "z": 0}
    assert stats.lora_resident == 2


# ---------------------------------------------------------------------------------------------------- end to end
MIXED_NAMES = ["full", "rslora", "pattern", None, "pattern", None]  # 3 adapters + base; more than max_loras = 2
E2E_GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
E2E_ENGINE = dict(num_blocks=64, block_size=16, max_loras=2, max_lora_rank=8)


@pytest.fixture(scope="module")
def peft_adapters(checkpoints, tmp_path_factory):
    """tests/test_lora.py's three PEFT adapters on tinyb-hf (attention + experts, rsLoRA, rank / alpha patterns),
    with PEFT's logits over its prompts; and the mixed batch: those prompts, two of them again."""
    pytest.importorskip("peft")
    from tests.test_lora import ADAPTERS, hf_logits, load_hf, make_adapter, prompts

    path = checkpoints["tinyb-hf"]
    root = tmp_path_factory.mktemp("engine-adapters")
    adapters = {name: make_adapter(path, root / name, **ADAPTERS[name]) for name in ("full", "rslora", "pattern")}
    base = load_hf(path)
    ps = prompts()
    return {"path": path, "adapters": adapters, "prompts": ps, "base": [hf_logits(base, p) for p in ps],
            "mixed": ps + ps[:2], "modules": {name: a.source.path for name, a in adapters.items()}}


def peft_model(path, adapter_dir):
    import peft

    from tests.test_lora import load_hf

    return peft.PeftModel.from_pretrained(load_hf(path), adapter_dir).eval()


@pytest.fixture(scope="module")
def one_shard(peft_adapters):
    """The mixed batch's greedy tokens at G = 1 (for the G = 2 test) and each request run alone."""
    from gptoss_cluster import LLM

    with LLM(peft_adapters["path"], dtype="float32", progress=False, lora_modules=peft_adapters["modules"],
             engine_config=EngineConfig(**E2E_ENGINE)) as llm:
        mixed = llm.generate(peft_adapters["mixed"], E2E_GREEDY, lora=MIXED_NAMES)
        alone = [llm.generate([p], E2E_GREEDY, lora=name)[0]
                 for p, name in zip(peft_adapters["mixed"], MIXED_NAMES, strict=True)]
        logits = {name: [llm.forward_logits(p, lora=name) for p in peft_adapters["prompts"]]
                  for name in [*peft_adapters["adapters"], None]}
        stats = llm.engine.stats()
    return {"mixed": [o.token_ids for o in mixed], "alone": [o.token_ids for o in alone], "logits": logits,
            "stats": stats}


def test_llm_adapters_match_peft(peft_adapters, one_shard):
    for name, adapter in peft_adapters["adapters"].items():
        for ours, theirs, base in zip(one_shard["logits"][name], adapter.logits, peft_adapters["base"], strict=True):
            assert (theirs - base).abs().max() > 1e-2  # the adapter visibly changes the logits
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    for ours, theirs in zip(one_shard["logits"][None], peft_adapters["base"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_llm_mixed_batch_greedy_equals_alone_and_peft(peft_adapters, one_shard):
    from tests.test_lora import hf_logits, load_hf

    mixed = one_shard["mixed"]
    assert mixed == one_shard["alone"]
    assert len({tuple(t) for t in mixed[:4]}) == 4
    # PEFT's own greedy choice at every generated position (teacher-forced with our tokens)
    models = {name: peft_model(peft_adapters["path"], a.source.path) for name, a in peft_adapters["adapters"].items()}
    models[None] = load_hf(peft_adapters["path"])
    for p, name, tokens in zip(peft_adapters["mixed"], MIXED_NAMES, mixed, strict=True):
        logits = hf_logits(models[name], p + tokens)
        assert logits[len(p) - 1:-1].argmax(-1).tolist() == tokens, name
    stats = one_shard["stats"]
    assert stats.lora_requests == {"full": 2, "rslora": 2, "pattern": 4}
    assert stats.lora_generation_tokens == {name: 6 * n for name, n in stats.lora_requests.items()}
    assert stats.lora_resident == 2


def test_two_shards_give_the_tokens_and_logits_of_one(peft_adapters, one_shard):
    """LLM(num_shards=2) on a Ray it starts on loopback (and stops): each shard loads its slices of the adapters
    (TP heads, EP experts); the mixed batch's greedy tokens are G = 1's, the logits within 1e-4."""
    ray = pytest.importorskip("ray")
    from gptoss_cluster import LLM

    assert not ray.is_initialized(), "another test left Ray running"
    fast = dict(collective_timeout_s=10.0, step_timeout_s=60.0, start_timeout_s=120.0, placement_timeout_s=30.0,
                torch_threads=1)
    with LLM(peft_adapters["path"], dtype="float32", progress=False, num_shards=2,
             lora_modules=peft_adapters["modules"], engine_config=EngineConfig(**E2E_ENGINE), **fast) as llm:
        mixed = llm.generate(peft_adapters["mixed"], E2E_GREEDY, lora=MIXED_NAMES)
        logits = {name: llm.forward_logits(peft_adapters["prompts"][0], lora=name)
                  for name in [*peft_adapters["adapters"], None]}
        stats = llm.engine.stats()
    assert not ray.is_initialized()
    assert [o.token_ids for o in mixed] == one_shard["mixed"]
    for name, ours in logits.items():
        torch.testing.assert_close(ours, one_shard["logits"][name][0], rtol=0, atol=1e-4)
    assert stats.lora_requests == {"full": 1, "rslora": 1, "pattern": 2}


def test_add_lora_validates_and_a_failed_load_ends_only_its_requests(peft_adapters, tmp_path):
    import shutil

    from gptoss_cluster import LLM

    paths = peft_adapters["modules"]
    with pytest.raises(LoraError):
        LLM(peft_adapters["path"], dtype="float32", progress=False, lora_modules={"gone": str(tmp_path / "none")},
            engine_config=EngineConfig(num_blocks=16))
    llm = LLM(peft_adapters["path"], dtype="float32", progress=False,
              engine_config=EngineConfig(num_blocks=32, max_lora_rank=4))
    info = llm.add_lora("full", paths["full"])
    assert (info.name, info.rank, info.layers) == ("full", 4, (0, 1, 2))
    with pytest.raises(LoraError, match="already registered"):
        llm.add_lora("full", paths["pattern"])
    with pytest.raises(LoraError, match="rank"):
        llm.add_lora("rslora", paths["rslora"])  # r = 8 > max_lora_rank = 4
    with pytest.raises(LoraError, match="name"):
        llm.add_lora("", paths["full"])
    assert [i.name for i in llm.list_loras()] == ["full"]
    # an adapter whose files vanish after registration: its requests end (aborted), the others run on
    shutil.copytree(paths["full"], tmp_path / "copy")
    llm.add_lora("copy", str(tmp_path / "copy"))
    shutil.rmtree(tmp_path / "copy")
    out = llm.generate(peft_adapters["prompts"][:3], E2E_GREEDY, lora=["copy", None, "full"])
    assert [o.finish_reason for o in out] == ["aborted", "length", "length"]
    assert llm.engine.executor.lora_bytes() == info.num_bytes  # "full" alone is resident (float32)
    assert llm.remove_lora("copy") and llm.remove_lora("full")
    assert llm.engine.executor.lora_bytes() == 0 and llm.list_loras() == []


def test_a_failed_load_fails_a_stream_with_the_reason(peft_adapters, tmp_path):
    """A streamed request whose adapter cannot load raises LoraError naming the adapter (the replica answers
    INVALID_ARGUMENT with it); a base request in the same steps finishes."""
    import shutil

    from gptoss_cluster import LLM

    shutil.copytree(peft_adapters["modules"]["full"], tmp_path / "copy")
    with LLM(peft_adapters["path"], dtype="float32", progress=False, lora_modules={"copy": str(tmp_path / "copy")},
             engine_config=EngineConfig(num_blocks=32, max_lora_rank=8)) as llm:
        shutil.rmtree(tmp_path / "copy")
        prompt = peft_adapters["prompts"][0]

        async def run():
            broken = llm.engine.add_request(prompt, E2E_GREEDY, lora="copy")
            base = llm.engine.add_request(prompt, E2E_GREEDY)
            base_outs = [out async for out in base]
            with pytest.raises(LoraError, match="'copy' failed to load"):
                async for _ in broken:
                    pass
            await llm.engine.shutdown()
            return base_outs

        outs = asyncio.run(run())
    assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 6
    assert not llm.engine.has_unfinished_requests()
