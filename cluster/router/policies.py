"""Which replica serves a request: routing policies, one small object each behind one interface (no Ray here).

A policy ranks the candidate replicas for a request, best first, as groups (`[[first choice], [next], [the rest]]`:
the shape of Serve's `RequestRouter.choose_replicas`, which takes the first group with a replica below its
`max_ongoing_requests`), and keeps the load book every policy shares: the tokens each replica may still have to
hold for this router's requests (`request_cost`, from routing to completion), the replicas' own reports (every
router's requests), and the provisional cost of a first choice that is not routed yet (Serve probes the chosen
replica's queue before it routes, and meanwhile the rest of a burst is ranked: without it, the whole burst would see
the same loads and pile onto one replica). Replicas a request excludes (the router's retry after a replica failed)
are passed over while any other is left.

- `PrefixAffinity`: the replica that last took the request's longest known prompt prefix (the prefix-cache hash chain,
  `workers.block_hash`), as long as its load stays within `load_factor` x the mean load + `slack_tokens` (consistent
  hashing with bounded loads); otherwise, and for new prefixes, the least loaded.
- `PowerOfTwo`: two candidates drawn at random, the less loaded first (the power of two choices).
- `RoundRobin`: the candidates in turn.

`make_policy(name, **options)` builds one by name (`ROUTING_POLICIES`); the Serve adapter is
`cluster.router.serve_routing`, the in-process `LocalBackend` uses a policy directly.
"""

from __future__ import annotations

import abc
import itertools
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["ROUTING_POLICIES", "PowerOfTwo", "PrefixAffinity", "RoundRobin", "RouteRequest", "RoutingPolicy",
           "make_policy"]

CHOSEN_TTL_S = 5.0  # how long a first choice that was never routed counts on its replica


@dataclass(slots=True)
class RouteRequest:
    """What a policy sees of a request: its key (unique among this router's requests in flight), the hash chain of
    its prompt's leading KV blocks, its cost (`cluster.contract.request_cost`), and the replicas to avoid."""

    key: str
    prefix_hashes: Sequence[bytes] = ()
    cost: int = 0
    exclude: Sequence[str] = ()


class RoutingPolicy(abc.ABC):
    """Ranks replicas for requests and keeps the load book (thread-safe: Serve may call from several threads)."""

    name: ClassVar[str]

    def __init__(self, *, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._outstanding: dict[str, int] = {}  # replica -> cost of this router's requests routed there, unfinished
        self._reported: dict[str, int] = {}  # replica -> outstanding tokens the replica itself reported
        self._inflight: dict[str, tuple[str, int]] = {}  # request key -> (replica, cost)
        self._chosen: dict[str, tuple[str, int, float]] = {}  # request key -> (first choice, cost, when): not routed
        self._routed: dict[str, int] = {}  # replica -> requests routed there (breaks ties between equal loads)

    # ------------------------------------------------------------------------------------------------ the decision
    def rank(self, candidates: Iterable[str], request: RouteRequest | None = None) -> list[list[str]]:
        """The candidates in preference order, in groups; a request's first choice counts on its replica until
        the request is routed (`on_routed`) or forgotten (`on_completed`, or CHOSEN_TTL_S)."""
        candidates = list(dict.fromkeys(candidates))
        excluded = set(request.exclude) if request is not None else set()
        allowed = [c for c in candidates if c not in excluded] or candidates
        if not allowed:
            return []
        with self._lock:
            chosen = self._chosen_costs()
            loads = {c: max(self._outstanding.get(c, 0) + chosen.get(c, 0), self._reported.get(c, 0))
                     for c in allowed}
            ranks = [group for group in self._rank(allowed, loads, request) if group]
            if request is not None and ranks:
                self._chosen[request.key] = (ranks[0][0], request.cost, time.monotonic())
        return ranks

    @abc.abstractmethod
    def _rank(self, allowed: list[str], loads: dict[str, int], request: RouteRequest | None) -> list[list[str]]:
        """The policy's own order of `allowed` (non-empty, no duplicates), given each one's load; under the lock."""

    def _by_load(self, replicas: Iterable[str], loads: dict[str, int]) -> list[str]:
        """Least loaded first; equal loads: the replica that took fewer requests, then at random."""
        return sorted(replicas, key=lambda c: (loads[c], self._routed.get(c, 0), self._rng.random()))

    # ------------------------------------------------------------------------------------------------ the load book
    def on_routed(self, request: RouteRequest, replica: str) -> None:
        """`request` went to `replica`: its cost counts there until `on_completed`."""
        with self._lock:
            self._chosen.pop(request.key, None)
            previous = self._inflight.pop(request.key, None)
            if previous is not None:  # routed again (a retry): move its cost
                self._release(*previous)
            self._inflight[request.key] = (replica, request.cost)
            self._outstanding[replica] = self._outstanding.get(replica, 0) + request.cost
            self._routed[replica] = self._routed.get(replica, 0) + 1
            self._on_routed(request, replica)

    def _on_routed(self, request: RouteRequest, replica: str) -> None:
        """What the policy itself learns from a routed request (under the lock); nothing by default."""
        return None

    def on_completed(self, key: str) -> None:
        with self._lock:
            self._chosen.pop(key, None)
            entry = self._inflight.pop(key, None)
            if entry is not None:
                self._release(*entry)

    def report(self, replica: str, outstanding_tokens: int) -> None:
        """The replica's own count of outstanding tokens (`ReplicaLoad`: every router's requests)."""
        with self._lock:
            self._reported[replica] = int(outstanding_tokens)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop everything known about replicas not in `keep` (they stopped or died)."""
        keep = set(keep)
        with self._lock:
            for table in (self._outstanding, self._reported, self._routed):
                for replica in [r for r in table if r not in keep]:
                    del table[replica]
            for key in [k for k, (r, _) in self._inflight.items() if r not in keep]:
                del self._inflight[key]
            for key in [k for k, (r, _, _) in self._chosen.items() if r not in keep]:
                del self._chosen[key]
            self._forget(keep)

    def _forget(self, keep: set[str]) -> None:
        """Drop the policy's own state about replicas not in `keep` (under the lock); none by default."""
        return None

    def load(self, replica: str) -> int:
        """The load the policy ranks `replica` by: this router's outstanding tokens there (routed, or chosen and not
        routed yet), or the replica's own report when larger."""
        with self._lock:
            chosen = self._chosen_costs().get(replica, 0)
            return max(self._outstanding.get(replica, 0) + chosen, self._reported.get(replica, 0))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"policy": self.name, "outstanding": dict(self._outstanding), "reported": dict(self._reported),
                    "inflight": len(self._inflight)}

    def _chosen_costs(self) -> dict[str, int]:
        """replica -> cost of the first choices not routed yet (dropping those older than CHOSEN_TTL_S)."""
        now = time.monotonic()
        cost: dict[str, int] = {}
        for key, (replica, tokens, when) in list(self._chosen.items()):
            if now - when > CHOSEN_TTL_S:  # never routed (cancelled while pending): forget it
                del self._chosen[key]
            else:
                cost[replica] = cost.get(replica, 0) + tokens
        return cost

    def _release(self, replica: str, cost: int) -> None:
        left = self._outstanding.get(replica, 0) - cost
        if left > 0:
            self._outstanding[replica] = left
        else:
            self._outstanding.pop(replica, None)


class PrefixAffinity(RoutingPolicy):
    """The replica holding the request's longest known prefix while its load is within bounds, else least loaded."""

    name = "prefix_affinity"

    def __init__(self, *, load_factor: float = 1.25, slack_tokens: int = 2048, max_entries: int = 200_000,
                 seed: int | None = None) -> None:
        if load_factor < 1 or slack_tokens < 0 or max_entries < 1:
            raise ValueError("load_factor >= 1, slack_tokens >= 0 and max_entries >= 1 are required")
        super().__init__(seed=seed)
        self.load_factor = load_factor
        self.slack_tokens = slack_tokens
        self.max_entries = max_entries
        self._owner: OrderedDict[bytes, str] = OrderedDict()  # prefix hash -> replica it was last routed to
        self.affinity_hits = 0
        self.affinity_overloaded = 0

    def _rank(self, allowed: list[str], loads: dict[str, int], request: RouteRequest | None) -> list[list[str]]:
        order = self._by_load(allowed, loads)
        affine = None
        if request is not None:
            allowed_set = set(allowed)
            for h in reversed(request.prefix_hashes):
                owner = self._owner.get(h)
                if owner is not None and owner in allowed_set:
                    affine = owner
                    break
        if affine is not None:
            mean = sum(loads.values()) / len(loads)
            if loads[affine] <= self.load_factor * mean + self.slack_tokens:
                self.affinity_hits += 1
                rest = [c for c in order if c != affine]
                return [[affine], rest[:1], rest[1:]]
            self.affinity_overloaded += 1
        return [order[:1], order[1:]]

    def _on_routed(self, request: RouteRequest, replica: str) -> None:
        for h in request.prefix_hashes:  # the replica's prefix cache holds these now
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def _forget(self, keep: set[str]) -> None:
        for h in [h for h, r in self._owner.items() if r not in keep]:
            del self._owner[h]

    def snapshot(self) -> dict[str, Any]:
        out = super().snapshot()
        with self._lock:
            out.update(prefixes=len(self._owner), affinity_hits=self.affinity_hits,
                       affinity_overloaded=self.affinity_overloaded)
        return out


class PowerOfTwo(RoutingPolicy):
    """Two candidates at random, the less loaded first, then the other, then the rest by load."""

    name = "power_of_two"

    def _rank(self, allowed: list[str], loads: dict[str, int], request: RouteRequest | None) -> list[list[str]]:
        pair = self._by_load(self._rng.sample(allowed, min(2, len(allowed))), loads)
        return [[r] for r in pair] + [self._by_load((c for c in allowed if c not in pair), loads)]


class RoundRobin(RoutingPolicy):
    """The candidates in turn (sorted, so that the turn does not depend on the order they come in)."""

    name = "round_robin"

    def __init__(self, *, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        self._turn = itertools.count()

    def _rank(self, allowed: list[str], loads: dict[str, int], request: RouteRequest | None) -> list[list[str]]:
        ring = sorted(allowed)
        at = next(self._turn) % len(ring)
        ring = ring[at:] + ring[:at]
        return [ring[:1], ring[1:]]


_POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (PrefixAffinity, PowerOfTwo, RoundRobin)}
ROUTING_POLICIES = tuple(_POLICIES)


def make_policy(name: str = "prefix_affinity", **options: Any) -> RoutingPolicy:
    """The policy called `name` (one of ROUTING_POLICIES) with its options (PrefixAffinity: load_factor,
    slack_tokens, max_entries; every policy: seed)."""
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(ROUTING_POLICIES)}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"routing policy {name!r}: {exc}") from None
