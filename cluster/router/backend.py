"""Where the router sends requests: the `Backend` interface, and `LocalBackend` (replica cores in this process).

A backend speaks `cluster.contract`: `stream(ReplicaRequest)` yields the replica's `Accepted`, then its `Delta`s or a
`ReplicaError`; closing the stream cancels the request on its replica. Infrastructure failures (a replica died or
cannot be reached) raise `BackendError`, so that the router retries once before the first token and answers
UNAVAILABLE otherwise. `load_lora` / `unload_lora` apply to every replica and answer each one's `LoraResult`.

- `cluster.router.serve_backend.ServeBackend(handle)`: the production path, ModelReplica replicas behind a Serve
  deployment handle (the replica is chosen by the deployment's request router, `cluster.router.serve_routing`).
- `LocalBackend(cores)`: `ReplicaCore`s (or the tests' scripted cores) in this process, chosen by a routing policy
  (`cluster.router.policies`): tests, benchmarks, and a single-process server without Ray.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gptoss_cluster.cluster.contract import (
    Accepted,
    LoadLora,
    LoraResult,
    ModelInfo,
    ReplicaEvent,
    ReplicaRequest,
    ReplicaState,
    ReplicaStats,
    UnloadLora,
)
from gptoss_cluster.cluster.lora_registry import AdapterStore
from gptoss_cluster.cluster.router.policies import PrefixAffinity, RouteRequest, RoutingPolicy

__all__ = ["Backend", "BackendError", "LocalBackend"]


class BackendError(Exception):
    """The request could not be run or continued because of the infrastructure (replica died, unreachable)."""


class Backend(abc.ABC):
    # Where the router records what its `load_lora` / `unload_lora` did, for the replicas that start later
    # (cluster.lora_registry); None: not recorded (a later replica serves its start-up adapters only).
    adapter_registry: AdapterStore | None = None

    @abc.abstractmethod
    def stream(self, request: ReplicaRequest) -> AsyncIterator[ReplicaEvent]:
        """The replica's events for `request` (first `Accepted`); closing it cancels the request."""

    @abc.abstractmethod
    async def replica_stats(self) -> list[ReplicaStats]:
        """The statistics of every replica that answered (empty when none)."""

    @abc.abstractmethod
    async def model_info(self) -> ModelInfo:
        """Model facts from a replica (raises BackendError when none can answer)."""

    @abc.abstractmethod
    async def load_lora(self, request: LoadLora) -> list[LoraResult]:
        """Every running replica's result of registering the adapter (empty when none answered)."""

    @abc.abstractmethod
    async def unload_lora(self, request: UnloadLora) -> list[LoraResult]:
        """Every running replica's result of forgetting the adapter (empty when none answered)."""

    async def close(self) -> None:
        return None


class LocalBackend(Backend):
    """Replica cores in this process (no Ray), chosen by `policy` (default: prefix affinity bounded by load)."""

    def __init__(self, cores: Sequence[Any], policy: RoutingPolicy | None = None,
                 adapter_registry: AdapterStore | None = None) -> None:
        self.cores = list(cores)
        self.adapter_registry = adapter_registry  # a core added later starts with its changes (adapter_changes=)
        self.policy = policy or PrefixAffinity()
        self.failing: set[str] = set()  # replica ids whose next stream fails (tests of the retry path)
        self._keys = itertools.count()  # the policy's key of each routed request (unique in this backend)

    async def stream(self, request: ReplicaRequest) -> AsyncIterator[ReplicaEvent]:
        by_id = {c.replica_id: c for c in self.cores if c.state is ReplicaState.RUNNING}
        if not by_id:
            raise BackendError("no replica is running")
        route = RouteRequest(f"local-{next(self._keys)}", request.prefix_hashes, request.cost,
                             request.exclude_replicas)
        core = by_id[self.policy.rank(by_id, route)[0][0]]
        self.policy.on_routed(route, core.replica_id)
        try:
            if core.replica_id in self.failing:
                self.failing.discard(core.replica_id)
                yield Accepted(core.replica_id)
                raise BackendError(f"replica {core.replica_id} failed (injected)")
            events = core.generate(request)
            try:
                async for event in events:
                    yield event
            finally:
                await events.aclose()
        finally:
            self.policy.on_completed(route.key)

    async def replica_stats(self) -> list[ReplicaStats]:
        return [c.stats() for c in self.cores]

    async def model_info(self) -> ModelInfo:
        for core in self.cores:
            if core.state is ReplicaState.RUNNING:
                return core.model_info()
        raise BackendError("no replica is running")

    async def load_lora(self, request: LoadLora) -> list[LoraResult]:
        return [c.load_lora(request) for c in self.cores if c.state is ReplicaState.RUNNING]

    async def unload_lora(self, request: UnloadLora) -> list[LoraResult]:
        return [c.unload_lora(request) for c in self.cores if c.state is ReplicaState.RUNNING]

    async def close(self) -> None:
        for core in self.cores:
            await core.shutdown()
