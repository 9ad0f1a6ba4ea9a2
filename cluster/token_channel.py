"""The replica's half of the multiplexed token channel, and the Serve methods a ModelReplica body exposes with it.

The router's half is `cluster.router.serve_backend.ServeBackend`; the messages are `cluster.contract`'s.

A Serve streamed item costs about a millisecond of CPU on each side whatever it carries, so one item per token per
request caps a router at ~1,000 tokens/s. Instead each request's own Serve call (`submit`) yields only `Accepted`
and stays open until the request ends (so Serve's routing, ongoing-request counts, autoscaling and cancellation work
as for any call), while its deltas go to an outbox per router; one long-lived Serve call per router and replica
(`channel`) carries whatever the outbox holds as one item, `[(channel key, Delta | ReplicaError), ...]`: one item per
engine step for all of that router's requests, fewer when the router falls behind.

The outbox outlives channel reconnects: deltas wait in it until the router's channel (opened when its first request
is accepted here) takes them. A channel with nothing to carry closes after `idle_close_s`, so that a replica being
scaled down is not held by its channels; the router reopens it with its next request here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from gptoss_cluster.cluster.contract import (
    Accepted,
    ChannelBatch,
    ChannelOpen,
    ChannelStats,
    LoadLora,
    LoraResult,
    Misrouted,
    ModelInfo,
    ReplicaError,
    ReplicaEvent,
    ReplicaRequest,
    UnloadLora,
)

__all__ = ["ReplicaCoreLike", "ReplicaEndpoints", "TokenChannels"]

Generate = Callable[[ReplicaRequest], AsyncIterator[ReplicaEvent]]


class TokenChannels:
    """The outboxes of the routers that send requests to this replica, and the channel calls that empty them."""

    def __init__(self, replica_id: str, *, idle_close_s: float = 2.0, orphan_timeout_s: float = 60.0,
                 max_batch_items: int = 1024) -> None:
        self.replica_id = replica_id
        self.max_batch_items = max_batch_items  # a router far behind gets its backlog in several items, not one huge
        self.idle_close_s = idle_close_s
        self.orphan_timeout_s = orphan_timeout_s
        self._outboxes: dict[str, _Outbox] = {}  # router id -> its outbox
        self.batches_sent = 0  # Serve items sent on channels (empty "open" items not counted)
        self.deltas_sent = 0  # request events they carried

    def _outbox(self, router_id: str) -> _Outbox:
        outbox = self._outboxes.get(router_id)
        if outbox is None:
            now = time.monotonic()  # a router that went away for good leaves an outbox nobody reads: drop it
            for rid, old in list(self._outboxes.items()):
                if not old.connected and not old.live and now - old.touched > self.orphan_timeout_s:
                    del self._outboxes[rid]
            outbox = self._outboxes[router_id] = _Outbox()
        return outbox

    async def submit(self, request: ReplicaRequest, generate: Generate) -> AsyncIterator[Accepted | ReplicaError]:
        """Body of the per-request Serve call: `generate(request)`'s first event (`Accepted`) is yielded, every later
        one goes to the outbox of `request.channel`'s router under its key; returns when the request ends.
        Cancelling the call (the router's client went away) closes `generate`, which aborts the engine request."""
        route = request.channel
        if route is None:
            raise ValueError(f"request {request.request_id!r} names no token channel (ReplicaRequest.channel)")
        outbox = self._outbox(route.router_id)
        outbox.live += 1
        events = generate(request)
        try:
            yield await anext(events)  # type: ignore[misc]  # Accepted, or ReplicaError
            async for event in events:
                outbox.items.append((route.key, event))  # type: ignore[arg-type]  # Delta or ReplicaError
                outbox.wake.set()
        finally:
            await events.aclose()
            outbox.live -= 1
            outbox.touched = time.monotonic()
            outbox.wake.set()  # an idle channel re-checks whether it can close

    async def stream(self, request: ChannelOpen) -> AsyncIterator[ChannelBatch | Misrouted]:
        """Body of the channel Serve call: first an empty batch (the channel is open), then the outbox's contents as
        they come. Serve may place a channel on another replica than asked (its FIFO hand-out of routed replicas):
        that one answers `Misrouted` and closes at once."""
        if request.target_replica != self.replica_id:
            yield Misrouted(self.replica_id)
            return
        outbox = self._outbox(request.router_id)
        if outbox.connected:  # a stale channel of the same router (its router lost it): the new one takes over
            outbox.generation += 1
            outbox.wake.set()
        outbox.connected = True
        generation = outbox.generation
        try:
            yield []
            while outbox.generation == generation:
                if outbox.items:
                    batch, outbox.items = outbox.items[:self.max_batch_items], outbox.items[self.max_batch_items:]
                    self.batches_sent += 1
                    self.deltas_sent += len(batch)
                    yield batch
                    continue
                if not outbox.live:
                    try:
                        async with asyncio.timeout(self.idle_close_s):
                            await outbox.wake.wait()
                    except TimeoutError:
                        if not outbox.live and not outbox.items:
                            return
                else:
                    await outbox.wake.wait()
                outbox.wake.clear()
        finally:
            if outbox.generation == generation:
                outbox.connected = False
            outbox.touched = time.monotonic()

    def stats(self) -> ChannelStats:
        return ChannelStats(batches=self.batches_sent, deltas=self.deltas_sent,
                            routers=sum(outbox.connected for outbox in self._outboxes.values()))


class _Outbox:
    """One router's undelivered deltas on this replica."""

    __slots__ = ("items", "wake", "live", "connected", "generation", "touched")

    def __init__(self) -> None:
        self.items: ChannelBatch = []
        self.wake = asyncio.Event()
        self.live = 0  # the router's requests running here
        self.connected = False
        self.generation = 0
        self.touched = time.monotonic()


class ReplicaCoreLike(Protocol):
    """What the endpoints need of a replica core: `cluster.replica.ReplicaCore`, or the tests' scripted one."""

    def generate(self, request: ReplicaRequest) -> AsyncIterator[ReplicaEvent]: ...

    def model_info(self) -> ModelInfo: ...

    def load_lora(self, request: LoadLora) -> LoraResult: ...

    def unload_lora(self, request: UnloadLora) -> LoraResult: ...


class ReplicaEndpoints:
    """The Serve methods of a ModelReplica deployment body that only hand over to its `core` and its token `channels`
    (`cluster.replica.ModelReplicaImpl`, and the tests' scripted stand-in): what a router calls."""

    core: Any  # ReplicaCoreLike
    channels: TokenChannels

    async def submit(self, request: ReplicaRequest) -> AsyncIterator[Accepted | ReplicaError]:
        async for event in self.channels.submit(request, self.core.generate):
            yield event

    async def channel(self, request: ChannelOpen) -> AsyncIterator[ChannelBatch | Misrouted]:
        async for batch in self.channels.stream(request):
            yield batch

    async def model_info(self) -> ModelInfo:
        return self.core.model_info()

    async def load_lora(self, request: LoadLora) -> LoraResult:
        return self.core.load_lora(request)  # reads the adapter's config and tensor header only: no weights

    async def unload_lora(self, request: UnloadLora) -> LoraResult:
        return self.core.unload_lora(request)
