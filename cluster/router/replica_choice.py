"""Which ModelReplica serves a request: prefix-cache affinity bounded by load, else least outstanding tokens.

`AffinityPolicy` is the decision, free of Ray: it hashes the prompt's leading KV blocks with the engine's own hash
chain (`workers.block_hash`, so "same hash" means "the replica's prefix cache can hold it"),
remembers which replica each hashed prefix was last sent to, and keeps an estimate of every replica's outstanding
tokens (prompt + max_tokens of the requests it routed that have not finished, and of those it ranked but Serve has
not routed yet, on their first choice; replicas also report their own figure through Serve's routing stats, and the
larger of the two counts). For a request it ranks the replicas:

1. the replica that holds the longest matching prefix, if its load is within bounds
   (`load <= load_factor * mean load + slack_tokens`, consistent hashing with bounded loads); otherwise
2. the replica with the fewest outstanding tokens, then the rest by load.

Replicas named in the request's `exclude_replicas` (the router's retry after a replica failed) are skipped while
any other is left.

`PrefixAffinityRouter` plugs the policy into Ray Serve 2.60 as a custom request router (`ray.serve.request_router.
RequestRouter`): set on the ModelReplica deployment with
`request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter, request_router_kwargs={...})`.
Serve then probes the ranked replicas' queue lengths in order and picks the first rank with a replica below its
`max_ongoing_requests`, so a full replica is passed over without waiting.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from gptoss_cluster.cluster.contract import ChannelOpen, ReplicaLoad, ReplicaRequest
from gptoss_cluster.workers.block_hash import prefix_hashes

__all__ = ["AffinityPolicy", "PrefixAffinityRouter", "prefix_hashes"]

CHOSEN_TTL_S = 5.0  # how long a choice not yet routed counts on its replica


class AffinityPolicy:
    """Prefix affinity with bounded load, least outstanding tokens otherwise (thread-safe; no Ray)."""

    def __init__(self, *, block_size: int = 16, max_prefix_blocks: int = 32, load_factor: float = 1.25,
                 slack_tokens: int = 2048, max_entries: int = 200_000, seed: int | None = None) -> None:
        if block_size < 1 or max_prefix_blocks < 0 or load_factor < 1 or slack_tokens < 0 or max_entries < 1:
            raise ValueError("block_size >= 1, max_prefix_blocks >= 0, load_factor >= 1, slack_tokens >= 0 and "
                             "max_entries >= 1 are required")
        self.block_size = block_size
        self.max_prefix_blocks = max_prefix_blocks
        self.load_factor = load_factor
        self.slack_tokens = slack_tokens
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._owner: OrderedDict[bytes, str] = OrderedDict()  # prefix hash -> replica it was last routed to
        self._outstanding: dict[str, int] = {}  # replica -> tokens of this router's unfinished requests
        self._reported: dict[str, int] = {}  # replica -> outstanding tokens the replica itself reported
        self._inflight: dict[str, tuple[str, int]] = {}  # request key -> (replica, cost)
        self._routed: dict[str, int] = {}  # replica -> requests routed (tie-break: spread equal loads)
        # request key -> (replica, cost, when): chosen but not yet routed. Serve probes the chosen replica's queue
        # before it routes (an await), and meanwhile the other requests of a burst are ranked: without this they
        # would all see the same loads and pile onto the same replica.
        self._chosen: dict[str, tuple[str, int, float]] = {}
        self._rng = random.Random(seed)
        self.affinity_hits = 0
        self.affinity_overloaded = 0

    # ------------------------------------------------------------------------------------------------ inputs
    def hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        return prefix_hashes(token_ids, self.block_size, self.max_prefix_blocks)

    def report(self, replica: str, outstanding_tokens: int) -> None:
        """The replica's own count of outstanding tokens (routing stats: every router's requests)."""
        with self._lock:
            self._reported[replica] = int(outstanding_tokens)

    def load(self, replica: str) -> int:
        with self._lock:
            return self._load(replica, self._chosen_costs())

    def _load(self, replica: str, chosen: Mapping[str, int]) -> int:
        return max(self._outstanding.get(replica, 0) + chosen.get(replica, 0), self._reported.get(replica, 0))

    def _chosen_costs(self) -> dict[str, int]:
        """replica -> cost of the requests chosen for it and not routed yet (dropping choices older than the TTL)."""
        now = time.monotonic()
        cost: dict[str, int] = {}
        for key, (replica, tokens, when) in list(self._chosen.items()):
            if now - when > CHOSEN_TTL_S:  # never routed (cancelled while pending): forget it
                del self._chosen[key]
            else:
                cost[replica] = cost.get(replica, 0) + tokens
        return cost

    def chosen(self, key: str, replica: str, cost: int) -> None:
        """`replica` is the first choice for request `key`, not routed yet: count its cost there meanwhile."""
        with self._lock:
            self._chosen[key] = (replica, cost, time.monotonic())

    # ------------------------------------------------------------------------------------------------ decision
    def rank(self, candidates: Iterable[str], hashes: Sequence[bytes] = (),
             exclude: Iterable[str] = ()) -> list[list[str]]:
        """Candidates in preference order, as Serve's ranks: [[affine], [least loaded], [the rest]]."""
        candidates = list(dict.fromkeys(candidates))
        excluded = set(exclude)
        allowed = [c for c in candidates if c not in excluded] or candidates
        if not allowed:
            return []
        with self._lock:
            chosen = self._chosen_costs()
            loads = {c: self._load(c, chosen) for c in allowed}
            order = sorted(allowed, key=lambda c: (loads[c], self._routed.get(c, 0), self._rng.random()))
            affine = None
            allowed_set = set(allowed)
            for h in reversed(hashes):
                owner = self._owner.get(h)
                if owner is not None and owner in allowed_set:
                    affine = owner
                    break
            if affine is not None:
                mean = sum(loads.values()) / len(loads)
                if loads[affine] <= self.load_factor * mean + self.slack_tokens:
                    self.affinity_hits += 1
                    rest = [c for c in order if c != affine]
                    return [[affine]] + ([[rest[0]]] if rest else []) + ([rest[1:]] if len(rest) > 1 else [])
                self.affinity_overloaded += 1
        return [[order[0]]] + ([order[1:]] if len(order) > 1 else [])

    def routed(self, key: str, replica: str, hashes: Sequence[bytes] = (), cost: int = 0) -> None:
        """The request `key` went to `replica`: it owns the request's prefixes now and carries its cost."""
        with self._lock:
            self._chosen.pop(key, None)
            previous = self._inflight.pop(key, None)
            if previous is not None:  # routed again (a retry): move its cost
                self._sub(*previous)
            self._inflight[key] = (replica, cost)
            self._outstanding[replica] = self._outstanding.get(replica, 0) + cost
            self._routed[replica] = self._routed.get(replica, 0) + 1
            for h in hashes:
                self._owner[h] = replica
                self._owner.move_to_end(h)
            while len(self._owner) > self.max_entries:
                self._owner.popitem(last=False)

    def completed(self, key: str) -> None:
        with self._lock:
            self._chosen.pop(key, None)
            entry = self._inflight.pop(key, None)
            if entry is not None:
                self._sub(*entry)

    def _sub(self, replica: str, cost: int) -> None:
        left = self._outstanding.get(replica, 0) - cost
        if left > 0:
            self._outstanding[replica] = left
        else:
            self._outstanding.pop(replica, None)

    def forget_replicas(self, keep: Iterable[str]) -> None:
        """Drop everything known about replicas not in `keep` (they stopped or died)."""
        keep = set(keep)
        with self._lock:
            for table in (self._outstanding, self._reported, self._routed):
                for replica in [r for r in table if r not in keep]:
                    del table[replica]
            for h in [h for h, r in self._owner.items() if r not in keep]:
                del self._owner[h]
            for key in [k for k, (r, _) in self._inflight.items() if r not in keep]:
                del self._inflight[key]
            for key in [k for k, (r, _, _) in self._chosen.items() if r not in keep]:
                del self._chosen[key]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"outstanding": dict(self._outstanding), "reported": dict(self._reported),
                    "prefixes": len(self._owner), "affinity_hits": self.affinity_hits,
                    "affinity_overloaded": self.affinity_overloaded}


def _request_of(pending_request: PendingRequest | None) -> ReplicaRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    request = pending_request.args[0]
    return request if isinstance(request, ReplicaRequest) else None


def _target_of(pending_request: PendingRequest | None) -> str | None:
    """The replica a token-channel call must reach (`ServeBackend` opens one per replica), else None."""
    if pending_request is None or not pending_request.args:
        return None
    request = pending_request.args[0]
    return request.target_replica if isinstance(request, ChannelOpen) else None


class PrefixAffinityRouter(MultiplexMixin, RequestRouter):
    """Ray Serve request router of the ModelReplica deployment (see the module docstring).

    Token-channel calls name their replica (`target_replica`) and are sent there only; they also carry it as their
    multiplexed model id, which makes Serve hand the replica routed for them to them and not to the oldest pending
    request (`MultiplexMixin`: matching by model id; we use none of its model placement).
    """

    def initialize_state(self, block_size: int = 16, max_prefix_blocks: int = 32, load_factor: float = 1.25,
                         slack_tokens: int = 2048, **_: Any) -> None:
        self.policy = AffinityPolicy(block_size=block_size, max_prefix_blocks=max_prefix_blocks,
                                     load_factor=load_factor, slack_tokens=slack_tokens)

    def _prepare(self, pending_request: PendingRequest | None) -> tuple[Sequence[bytes], int, Sequence[str]]:
        request = _request_of(pending_request)
        if request is None:
            return (), 0, ()
        hashes = request.prefix_hashes or self.policy.hashes(request.prompt_token_ids)  # the router hashes once
        return hashes, request.cost, request.exclude_replicas

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id: dict[str, RunningReplica] = {}
        for replica in candidate_replicas:
            key = replica.replica_id.to_full_id_str()
            by_id[key] = replica
            if replica.routing_stats:  # {} until the replica's first report
                self.policy.report(key, ReplicaLoad.from_dict(replica.routing_stats).outstanding_tokens)
        target = _target_of(pending_request)
        if target is not None:  # nothing when it is gone: the channel's open timeout fails its requests
            return [[by_id[target]]] if target in by_id else []
        hashes, cost, exclude = self._prepare(pending_request)
        ranks = self.policy.rank(by_id, hashes, exclude)
        if ranks and pending_request is not None and _request_of(pending_request) is not None:
            self.policy.chosen(pending_request.metadata.internal_request_id, ranks[0][0], cost)
        return [[by_id[k] for k in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes, cost, _ = self._prepare(pending_request)
        if _request_of(pending_request) is not None:
            self.policy.routed(pending_request.metadata.internal_request_id, replica_id.to_full_id_str(), hashes,
                               cost)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.policy.completed(internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.policy.forget_replicas(r.replica_id.to_full_id_str() for r in replicas)
