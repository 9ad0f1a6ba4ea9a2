"""The deployment's run-time LoRA adapter changes, kept apart from any one replica.

The Admin service loads and unloads adapters on every replica running at the time (a broadcast). A replica that joins
later (scaling up, Serve restarting one that failed) must serve the same adapters as the others, so what the Admin
service did is also recorded here, and a replica applies it on top of its start-up `lora_modules`:

    AdapterChanges   name -> PEFT directory (loaded at run time) or None (unloaded at run time, a start-up module
                     included), with a version every change bumps. `adapters(lora_modules)` is what a replica serves.
    AdapterRegistry  holds them in this process (the in-process routers of tests and benchmarks); also the body of
                     the Ray actor below.
    RayAdapterRegistry  the client of one Serve application's named, detached registry actor (`registry_name`),
                     created by the first router or replica that opens it. Routers write through it after a broadcast
                     that succeeded; each replica reads it before registering its adapters and then polls it for
                     changes (`ReplicaSettings.lora_sync_interval_s`), which also heals a broadcast it missed while
                     starting. Its life is the application's where `LocalCluster` (`gptoss-cluster serve`)
                     deploys: `close` removes it with the application, and `start` removes one left behind before a
                     new deploy of that name; it ends with the Ray cluster. An application deleted by other means
                     (the dashboard, `serve delete`) and deployed again by them keeps the old changes unless
                     `kill_registry(app_name)` runs in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["REGISTRY_NAMESPACE", "AdapterChanges", "AdapterRegistry", "AdapterStore", "RayAdapterRegistry",
           "kill_registry", "registry_name"]

REGISTRY_NAMESPACE = "gptoss"  # the Ray namespace of the registry actors (not Serve's own)


@dataclass(frozen=True)
class AdapterChanges:
    """What the Admin service changed since the application started: name -> path, or None (unloaded)."""

    version: int = 0
    entries: Mapping[str, str | None] = field(default_factory=dict)

    def adapters(self, lora_modules: Mapping[str, str]) -> dict[str, str]:
        """The adapters a replica with these start-up `lora_modules` serves: a name the changes mention is theirs."""
        out = {name: path for name, path in lora_modules.items() if name not in self.entries}
        out.update({name: path for name, path in self.entries.items() if path is not None})
        return out


class AdapterStore(Protocol):
    """Where routers record adapter changes and replicas read them (in-process or a Ray actor)."""

    async def record(self, name: str, path: str | None) -> int: ...

    async def changes(self, since: int = -1) -> AdapterChanges | None: ...


class AdapterRegistry:
    """The adapter changes of one application, in this process (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[str, str | None] = {}
        self._version = 0

    async def record(self, name: str, path: str | None) -> int:
        """`name` loaded from `path` (None: unloaded); returns the version (unchanged when nothing changed)."""
        if name not in self._entries or self._entries[name] != path:
            self._entries[name] = path
            self._version += 1
        return self._version

    async def changes(self, since: int = -1) -> AdapterChanges | None:
        """Every change, or None when the version is still `since` (a replica's cheap poll)."""
        if since == self._version:
            return None
        return AdapterChanges(self._version, dict(self._entries))


def registry_name(app_name: str) -> str:
    """The registry actor's name for the Serve application `app_name`."""
    return f"lora-adapters:{app_name}"


class RayAdapterRegistry:
    """The client of the Serve application's registry actor (get-or-create by name; any process of the cluster)."""

    def __init__(self, app_name: str, timeout_s: float = 30.0) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.app_name = app_name
        self.timeout_s = timeout_s
        # detached: it outlives the router or replica that created it; outside any placement group: a ModelReplica
        # creating it would otherwise put it in its own, which Serve removes (killing it) with that replica
        self.actor: Any = ray.remote(AdapterRegistry).options(
            name=registry_name(app_name), namespace=REGISTRY_NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0, max_concurrency=100,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)).remote()

    async def record(self, name: str, path: str | None) -> int:
        return await asyncio.wait_for(self.actor.record.remote(name, path), self.timeout_s)

    async def changes(self, since: int = -1) -> AdapterChanges | None:
        return await asyncio.wait_for(self.actor.changes.remote(since), self.timeout_s)


def kill_registry(app_name: str) -> bool:
    """Remove the application's registry actor now (False: there was none)."""
    import ray

    try:
        actor = ray.get_actor(registry_name(app_name), namespace=REGISTRY_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True
