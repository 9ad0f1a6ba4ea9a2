"""Sharded replicas on real Ray (CPU, gloo): `LLM(num_shards=G)` (RayExecutor + ShardWorkers) against G = 1.

- sharding refused at start: a shard count that does not divide the KV heads / experts / vocabulary, more devices
  than the cluster has, a placement group that never fits (bounded wait), a too-small given placement group;
- G = 2 (in a given placement group laid out like a Serve replica's: shards in bundles 1..G) and G = 4 (its own
  group) give the greedy tokens of G = 1, every step's top-20 logprobs (sampled on rank 0) and `forward_logits`
  within 1e-4 (float32), the same routed-token counts, each rank holding 1/G of the experts, KV heads, vocabulary
  and KV pool; shutdown leaves no actor or placement group behind;
- at G = 1, 2 and 4 a mixed batch (greedy, seeded temperature / top-p, top-k / min-p, penalties, min_tokens, stop
  tokens, logprobs with top 5, a JSON-schema constrained row) gives exactly the tokens, stops and logprobs of the
  engine as it was before sampling moved onto the executor (tests/sampler_oracle.py: rank 0's full logits back to
  the engine, sampled there);
- a killed ShardWorker: the next step fails with ShardFailure within seconds, the health check fails, and every
  shard actor and the executor's placement group are gone;
- two Ray nodes (two raylets on this machine, both on 127.0.0.1), joined through $RAY_ADDRESS: STRICT_SPREAD puts
  one shard on each and the replica serves correctly;
- TorchDistributedCollective between two processes: values, and a stuck peer failing the collective in seconds;
- a local Ray start whose dashboard misses Ray's start-up timeout is cleaned up and tried once more.

Ray stays on loopback throughout (see `connect_ray` and the two-node fixture) and is shut down by the fixtures.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from gptoss_cluster import LLM
from gptoss_cluster.workers.checkpoint import open_checkpoint
from gptoss_cluster.workers.config import ModelConfig
from gptoss_cluster.workers.engine import Engine, EngineConfig, KVCacheLayout
from gptoss_cluster.workers.engine.ray_executor import (
    RayExecutor,
    ShardFailure,
    check_num_shards,
    connect_ray,
    make_executor,
    start_local_ray,
)
from gptoss_cluster.workers.sampling import SamplingParams
from tests.helpers import torch_threads
from tests.sampler_oracle import OracleEngine, assert_same_results

ray = pytest.importorskip("ray")

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[200006, 1428, 200008, 12194, 17, 4, 99], list(range(1000, 1040)), [5, 6]]
ENGINE = dict(num_blocks=32, block_size=16)
FAST = dict(collective_timeout_s=10.0, step_timeout_s=60.0, start_timeout_s=120.0, placement_timeout_s=30.0,
            torch_threads=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def run(llm: LLM) -> dict:
    """Greedy generation (every token's top-20 logprobs, from the executor's sampler), routed-token counts, then
    whole-sequence logits."""
    before = llm.engine.stats().expert_counts  # the executor's counts so far (other engines may have used it)
    outs = llm.generate(PROMPTS, GREEDY)
    counts = llm.engine.stats().expert_counts - before
    with_logprobs = llm.engine.generate([(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                            logprobs=20)) for p in PROMPTS])
    tokens = [o.token_ids for o in outs]
    full = [llm.forward_logits(p + t) for p, t in zip(PROMPTS, tokens, strict=True)]
    return {"tokens": tokens, "logprobs": with_logprobs, "counts": counts, "full": full}


def assert_same(got: dict, want: dict, what: str) -> None:
    assert got["tokens"] == want["tokens"], what
    assert [r.token_ids for r in got["logprobs"]] == want["tokens"], what
    assert_same_results(got["logprobs"], want["logprobs"], what, atol=1e-4)
    assert torch.equal(got["counts"], want["counts"]), what
    for i, (a, b) in enumerate(zip(got["full"], want["full"], strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m, i=i: f"{what}, logits {i}: {m}")


def mixed_requests(greedy_tokens: list[list[int]]) -> list[tuple]:
    """One batch of every sampling feature; the stop token is one the greedy run of PROMPTS[0] reaches."""
    import json

    from gptoss_cluster.workers.engine.structured import Constraint, ResponseFormat
    from gptoss_cluster.workers.harmony import get_tokenizer, render_chat
    from tests.structured_cases import SCHEMAS

    stop = greedy_tokens[0][2]
    chat = render_chat([{"role": "user", "content": "Answer in JSON."}])
    schema = Constraint(ResponseFormat("json_schema", json.dumps(SCHEMAS[0])), max_reasoning_tokens=0)
    return [
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop])),
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, min_tokens=4, stop_token_ids=[stop], logprobs=5)),
        (PROMPTS[1], SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=6, logprobs=5, ignore_eos=True)),
        (PROMPTS[2], SamplingParams(temperature=0.7, seed=11, repetition_penalty=1.3, frequency_penalty=0.5,
                                    presence_penalty=0.3, max_tokens=6, ignore_eos=True)),
        (list(range(2000, 2013)), SamplingParams(temperature=1.1, top_k=50, min_p=0.02, max_tokens=5,
                                                 ignore_eos=True)),
        (chat, SamplingParams(temperature=1.0, seed=3, max_tokens=12), get_tokenizer().stop_token_ids_for_chat,
         schema),
    ]


def check_mixed_batch(llm: LLM, greedy_tokens: list[list[int]], what: str) -> None:
    """The mixed batch through two fresh engines over `llm`'s executor: sampling on the executor, and the oracle
    (the old path); then the executor's pool back to what `llm`'s engine expects (nothing it cached is lost: this
    runs before it serves anything, or after it is done)."""
    executor, config = llm.engine.executor, llm.config
    engine_config = EngineConfig(**ENGINE, seed=5)
    requests = mixed_requests(greedy_tokens)
    new_engine = Engine(executor, config, engine_config, tokenizer=llm.tokenizer)
    new = new_engine.generate(requests)  # async scheduling (the default)
    serial_engine = Engine(executor, config, dataclasses.replace(engine_config, async_scheduling=False),
                           tokenizer=llm.tokenizer)
    serial_engine._structured = new_engine.structured  # xgrammar's vocabulary tables: built once
    serial = serial_engine.generate(requests)
    old_engine = OracleEngine(executor, config, engine_config, tokenizer=llm.tokenizer)
    old_engine._structured = new_engine.structured
    old = old_engine.generate(requests)
    executor.initialize_cache(llm.engine.layout, llm.engine.num_kv_blocks)
    llm.engine.kv.reset_prefix_cache()
    assert_same_results(new, old, what)
    assert_same_results(new, serial, f"{what}, async vs serial")
    stop = greedy_tokens[0][2]
    assert new[0].finish_reason == "stop" and new[0].stop_reason == stop
    assert stop not in new[1].token_ids[:4] and len(new[1].logprobs[0].top) == 5
    assert new[5].token_ids[0] == llm.tokenizer.token_id("<|channel|>")  # the constraint's header: no analysis


@pytest.fixture(scope="module")
def tiny(checkpoints):
    return checkpoints["tiny-hf"]  # ModelConfig.preset("tiny"): 4 KV heads, 8 experts, vocabulary 201088


@pytest.fixture(scope="module")
def reference(tiny):
    """G = 1, the model in this process (no Ray)."""
    llm = LLM(tiny, dtype="float32", progress=False, engine_config=EngineConfig(**ENGINE))
    return {"config": llm.config, "llm": llm, **run(llm)}


def test_mixed_batch_in_process_gives_the_previous_engine_s_tokens(reference):
    check_mixed_batch(reference["llm"], reference["tokens"], "G=1 (in process)")


def shard_actors() -> dict[str, str]:
    """ShardWorker actors Ray knows of -> state (from the GCS tables: this Ray runs without a dashboard, which
    ray.util.state's list_actors needs)."""
    return {aid: a["State"] for aid, a in ray._private.state.actors().items() if a["ActorClassName"] == "ShardWorker"}


def placement_groups() -> dict[str, str]:
    return {pid: pg["state"] for pid, pg in ray.util.placement_group_table().items()}


def wait_until(predicate, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def assert_nothing_left() -> None:
    assert wait_until(lambda: all(s == "DEAD" for s in shard_actors().values())), shard_actors()
    assert wait_until(lambda: all(s == "REMOVED" for s in placement_groups().values())), placement_groups()


# ---------------------------------------------------------------------------------------------------- refusals
def test_bad_shard_counts_are_refused_before_anything_starts(tiny):
    was_running = ray.is_initialized()
    config = ModelConfig.preset("tiny")
    for g in (3, 5, 8, 16):  # 8 divides the experts but not the 4 KV heads
        with pytest.raises(ValueError, match=rf"num_shards={g} cannot split .*do not divide the 4 KV heads"):
            check_num_shards(config, g)
    with pytest.raises(ValueError, match="3 shards do not divide the 4 KV heads"):
        LLM(tiny, num_shards=3)
    with pytest.raises(ValueError, match="num_shards must be a positive integer"):
        LLM(tiny, num_shards=0)
    with pytest.raises(ValueError, match="placement_strategy must be one of"):
        LLM(tiny, num_shards=2, placement_strategy="PACKED")
    with pytest.raises(ValueError, match="device must be one of"):
        make_executor(tiny, num_shards=2, device="tpu")
    with pytest.raises(TypeError, match="cpus_per_shard: executor options, for num_shards > 1 only"):
        LLM(tiny, cpus_per_shard=2)
    with pytest.raises(ValueError, match="6 experts"):
        check_num_shards(ModelConfig.preset("tiny", num_experts=6, experts_per_token=2), 4)
    assert ray.is_initialized() == was_running  # refused before Ray was even touched


# ---------------------------------------------------------------------------------------------------- one node
@pytest.fixture(scope="class")
def local_ray():
    assert not ray.is_initialized(), "another test left Ray running"
    assert connect_ray(num_cpus=8)
    node = ray.nodes()[0]
    assert node["NodeManagerAddress"] == "127.0.0.1"
    yield node
    ray.shutdown()


@pytest.mark.usefixtures("local_ray")
class TestOneNode:
    llms: dict[int, LLM] = {}

    def test_sharded_equals_single(self, tiny, reference):
        config = reference["config"]
        layout = KVCacheLayout.from_model_config(config, ENGINE["block_size"])
        total_blocks = sum(nbytes(t) for t in full_expert_blocks(tiny))
        # G = 2 goes into a given group laid out like a Serve replica's (bundle 0: the replica, 1..G: the shards);
        # G = 4 makes (and owns) its own.
        replica_pg = ray.util.placement_group([{"CPU": 1}] * 3, strategy="PACK")
        ray.get(replica_pg.ready(), timeout=30)
        TestOneNode.replica_pg = replica_pg
        for g in (4, 2):
            given = replica_pg if g == 2 else None
            llm = LLM(tiny, dtype="float32", engine_config=EngineConfig(**ENGINE), num_shards=g,
                      placement_group=given, **FAST)
            TestOneNode.llms[g] = llm
            executor = llm.engine.executor
            assert isinstance(executor, RayExecutor) and llm.config == config and llm.model is None
            assert executor.owns_placement_group == (given is None) and not executor.owns_ray
            check_mixed_batch(llm, reference["tokens"], f"G={g}")
            assert_same(run(llm), reference, f"G={g}")

            # Each rank holds its 1/G share: experts (MXFP4 blocks), KV heads, vocabulary rows, KV pool bytes.
            reports = executor.memory_reports()
            assert [r["rank"] for r in reports] == list(range(g))
            assert [r["first_expert"] for r in reports] == [r * 8 // g for r in range(g)]
            for r in reports:
                assert r["num_local_experts"] == 8 // g and r["num_kv_heads"] == 4 // g
                assert r["expert_block_bytes"] * g == total_blocks
                assert r["vocab_rows"] * g == config.vocab_size
                assert r["kv_bytes"] == ENGINE["num_blocks"] * executor.kv_block_bytes(layout)
                assert r["rss_bytes"] > 0
            assert executor.kv_block_bytes(layout) * g == layout.block_bytes(4, config.head_dim, torch.float32)
            assert len(set(executor.node_ids)) == 1
            executor.check_health()
        # The shards sit in bundles 1 and 2 of the replica's group; bundle 0 stays free for the replica.
        pg_id = replica_pg.id.hex()
        assert wait_until(lambda: [ray.available_resources().get(f"CPU_group_{i}_{pg_id}", 0.0) for i in range(3)]
                          == [1.0, 0.0, 0.0]), ray.available_resources()
        # A clean shutdown leaves none of G = 4's actors nor its placement group.
        with TestOneNode.llms.pop(4) as four:
            executor = four.engine.executor
            four_ids = {w._actor_id.hex() for w in executor.workers}
            four_pg = executor.placement_group.id.hex()
        four.shutdown()  # idempotent
        assert wait_until(lambda: all(shard_actors()[a] == "DEAD" for a in four_ids))
        assert wait_until(lambda: placement_groups()[four_pg] == "REMOVED")
        assert sum(s == "ALIVE" for s in shard_actors().values()) == 2  # G = 2 lives on, for the next test
        assert ray.is_initialized()  # not the LLM's Ray to stop
        with pytest.raises(RuntimeError, match="shut down"):
            executor.check_health()

    def test_killed_shard_fails_fast_and_tears_down(self, reference):
        llm = TestOneNode.llms.pop(2, None)
        if llm is None:
            pytest.skip("needs the G = 2 LLM of test_sharded_equals_single")
        executor = llm.engine.executor
        assert llm.generate([PROMPTS[0]], GREEDY)[0].token_ids == reference["tokens"][0]
        executor.check_health()
        ray.kill(executor.workers[1], no_restart=True)
        start = time.monotonic()
        with pytest.raises(ShardFailure, match=r"shard 1 of 2 died"):
            llm.generate([PROMPTS[1]], GREEDY)
        assert time.monotonic() - start < 30
        with pytest.raises(ShardFailure, match="shard 1 of 2 died"):
            executor.check_health()
        with pytest.raises(ShardFailure):
            executor.execute(None)  # refused at once, nothing sent
        assert executor.workers == [] and executor.placement_group is None
        assert wait_until(lambda: all(s == "DEAD" for s in shard_actors().values())), shard_actors()
        llm.shutdown()
        # The replica's own group is the replica's to remove, not the executor's.
        assert placement_groups()[TestOneNode.replica_pg.id.hex()] == "CREATED"
        ray.util.remove_placement_group(TestOneNode.replica_pg)
        assert_nothing_left()

    def test_more_devices_than_the_cluster_has(self, tiny):
        before = set(placement_groups())
        with pytest.raises(RuntimeError, match=r"2 shards need 2 × \{1 GPU, 1 CPU\}.*cluster has 8 CPU, 0 GPU"):
            LLM(tiny, num_shards=2, device="cuda")
        with pytest.raises(RuntimeError, match=r"2 shards need 2 × \{16 CPU\}.*cluster has 8 CPU"):
            make_executor(tiny, num_shards=2, cpus_per_shard=16)
        with pytest.raises(RuntimeError, match="on as many distinct nodes.*STRICT_SPREAD.*1 node"):
            make_executor(tiny, num_shards=2, placement_strategy="STRICT_SPREAD")
        assert set(placement_groups()) == before  # refused before any placement group was made
        # Fits the cluster, but not what is free now (a group holds 6 of the 8 CPUs): a bounded wait, then an error.
        blocker = ray.util.placement_group([{"CPU": 6}])
        ray.get(blocker.ready(), timeout=30)
        try:
            start = time.monotonic()
            with pytest.raises(RuntimeError, match=r"not placed within 1 s.*8 CPU, 0 GPU in all, 2 CPU, 0 GPU free"):
                make_executor(tiny, num_shards=2, cpus_per_shard=2, placement_timeout_s=1.0)
            assert time.monotonic() - start < 15
            # A given group with too few bundles for bundle_offset + G.
            with pytest.raises(ValueError, match=r"need bundles 1..2 of the placement group, which has 1 bundle"):
                make_executor(tiny, num_shards=2, placement_group=blocker)
        finally:
            ray.util.remove_placement_group(blocker)
        assert_nothing_left()
        assert ray.is_initialized()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def full_expert_blocks(path) -> list[torch.Tensor]:
    with open_checkpoint(path) as reader:
        return [reader.read(f"model.layers.{i}.mlp.experts.{p}_proj_blocks")
                for i in range(reader.config.num_hidden_layers) for p in ("gate_up", "down")]


# ---------------------------------------------------------------------------------------------------- two nodes
@pytest.fixture(scope="class")
def two_nodes(tmp_path_factory):
    """Two raylets on this machine, both on 127.0.0.1 (ray.cluster_utils.Cluster).

    Not `ray start`: it rewrites a loopback --node-ip-address to the host's routable address, and a joined node's
    servers then listen on every interface; `ray stop` would kill every Ray process on the machine, other tests'
    included. Cluster starts both nodes as children of this process with node_ip_address=127.0.0.1 (their servers
    bind loopback only) and `shutdown()` kills exactly those processes (Ray's reaper does it should pytest die).
    """
    from ray._private.authentication.authentication_token_setup import (
        enable_token_auth_by_default,
        ensure_token_if_auth_enabled,
    )
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another test left Ray running"
    enable_token_auth_by_default()  # token auth on, as for a fresh local Ray (no-op when RAY_AUTH_MODE is set)
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    temp_dir = tmp_path_factory.mktemp("ray2n")
    if len(str(temp_dir)) > 60:  # unix socket paths are limited to 107 bytes
        import tempfile

        temp_dir = tempfile.mkdtemp(prefix="ray2n")

    def start() -> Cluster:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {"node_a": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "temp_dir": str(temp_dir)})
        try:
            ray._common.utils.reset_ray_address()  # no `ray.init(address="auto")` elsewhere should find this one
            cluster.add_node(num_cpus=2, resources={"node_b": 1}, node_ip_address="127.0.0.1",
                             temp_dir=str(temp_dir))
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    # a loaded machine sometimes keeps a raylet from registering within Ray's 30 s: clean up, start once more
    cluster = start_local_ray(start)
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


class TestTwoNodes:
    def test_strict_spread_puts_one_shard_per_node(self, two_nodes, tiny, reference, monkeypatch):
        address = two_nodes.address
        assert address.startswith("127.0.0.1:")
        monkeypatch.setenv("RAY_ADDRESS", address)
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # connect_ray turns it on for the token at hand
        llm = LLM(tiny, dtype="float32", engine_config=EngineConfig(**ENGINE), num_shards=2,
                  placement_strategy="STRICT_SPREAD", **FAST)
        executor = llm.engine.executor
        assert executor.owns_ray  # the LLM joined $RAY_ADDRESS itself
        try:
            nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
            assert len(nodes) == 2 and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes.values())
            on = [nodes[node_id]["Resources"] for node_id in executor.node_ids]
            assert ("node_a" in on[0]) != ("node_a" in on[1]) and ("node_b" in on[0]) != ("node_b" in on[1])
            assert executor.rank0_ip == "127.0.0.1"
            assert_same(run(llm), reference, "two nodes")
            executor.check_health()
            actor_ids = {w._actor_id.hex() for w in executor.workers}
            pg_id = executor.placement_group.id.hex()
        finally:
            llm.shutdown()
        assert not ray.is_initialized()  # the LLM's own connection ended with it
        connect_ray()  # look again from outside: nothing of that replica is left on the cluster
        assert wait_until(lambda: all(shard_actors()[a] == "DEAD" for a in actor_ids))
        assert wait_until(lambda: placement_groups()[pg_id] == "REMOVED")


# ---------------------------------------------------------------------------------------------------- collectives
def _collective_rank(rank: int, port: int, results) -> None:
    """One of two processes: the collectives' values, then a peer that stops answering."""
    try:
        from gptoss_cluster.workers.parallel import (
            TorchDistributedCollective,
            destroy_process_group,
            init_process_group,
        )

        torch.set_num_threads(1)
        coll = init_process_group(rank, 2, "127.0.0.1", port, "gloo", timeout_s=3.0, local_ip="127.0.0.1")
        out = {"sum": coll.all_reduce(torch.full((2, 3), float(rank + 1))).tolist(),
               "gather": coll.all_gather(torch.full((1, 2), float(rank)), dim=-1).tolist()}
        to_zero = TorchDistributedCollective(gather_dst=0).all_gather(torch.full((1, 2), float(rank)), dim=1)
        out["to_zero"] = to_zero.tolist() if rank == 0 else list(to_zero.shape)
        if rank == 1:
            time.sleep(4.5)  # alive (past rank 0's 3 s timeout), but never joins rank 0's next collective
        else:
            start = time.monotonic()
            try:
                coll.all_reduce(torch.ones(4))
                out["stuck"] = "returned"
            except Exception as exc:  # noqa: BLE001
                out["stuck"] = (type(exc).__name__, time.monotonic() - start)
        results.put((rank, out))
        destroy_process_group()
    except BaseException as exc:  # noqa: BLE001
        results.put((rank, repr(exc)))


def test_torch_distributed_collective_and_timeout():
    import multiprocessing

    from gptoss_cluster.workers.parallel import find_free_port

    ctx = multiprocessing.get_context("fork")  # torch is imported already: no seconds-long re-import per rank
    results = ctx.Queue()
    port = find_free_port("127.0.0.1")
    procs = [ctx.Process(target=_collective_rank, args=(r, port, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
    assert isinstance(got[0], dict) and isinstance(got[1], dict), got
    for rank in (0, 1):
        assert got[rank]["sum"] == [[3.0] * 3] * 2
        assert got[rank]["gather"] == [[0.0, 0.0, 1.0, 1.0]]
    assert got[0]["to_zero"] == [[0.0, 0.0, 1.0, 1.0]] and got[1]["to_zero"] == [1, 4]
    error, waited = got[0]["stuck"]
    assert waited < 3.0 + 5.0, got[0]  # the 3 s collective timeout, not forever


_FIRST_DASHBOARD_START_FAILS = """
import pathlib, sys
import ray
import ray._private.ray_constants as ray_constants
from gptoss_cluster.workers.engine import ray_executor

real_init, descendants = ray.init, []

def init(*args, **kwargs):  # the first start gets no time for its dashboard: Ray's own failure, as under load
    descendants.append(ray_executor._child_pids())
    saved = ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S
    ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = 0 if len(descendants) == 1 else saved
    try:
        return real_init(*args, **kwargs)
    finally:
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = saved

def alive(pid):
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

ray.init = init
assert ray_executor.connect_ray(None, num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1")
assert len(descendants) == 2, len(descendants)
left = [pid for pid in descendants[1] - descendants[0] if alive(pid)]
assert not left, f"the failed start left processes running: {left}"
assert ray.cluster_resources().get("CPU") == 1
ray.shutdown()
print("ok")
"""


def test_a_local_ray_start_whose_dashboard_fails_is_cleaned_up_and_retried():
    """Ray raises when its dashboard misses the start-up timeout (seen on loaded CI machines): the half-started node's
    processes are killed and the start is tried once more."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _FIRST_DASHBOARD_START_FAILS], cwd=root, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
    assert "trying once more" in result.stderr


def test_start_local_ray_kills_what_a_failed_start_left_and_tries_once_more():
    """start_local_ray (connect_ray's and the two-node fixture's start): the processes a failed start spawned are
    killed before the second try; a start that fails twice raises its error."""
    import subprocess

    spawned: list[subprocess.Popen] = []

    def start() -> str:
        spawned.append(subprocess.Popen(["sleep", "60"]))
        if len(spawned) == 1:
            raise Exception("The current node timed out during startup.")  # what Ray raises, a bare Exception
        return "started"

    try:
        assert start_local_ray(start) == "started"
        assert spawned[0].wait(timeout=10) == -9  # killed (SIGKILL) before the second try
        assert spawned[1].poll() is None  # what the good start made is left alone

        def never() -> None:
            raise RuntimeError("no node")

        with pytest.raises(RuntimeError, match="no node"):
            start_local_ray(never)
    finally:
        for process in spawned:
            process.kill()
            process.wait()
