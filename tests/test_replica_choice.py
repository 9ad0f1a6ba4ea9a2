"""Replica choice: prefix-cache affinity bounded by load, least outstanding tokens, exclusion (retries), and the
Ray Serve RequestRouter plug-in driven the way Serve drives it (no cluster needed)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from gptoss_cluster.cluster.contract import ChannelOpen, ReplicaLoad, ReplicaRequest, ReplicaState, request_cost
from gptoss_cluster.cluster.router.replica_choice import AffinityPolicy, PrefixAffinityRouter, prefix_hashes
from gptoss_cluster.workers.block_hash import hash_block
from gptoss_cluster.workers.sampling import SamplingParams

BS = 4


def _prompt(seed: int, n: int = 24) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


# ------------------------------------------------------------------------------------------------ the policy
def test_prefix_hashes_match_the_engine_hash_chain():
    tokens = list(range(11))
    hashes = prefix_hashes(tokens, 4, 64)
    assert len(hashes) == 2  # only full blocks
    assert hashes[0] == hash_block(b"", tokens[:4])
    assert hashes[1] == hash_block(hashes[0], tokens[4:8])
    assert prefix_hashes(tokens, 4, 1) == hashes[:1]
    assert request_cost(len(tokens), 5) == 16
    assert ReplicaRequest("r", tokens, SamplingParams(max_tokens=5)).cost == 16


def test_least_outstanding_tokens_without_affinity():
    policy = AffinityPolicy(block_size=BS, seed=0)
    policy.routed("a", "r1", cost=100)
    policy.routed("b", "r2", cost=10)
    assert policy.rank(["r1", "r2", "r3"])[0] == ["r3"]
    policy.routed("c", "r3", cost=50)
    ranks = policy.rank(["r1", "r2", "r3"])
    assert ranks == [["r2"], ["r3", "r1"]]
    policy.completed("a")
    policy.completed("a")  # idempotent
    assert policy.rank(["r1", "r2", "r3"])[0] == ["r1"]


def test_shared_prefix_goes_to_the_replica_that_holds_it():
    policy = AffinityPolicy(block_size=BS, slack_tokens=1000, seed=0)
    shared = _prompt(1, 16)
    first = policy.hashes(shared + [1, 2, 3, 4])
    policy.routed("a", "r2", first, cost=20)
    policy.completed("a")
    other = policy.hashes(shared + [9, 9, 9, 9, 9])
    assert policy.rank(["r1", "r2", "r3"], other)[0] == ["r2"]
    # the longest matching prefix wins over a shorter one
    policy.routed("b", "r3", policy.hashes(shared[:8]), cost=1)
    policy.completed("b")
    assert policy.rank(["r1", "r2", "r3"], other)[0] == ["r2"]
    assert policy.affinity_hits == 2
    # no shared block: least loaded
    assert policy.rank(["r1", "r2", "r3"], policy.hashes(_prompt(2)))[0] == ["r1"]  # idle and least used


def test_affinity_is_bounded_by_load():
    policy = AffinityPolicy(block_size=BS, load_factor=1.25, slack_tokens=100, seed=0)
    hashes = policy.hashes(_prompt(3))
    policy.routed("warm", "r1", hashes, cost=10)
    assert policy.rank(["r1", "r2"], hashes)[0] == ["r1"]
    for i in range(20):  # pile work on r1 until it is well above the mean
        policy.routed(f"x{i}", "r1", cost=50)
    ranks = policy.rank(["r1", "r2"], hashes)
    assert ranks[0] == ["r2"] and policy.affinity_overloaded == 1
    # the replica's own report (every router's requests) counts too
    fresh = AffinityPolicy(block_size=BS, slack_tokens=0, seed=0)
    fresh.routed("k", "r1", hashes, cost=1)
    fresh.completed("k")
    fresh.report("r1", 5000)
    assert fresh.rank(["r1", "r2"], hashes)[0] == ["r2"]
    assert fresh.load("r1") == 5000


def test_exclusion_and_forgetting_replicas():
    policy = AffinityPolicy(block_size=BS, seed=0)
    hashes = policy.hashes(_prompt(4))
    policy.routed("a", "r1", hashes, cost=1)
    assert policy.rank(["r1", "r2"], hashes, exclude=["r1"]) == [["r2"]]
    assert policy.rank(["r1"], hashes, exclude=["r1"]) == [["r1"]]  # nothing else left: keep it
    assert policy.rank([], hashes) == []
    policy.forget_replicas(["r2"])
    snap = policy.snapshot()
    assert snap["prefixes"] == 0 and snap["outstanding"] == {}
    policy.completed("a")  # its replica is gone: no error


def test_equal_loads_spread_over_replicas():
    policy = AffinityPolicy(block_size=BS, seed=0)
    chosen = []
    for i in range(6):
        replica = policy.rank(["r1", "r2", "r3"])[0][0]
        policy.routed(f"k{i}", replica, cost=0)
        chosen.append(replica)
    assert sorted(chosen) == ["r1", "r1", "r2", "r2", "r3", "r3"]


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError):
        AffinityPolicy(load_factor=0.5)
    with pytest.raises(ValueError):
        AffinityPolicy(block_size=0)


# ------------------------------------------------------------------------------------------------ the Serve router
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
    return ReplicaRequest("r", prompt, SamplingParams(max_tokens=max_tokens), **fields)


def _pending(request: ReplicaRequest | ChannelOpen, rid: str) -> PendingRequest:
    return PendingRequest(args=[request], kwargs={},
                          metadata=RequestMetadata(request_id=rid, internal_request_id=rid, call_method="generate",
                                                   is_streaming=True))


def _router() -> PrefixAffinityRouter:
    router = PrefixAffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(block_size=BS, slack_tokens=64)
    return router


def test_serve_router_affinity_accounting_and_exclusion():
    async def main():
        router = _router()
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
        # precomputed hashes from the router are used as given
        hinted = _request(_prompt(6), prefix_hashes=tuple(prefix_hashes(prompt, BS, 64)))
        ranks = await router.choose_replicas(replicas, _pending(hinted, "q4"))
        assert ranks[0] == [first]
        # replicas' own reports (routing stats) push load away
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
        router.policy.routed("old", replicas[0].replica_id.to_full_id_str(), (), 0)
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
