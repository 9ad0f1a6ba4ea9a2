"""The production backend: ModelReplica replicas behind a Serve deployment handle, tokens over the token channel.

See `ServeBackend`; the replica's half of the channel is `cluster.token_channel.TokenChannels`, the messages are
`cluster.contract`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from gptoss_cluster.cluster.contract import (
    REPLICA_TRANSPORTS,
    Accepted,
    ChannelOpen,
    ChannelRoute,
    Delta,
    ErrorCode,
    LoadLora,
    LoraResult,
    Misrouted,
    ModelInfo,
    ReplicaError,
    ReplicaEvent,
    ReplicaRequest,
    ReplicaStats,
    UnloadLora,
)
from gptoss_cluster.cluster.lora_registry import AdapterStore
from gptoss_cluster.cluster.router.backend import Backend, BackendError

__all__ = ["ServeBackend"]


def _backend_error(exc: BaseException) -> BaseException:
    """A Serve/Ray failure as BackendError when it is the infrastructure's, else itself."""
    if isinstance(exc, BackendError) or not _is_infrastructure_error(exc):
        return exc
    return BackendError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _is_infrastructure_error(exc: BaseException) -> bool:
    import grpc
    from ray import exceptions as rex

    if isinstance(exc, grpc.aio.AioRpcError):  # Serve's gRPC transport failed (the replica's own errors come pickled)
        return True
    try:
        from ray.serve.exceptions import DeploymentUnavailableError
    except ImportError:  # pragma: no cover - older Serve
        DeploymentUnavailableError = ()  # noqa: N806
    return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError, rex.RaySystemError, rex.RayTaskError,
                            rex.ObjectLostError, rex.WorkerCrashedError, rex.NodeDiedError,
                            DeploymentUnavailableError))


class ServeBackend(Backend):
    """ModelReplica replicas through a Serve deployment handle, tokens over the multiplexed channel.

    Per request, `submit` (routed by the deployment's request router, `cluster.router.serve_routing`) answers
    `Accepted` and stays open until the request ends; its deltas arrive on this router's channel to that replica
    (`cluster.token_channel.TokenChannels`), one Serve item per engine step for all of this router's requests there.
    A channel task per replica reads it and puts each delta into its request's queue; it opens with the first request
    accepted by the replica and ends when the replica closes it idle. A request's own call failing (replica died) or
    its replica's channel failing ends the request with `BackendError` (the router retries before the first token);
    closing the stream early cancels the request's call, which aborts it on the replica.

    `transport`: "grpc" sends `submit` and `channel` over the gRPC server every Serve replica runs for calls between
    deployments (the handle option `_by_reference=False`: arguments and items pickled into one gRPC message each);
    "ray" sends them as Ray actor tasks whose items come back as object references, Serve's default. Measured at 64
    streams on 2 cores, gRPC cut the router's CPU per request by ~40 % and its TTFT p50 by 32-65 %
    (benchmarks/RESULTS.md, session 5). Routing, ongoing-request counts, cancellation and failure detection are
    Serve's either way; a replica lost mid-call surfaces as ActorUnavailableError or an `AioRpcError` (both
    `BackendError` here).
    """

    def __init__(self, handle: Any, *, transport: str = "grpc", stats_timeout_s: float = 5.0,
                 channel_open_timeout_s: float = 30.0, adapter_registry: AdapterStore | None = None) -> None:
        if transport not in REPLICA_TRANSPORTS:
            raise ValueError(f"transport must be one of {REPLICA_TRANSPORTS}, got {transport!r}")
        self.handle = handle
        self.transport = transport
        self.stats_timeout_s = stats_timeout_s
        self.channel_open_timeout_s = channel_open_timeout_s
        self.adapter_registry = adapter_registry  # the application's RayAdapterRegistry (cluster.lora_registry)
        self.router_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._streaming = handle.options(stream=True, _by_reference=transport == "ray")
        self._submit = self._streaming.submit
        self._channel_handles: dict[str, Any] = {}  # replica -> handle method pinned to it (multiplexed id)
        self._keys = itertools.count()
        # channel key -> the request's events (or its failure)
        self._queues: dict[int, asyncio.Queue[Delta | ReplicaError | BaseException]] = {}
        self._on_replica: dict[str, set[int]] = {}  # replica -> keys of this router's requests running there
        self._channels: dict[str, asyncio.Task[None]] = {}  # replica -> the task reading its channel
        self._background: set[asyncio.Task[Any]] = set()

    async def stream(self, request: ReplicaRequest) -> AsyncIterator[ReplicaEvent]:
        key = next(self._keys)
        queue: asyncio.Queue[Delta | ReplicaError | BaseException] = asyncio.Queue()
        self._queues[key] = queue
        response = self._submit.remote(dataclasses.replace(request, channel=ChannelRoute(self.router_id, key)))
        replica = None
        finished = False
        try:
            try:
                first: Accepted | ReplicaError = await anext(response)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                finished = True
                raise _backend_error(exc) from exc
            if isinstance(first, ReplicaError):  # refused before it was accepted
                finished = True
                yield first
                return
            replica = first.replica_id
            self._on_replica.setdefault(replica, set()).add(key)
            self._open_channel(replica)
            self._spawn(self._watch(response, key))
            yield first
            held: Delta | ReplicaError | BaseException | None = None  # taken from the queue, not merged: the next
            while True:
                item, held = (held if held is not None else await queue.get()), None
                # a caller that fell behind takes every delta already here as one (one gRPC message, not many)
                while isinstance(item, Delta) and not item.finished and not queue.empty():
                    following = queue.get_nowait()
                    if not isinstance(following, Delta):
                        held = following
                        break
                    item = item.merge(following)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if isinstance(item, ReplicaError) or item.finished:
                    finished = True  # the replica is done with it: nothing to cancel when the caller stops here
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(key, None)
            if replica is not None:
                keys = self._on_replica.get(replica)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._on_replica[replica]
            if not finished:  # the caller stopped early (cancelled, deadline, stop string): cancel on the replica
                with contextlib.suppress(Exception):
                    response.cancel()

    async def _watch(self, response: Any, key: int) -> None:
        """Wait for the request's own call to end; if it fails (the replica died), fail the request."""
        try:
            async for _ in response:
                pass
        except asyncio.CancelledError:
            return
        except Exception as exc:
            queue = self._queues.get(key)
            if queue is not None:
                queue.put_nowait(_backend_error(exc))

    # ------------------------------------------------------------------------------------------------ channels
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _open_channel(self, replica: str) -> None:
        task = self._channels.get(replica)
        if task is None or task.done():
            self._channels[replica] = self._spawn(self._read_channel(replica))

    def _channel_method(self, replica: str) -> Any:
        method = self._channel_handles.get(replica)
        if method is None:  # the multiplexed id lets Serve hand the routed replica to this very call
            method = self._streaming.options(multiplexed_model_id=replica).channel
            self._channel_handles[replica] = method
        return method

    async def _read_channel(self, replica: str) -> None:
        """Deliver the replica's channel batches to their requests until it closes idle; on failure fail the
        requests running there."""
        failure: BaseException | None = None
        try:
            misrouted = 0
            while self._on_replica.get(replica):  # reopen while requests wait (closed idle as one arrived)
                response = self._channel_method(replica).remote(ChannelOpen(self.router_id, replica))
                try:
                    async with asyncio.timeout(self.channel_open_timeout_s):
                        opened = await anext(response)
                    if isinstance(opened, Misrouted):
                        misrouted += 1
                        if misrouted > 20:
                            raise BackendError(f"could not open a token channel to replica {replica}")
                        continue
                    queues = self._queues
                    async for batch in response:
                        for key, item in batch:
                            queue = queues.get(key)
                            if queue is not None:  # else: cancelled meanwhile
                                queue.put_nowait(item)
                finally:
                    with contextlib.suppress(Exception):
                        response.cancel()
        except asyncio.CancelledError:
            failure = BackendError(f"the token channel to replica {replica} was closed")
            raise
        except TimeoutError:
            failure = BackendError(f"no token channel to replica {replica} within {self.channel_open_timeout_s} s")
        except BackendError as exc:
            failure = exc
        except Exception as exc:
            failure = _backend_error(exc)
        finally:
            if self._channels.get(replica) is asyncio.current_task():
                del self._channels[replica]
            if failure is not None:
                for key in self._on_replica.pop(replica, ()):
                    queue = self._queues.get(key)
                    if queue is not None:
                        queue.put_nowait(failure)

    async def close(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def replica_stats(self) -> list[ReplicaStats]:
        try:
            results = await self.handle.broadcast("stats").results_async(timeout_s=self.stats_timeout_s,
                                                                         return_exceptions=True)
        except Exception:  # no replica running (DeploymentUnavailableError), timeout, controller away
            return []
        return [r for r in results if isinstance(r, ReplicaStats)]  # the others failed or timed out

    async def load_lora(self, request: LoadLora) -> list[LoraResult]:
        return await self._on_every_replica("load_lora", request)

    async def unload_lora(self, request: UnloadLora) -> list[LoraResult]:
        return await self._on_every_replica("unload_lora", request)

    async def _on_every_replica(self, method: str, request: LoadLora | UnloadLora) -> list[LoraResult]:
        """`method(request)` broadcast to every replica of the deployment. A replica whose call failed is reported
        UNAVAILABLE as "unreachable #i": a failed broadcast call does not say which replica it went to."""
        try:
            results = await self.handle.broadcast(method, request).results_async(timeout_s=self.stats_timeout_s * 6,
                                                                                 return_exceptions=True)
        except Exception:  # no replica running (DeploymentUnavailableError), timeout, controller away
            return []
        return [r if isinstance(r, LoraResult) else LoraResult(f"unreachable #{i}", ReplicaError(
            ErrorCode.UNAVAILABLE, f"{type(r).__name__}: {str(r).splitlines()[0] if str(r) else ''}"))
            for i, r in enumerate(results)]

    async def model_info(self) -> ModelInfo:
        try:
            return await asyncio.wait_for(self.handle.model_info.remote(), self.stats_timeout_s * 6)
        except Exception as exc:
            raise BackendError(f"no replica answered model_info: {exc}") from exc
