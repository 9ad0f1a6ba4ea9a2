"""Replica choice: each routing policy on its own, without Ray (cluster.router.policies), then the Serve
RequestRouter adapter driven the way Serve drives it (no cluster needed)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from gptoss_cluster.cluster.contract import ChannelOpen, ReplicaLoad, ReplicaRequest, ReplicaState, request_cost
from gptoss_cluster.cluster.router.policies import (
    ROUTING_POLICIES,
    PowerOfTwo,
    PrefixAffinity,
    RoundRobin,
    RouteRequest,
    make_policy,
)
from gptoss_cluster.cluster.router.serve_routing import PolicyRequestRouter
from gptoss_cluster.workers.block_hash import hash_block, prefix_hashes
from gptoss_cluster.workers.sampling import SamplingParams

BS = 4
REPLICAS = ["r1", "r2", "r3"]


def _prompt(seed: int, n: int = 24) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def _route(key: str, prompt: list[int] | None = None, cost: int = 0, exclude=()) -> RouteRequest:
    return RouteRequest(key, tuple(prefix_hashes(prompt or [], BS, 64)), cost, tuple(exclude))


def _send(policy, key: str, replicas=REPLICAS, **route) -> str:
    """Rank, route to the first choice, and return it (the request stays in flight)."""
    request = _route(key, **route)
    first = policy.rank(replicas, request)[0][0]
    policy.on_routed(request, first)
    return first


# ------------------------------------------------------------------------------------------------ shared pieces
def test_prefix_hashes_match_the_engine_hash_chain_and_cost_is_one_formula():
    tokens = list(range(11))
    hashes = prefix_hashes(tokens, 4, 64)
    assert len(hashes) == 2  # only full blocks
    assert hashes[0] == hash_block(b"", tokens[:4])
    assert hashes[1] == hash_block(hashes[0], tokens[4:8])
    assert prefix_hashes(tokens, 4, 1) == hashes[:1]
    assert request_cost(len(tokens), 5) == 16
    assert ReplicaRequest("r", tokens, SamplingParams(max_tokens=5)).cost == 16


def test_make_policy_by_name():
    assert set(ROUTING_POLICIES) == {"prefix_affinity", "power_of_two", "round_robin"}
    for name in ROUTING_POLICIES:
        assert make_policy(name, seed=0).name == name
    assert make_policy("prefix_affinity", slack_tokens=7).slack_tokens == 7
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        make_policy("random")
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("round_robin", slack_tokens=7)  # an option of another policy
    with pytest.raises(ValueError):
        PrefixAffinity(load_factor=0.5)


@pytest.mark.parametrize("name", ROUTING_POLICIES)
def test_every_policy_honours_exclusion_and_forgets_replicas(name):
    policy = make_policy(name, seed=0)
    a = _send(policy, "a", prompt=_prompt(4), cost=10)
    for _ in range(5):  # a retry never goes back to the replica that failed it, while another is left
        ranks = policy.rank(REPLICAS, _route("retry", _prompt(4), exclude=[a]))
        assert a not in [r for group in ranks for r in group] and sorted(sum(ranks, [])) == sorted(set(REPLICAS) - {a})
    assert policy.rank([a], _route("only", exclude=[a])) == [[a]]  # nothing else left: keep it
    assert policy.rank([], _route("none")) == []
    assert policy.load(a) == 10
    policy.forget([r for r in REPLICAS if r != a])
    assert policy.load(a) == 0 and a not in policy.snapshot()["outstanding"]
    policy.on_completed("a")  # its replica is gone: no error


@pytest.mark.parametrize("name", ROUTING_POLICIES)
def test_every_policy_keeps_the_same_load_book(name):
    """Routed costs count until completion; a first choice not routed yet counts too; the replica's own report
    counts when it is larger."""
    policy = make_policy(name, seed=0)
    policy.on_routed(_route("a", cost=100), "r1")
    policy.on_routed(_route("b", cost=10), "r2")
    assert (policy.load("r1"), policy.load("r2"), policy.load("r3")) == (100, 10, 0)
    policy.on_routed(_route("a", cost=100), "r3")  # routed again (a retry): the cost moves
    assert (policy.load("r1"), policy.load("r3")) == (0, 100)
    policy.on_completed("a")
    policy.on_completed("a")  # idempotent
    assert policy.load("r3") == 0
    first = policy.rank(REPLICAS, _route("pending", cost=40))[0][0]
    assert policy.load(first) == 40 + (10 if first == "r2" else 0)
    policy.on_completed("pending")  # cancelled before it was routed
    policy.report("r2", 5000)
    assert policy.load("r2") == 5000


# ------------------------------------------------------------------------------------------------ the policies
def test_prefix_affinity_least_loaded_without_a_known_prefix():
    policy = PrefixAffinity(seed=0)
    policy.on_routed(_route("a", cost=100), "r1")
    policy.on_routed(_route("b", cost=10), "r2")
    assert policy.rank(REPLICAS)[0] == ["r3"]
    policy.on_routed(_route("c", cost=50), "r3")
    assert policy.rank(REPLICAS) == [["r2"], ["r3", "r1"]]


def test_prefix_affinity_sends_a_shared_prefix_to_the_replica_that_holds_it():
    policy = PrefixAffinity(slack_tokens=1000, seed=0)
    shared = _prompt(1, 16)
    policy.on_routed(_route("a", shared + [1, 2, 3, 4], cost=20), "r2")
    policy.on_completed("a")
    other = shared + [9, 9, 9, 9, 9]
    assert policy.rank(REPLICAS, _route("x", other))[0] == ["r2"]
    policy.on_completed("x")
    # the longest matching prefix wins over a shorter one
    policy.on_routed(_route("b", shared[:8], cost=1), "r3")
    policy.on_completed("b")
    assert policy.rank(REPLICAS, _route("y", other))[0] == ["r2"]
    policy.on_completed("y")
    assert policy.affinity_hits == 2
    # no shared block: least loaded
    assert policy.rank(REPLICAS, _route("z", _prompt(2)))[0] == ["r1"]


def test_prefix_affinity_is_bounded_by_load():
    policy = PrefixAffinity(load_factor=1.25, slack_tokens=100, seed=0)
    prompt = _prompt(3)
    policy.on_routed(_route("warm", prompt, cost=10), "r1")
    assert policy.rank(["r1", "r2"], _route("q", prompt))[0] == ["r1"]
    policy.on_completed("q")
    for i in range(20):  # pile work on r1 until it is well above the mean
        policy.on_routed(_route(f"x{i}", cost=50), "r1")
    assert policy.rank(["r1", "r2"], _route("q2", prompt))[0] == ["r2"] and policy.affinity_overloaded == 1


def test_prefix_affinity_spreads_equal_loads():
    policy = PrefixAffinity(seed=0)
    chosen = [_send(policy, f"k{i}") for i in range(6)]
    assert sorted(chosen) == ["r1", "r1", "r2", "r2", "r3", "r3"]


def test_power_of_two_takes_the_less_loaded_of_two_random_replicas():
    policy = PowerOfTwo(seed=1)
    policy.report("r1", 10_000)  # r1 is busy: it is first only if both draws are r1, which cannot happen
    firsts = Counter()
    for i in range(300):
        ranks = policy.rank(REPLICAS, _route(f"q{i}"))
        assert len(ranks[0]) == 1 and sorted(sum(ranks, [])) == REPLICAS
        firsts[ranks[0][0]] += 1
        policy.on_completed(f"q{i}")
    assert firsts["r1"] == 0 and firsts["r2"] > 100 and firsts["r3"] > 100
    # with two replicas the draw is both of them: always the less loaded
    assert all(policy.rank(["r1", "r2"], _route(f"p{i}"))[0] == ["r2"] for i in range(20))


def test_round_robin_takes_replicas_in_turn_whatever_their_order_or_load():
    policy = RoundRobin()
    policy.report("r2", 10_000)
    firsts = [policy.rank(REPLICAS[::-1] if i % 2 else REPLICAS, _route(f"q{i}"))[0][0] for i in range(6)]
    assert firsts == ["r1", "r2", "r3", "r1", "r2", "r3"]
    assert policy.rank(REPLICAS, _route("x")) == [["r1"], ["r2", "r3"]]


# ------------------------------------------------------------------------------------------------ the Serve adapter
DEPLOYMENT = DeploymentID(name="ModelReplica", app_name="gptoss")


class FakeReplica:
    """What the RequestRouter reads of a RunningReplica."""

    def __init__(self, unique_id: str, outstanding_tokens: int | None = None) -> None:
        self.replica_id = ReplicaID(unique_id, DEPLOYMENT)
        self.routing_stats = {} if outstanding_tokens is None else ReplicaLoad(
            ReplicaState.RUNNING, outstanding_tokens, 0, 0, 0.0).to_dict()
        self.max_ongoing_requests = 8
        self.node_id = "node"
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def _request(prompt: list[int], max_tokens: int = 16, **fields) -> ReplicaRequest:
    return ReplicaRequest("r", prompt, SamplingParams(max_tokens=max_tokens),
                          prefix_hashes=tuple(prefix_hashes(prompt, BS, 64)), **fields)


def _pending(request: ReplicaRequest | ChannelOpen, rid: str) -> PendingRequest:
    return PendingRequest(args=[request], kwargs={},
                          metadata=RequestMetadata(request_id=rid, internal_request_id=rid, call_method="submit",
                                                   is_streaming=True))


def _router(policy: str = "prefix_affinity", **options) -> PolicyRequestRouter:
    router = PolicyRequestRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(policy, **options)
    return router


def test_serve_router_affinity_accounting_and_exclusion():
    async def main():
        router = _router(slack_tokens=64)
        replicas = [FakeReplica("a"), FakeReplica("b")]
        router.update_replicas(replicas)
        full = {r.replica_id.to_full_id_str(): r for r in replicas}
        prompt = _prompt(5)
        request = _request(prompt, 8)
        ranks = await router.choose_replicas(replicas, _pending(request, "q1"))
        first = ranks[0][0]
        router.on_request_routed(_pending(request, "q1"), first.replica_id, None)
        assert router.policy.load(first.replica_id.to_full_id_str()) == len(prompt) + 8
        # the same prompt follows its prefix even though that replica is busier
        ranks = await router.choose_replicas(replicas, _pending(request, "q2"))
        assert ranks[0] == [first]
        router.on_request_completed(first.replica_id, "q1")
        # q2 was ranked but not routed yet: its cost counts on its first choice until it is routed or ends
        assert router.policy.load(first.replica_id.to_full_id_str()) == len(prompt) + 8
        router.on_request_completed(first.replica_id, "q2")
        assert router.policy.load(first.replica_id.to_full_id_str()) == 0
        # a retry excludes the replica that failed
        retry = dataclasses.replace(request, exclude_replicas=(first.replica_id.to_full_id_str(),))
        ranks = await router.choose_replicas(replicas, _pending(retry, "q3"))
        assert first not in [r for rank in ranks for r in rank]
        # the router's hashes decide (a request with another prompt but the same hashes goes the same way)
        hinted = dataclasses.replace(_request(_prompt(6)), prefix_hashes=request.prefix_hashes)
        ranks = await router.choose_replicas(replicas, _pending(hinted, "q4"))
        assert ranks[0] == [first]
        # replicas' own reports (routing stats, ReplicaLoad's dict form) push load away
        busy = FakeReplica(first.replica_id.unique_id, outstanding_tokens=10_000)
        other = next(r for k, r in full.items() if k != first.replica_id.to_full_id_str())
        ranks = await router.choose_replicas([busy, other], _pending(request, "q5"))
        assert ranks[0] == [other]
        # calls that are not generate requests (model_info) just get the least loaded
        ranks = await router.choose_replicas(replicas, None)
        assert len(ranks[0]) == 1
        # a token-channel call goes to the replica it names, and nowhere while that one is gone
        target = other.replica_id.to_full_id_str()
        channel = ChannelOpen("r", target)
        assert await router.choose_replicas(replicas, _pending(channel, "c1")) == [[other]]
        assert await router.choose_replicas([first], _pending(channel, "c2")) == []
        # a replica that left is forgotten
        router.update_replicas([other])
        assert first.replica_id.to_full_id_str() not in router.policy.snapshot()["reported"]

    asyncio.run(main())


def test_a_burst_ranked_before_any_is_routed_spreads_over_the_replicas():
    """Serve ranks a burst's requests before it routes the first (it probes the chosen replica's queue first): each
    first choice counts on its replica at once, so the burst alternates instead of piling onto one replica."""
    async def main():
        router = _router()
        replicas = [FakeReplica("a"), FakeReplica("b")]
        router.update_replicas(replicas)
        # an older imbalance in requests routed (the tie-break) must not send the whole burst one way
        router.policy.on_routed(RouteRequest("old"), replicas[0].replica_id.to_full_id_str())
        firsts = []
        for i in range(8):
            ranks = await router.choose_replicas(replicas, _pending(_request([300 + i, 1, 2], 200), f"b{i}"))
            firsts.append(ranks[0][0].replica_id.unique_id)
        assert sorted(firsts) == ["a"] * 4 + ["b"] * 4
        # routing (to the first choice or elsewhere) replaces the provisional cost; completion removes it
        b = replicas[1].replica_id
        for i in range(8):
            router.on_request_routed(_pending(_request([300 + i, 1, 2], 200), f"b{i}"), b, None)
        assert router.policy.load(b.to_full_id_str()) == 8 * 203
        assert router.policy.load(replicas[0].replica_id.to_full_id_str()) == 0
        for i in range(8):
            router.on_request_completed(b, f"b{i}")
        assert router.policy.load(b.to_full_id_str()) == 0

    asyncio.run(main())


@pytest.mark.parametrize("name", ROUTING_POLICIES)
def test_serve_router_runs_every_policy_by_name(name):
    async def main():
        router = _router(name)
        assert router.policy.name == name
        replicas = [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
        router.update_replicas(replicas)
        seen = set()
        for i in range(12):
            ranks = await router.choose_replicas(replicas, _pending(_request(_prompt(10 + i)), f"q{i}"))
            assert sorted(r.replica_id.unique_id for group in ranks for r in group) == ["a", "b", "c"]
            router.on_request_routed(_pending(_request(_prompt(10 + i)), f"q{i}"), ranks[0][0].replica_id, None)
            seen.add(ranks[0][0].replica_id.unique_id)
        assert len(seen) >= 2  # distinct prompts spread, whichever the policy

    asyncio.run(main())
