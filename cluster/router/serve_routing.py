"""A routing policy as Ray Serve's request router of the ModelReplica deployment: a thin adapter.

Set on the deployment with `request_router_config=RequestRouterConfig(request_router_class=PolicyRequestRouter,
request_router_kwargs={"policy": "prefix_affinity"})` (cluster.app does, from the `routing_policy` argument). Serve
runs it in each caller's process (the Router replicas) and asks it to rank the replicas for every call; it probes
the ranked replicas' queue lengths in order and picks the first group with a replica below its
`max_ongoing_requests`, so a full replica is passed over without waiting. The decision itself is the policy's
(`cluster.router.policies`); this class only translates Serve's objects into the policy's and back.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from gptoss_cluster.cluster.contract import ChannelOpen, ReplicaLoad, ReplicaRequest
from gptoss_cluster.cluster.router.policies import RouteRequest, RoutingPolicy, make_policy

__all__ = ["PolicyRequestRouter"]


def _argument(pending_request: PendingRequest | None) -> Any:
    if pending_request is None or not pending_request.args:
        return None
    return pending_request.args[0]


def _route_request(pending_request: PendingRequest | None) -> RouteRequest | None:
    """The policy's view of a `submit` call (None for any other call: model_info, stats)."""
    request = _argument(pending_request)
    if not isinstance(request, ReplicaRequest):
        return None
    return RouteRequest(pending_request.metadata.internal_request_id, request.prefix_hashes, request.cost,
                        request.exclude_replicas)


class PolicyRequestRouter(MultiplexMixin, RequestRouter):
    """Serve's request router over a `RoutingPolicy` (see the module docstring).

    Token-channel calls (`ChannelOpen`) name their replica and are sent there only; they also carry it as their
    multiplexed model id, which makes Serve hand the replica routed for them to them and not to the oldest pending
    request (`MultiplexMixin`: matching by model id; we use none of its model placement).
    """

    policy: RoutingPolicy

    def initialize_state(self, policy: str = "prefix_affinity", **options: Any) -> None:
        self.policy = make_policy(policy, **options)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id: dict[str, RunningReplica] = {}
        for replica in candidate_replicas:
            key = replica.replica_id.to_full_id_str()
            by_id[key] = replica
            if replica.routing_stats:  # {} until the replica's first report
                self.policy.report(key, ReplicaLoad.from_dict(replica.routing_stats).outstanding_tokens)
        argument = _argument(pending_request)
        if isinstance(argument, ChannelOpen):  # nothing when it is gone: the channel's open timeout fails its requests
            target = argument.target_replica
            return [[by_id[target]]] if target in by_id else []
        ranks = self.policy.rank(by_id, _route_request(pending_request))
        return [[by_id[key] for key in group] for group in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        route = _route_request(pending_request)
        if route is not None:
            self.policy.on_routed(route, replica_id.to_full_id_str())

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.policy.on_completed(internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.policy.forget(r.replica_id.to_full_id_str() for r in replicas)
