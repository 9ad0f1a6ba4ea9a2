"""Where the router sends requests: ModelReplica replicas behind a Serve handle, or replica cores in this process.

Both backends speak the replica streaming contract of `cluster.replica` (dict events) and raise `BackendError` for
infrastructure failures (a replica died or cannot be reached) so that the router can retry once before the first
token and answer UNAVAILABLE otherwise.

- `ServeBackend(handle)`: the production path. `stream` calls `ModelReplica.submit` through the deployment handle
  (the replica is chosen by `cluster.router.replica_choice.PrefixAffinityRouter`) and takes the request's deltas
  from this router's multiplexed token channel to that replica (`ModelReplica.channel`); closing the stream cancels
  the Serve request, which cancels the replica's generator and aborts the engine request. `replica_stats`
  broadcasts `stats` to every running replica. Both calls travel over Serve's gRPC transport between deployments
  by default (`transport="grpc"`), or as Ray actor tasks (`"ray"`); see `ServeBackend`.
- `LocalBackend(cores)`: `ReplicaCore`s in this process, chosen by the same `AffinityPolicy` (tests, benchmarks,
  and a single-process server without Ray).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gptoss_cluster.cluster.replica import REPLICA_TRANSPORTS, merge_deltas
from gptoss_cluster.cluster.router.replica_choice import AffinityPolicy

__all__ = ["Backend", "BackendError", "LocalBackend", "ServeBackend"]


class BackendError(Exception):
    """The request could not be run or continued because of the infrastructure (replica died, unreachable)."""


class Backend(abc.ABC):
    @abc.abstractmethod
    def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The replica's events for `request` (first {"accepted", "replica_id"}); closing it cancels the request."""

    @abc.abstractmethod
    async def replica_stats(self) -> list[dict[str, Any]]:
        """`stats()` of every replica that answered (empty when none)."""

    @abc.abstractmethod
    async def model_info(self) -> dict[str, Any]:
        """Model facts from a replica (raises BackendError when none can answer)."""

    async def close(self) -> None:
        return None


# ================================================================================================ in process
class LocalBackend(Backend):
    """Replica cores in this process (no Ray)."""

    def __init__(self, cores: Sequence[Any], policy: AffinityPolicy | None = None) -> None:
        self.cores = list(cores)
        block = self.cores[0].model_info()["kv_block_size"] if self.cores else 16
        self.policy = policy or AffinityPolicy(block_size=block)
        self.failing: set[str] = set()  # replica ids whose next stream fails (tests of the retry path)
        self._keys = itertools.count()  # the policy's key of each routed request (unique in this backend)

    def _choose(self, request: dict[str, Any]) -> Any:
        by_id = {c.replica_id: c for c in self.cores if c.state == "RUNNING"}
        if not by_id:
            raise BackendError("no replica is running")
        hashes = request.get("prefix_hashes")
        if hashes is None:
            hashes = self.policy.hashes(request.get("prompt_token_ids") or [])
        ranks = self.policy.rank(by_id, hashes, request.get("exclude_replicas") or ())
        return by_id[ranks[0][0]], hashes

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        core, hashes = self._choose(request)
        key = f"local-{next(self._keys)}"
        prompt = request.get("prompt_token_ids") or []
        self.policy.routed(key, core.replica_id, hashes,
                           len(prompt) + int((request.get("sampling") or {}).get("max_tokens") or 0))
        try:
            if core.replica_id in self.failing:
                self.failing.discard(core.replica_id)
                yield {"accepted": True, "replica_id": core.replica_id}
                raise BackendError(f"replica {core.replica_id} failed (injected)")
            gen = core.generate(request)
            try:
                async for item in gen:
                    yield item
            finally:
                await gen.aclose()
        finally:
            self.policy.completed(key)

    async def replica_stats(self) -> list[dict[str, Any]]:
        return [c.stats() for c in self.cores]

    async def model_info(self) -> dict[str, Any]:
        for core in self.cores:
            if core.state == "RUNNING":
                return core.model_info()
        raise BackendError("no replica is running")

    async def close(self) -> None:
        for core in self.cores:
            await core.shutdown()


# ================================================================================================ Ray Serve
def _delta(item: Any) -> bool:
    """A token delta (not an error, not an exception)."""
    return isinstance(item, dict) and "token_ids" in item


def _open_delta(item: Any) -> bool:
    """A token delta that is not the request's last."""
    return _delta(item) and not item.get("finish_reason")


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

    Per request, `submit` (routed by `PrefixAffinityRouter`) answers {"accepted", "replica_id"} and stays open until
    the request ends; its deltas arrive on this router's channel to that replica (`cluster.replica.TokenChannels`),
    one Serve item per engine step for all of this router's requests there. A channel task per replica reads it and
    puts each delta into its request's queue; it opens with the first request accepted by the replica and ends when
    the replica closes it idle. A request's own call failing (replica died) or its replica's channel failing ends
    the request with `BackendError` (the router retries before the first token); closing the stream early cancels
    the request's call, which aborts it on the replica.

    `transport`: "grpc" sends `submit` and `channel` over the gRPC server every Serve replica runs for calls between
    deployments (the handle option `_by_reference=False`: arguments and items pickled into one gRPC message each);
    "ray" sends them as Ray actor tasks whose items come back as object references, Serve's default. Measured at 64
    streams on 2 cores, gRPC cut the router's CPU per request by ~40 % and its TTFT p50 by 32-65 %
    (benchmarks/RESULTS.md, session 5). Routing, ongoing-request counts, cancellation and failure detection are
    Serve's either way; a replica lost mid-call surfaces as ActorUnavailableError or an `AioRpcError` (both
    `BackendError` here).
    """

    def __init__(self, handle: Any, *, transport: str = "grpc", stats_timeout_s: float = 5.0,
                 channel_open_timeout_s: float = 30.0) -> None:
        if transport not in REPLICA_TRANSPORTS:
            raise ValueError(f"transport must be one of {REPLICA_TRANSPORTS}, got {transport!r}")
        self.handle = handle
        self.transport = transport
        self.stats_timeout_s = stats_timeout_s
        self.channel_open_timeout_s = channel_open_timeout_s
        self.router_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._streaming = handle.options(stream=True, _by_reference=transport == "ray")
        self._submit = self._streaming.submit
        self._channel_handles: dict[str, Any] = {}  # replica -> handle method pinned to it (multiplexed id)
        self._keys = itertools.count()
        self._queues: dict[int, asyncio.Queue[Any]] = {}  # channel key -> the request's deltas (or its failure)
        self._on_replica: dict[str, set[int]] = {}  # replica -> keys of this router's requests running there
        self._channels: dict[str, asyncio.Task[None]] = {}  # replica -> the task reading its channel
        self._background: set[asyncio.Task[Any]] = set()

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        key = next(self._keys)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[key] = queue
        response = self._submit.remote({**request, "channel": {"router": self.router_id, "key": key}})
        replica = None
        finished = False
        try:
            try:
                accepted = await anext(response)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                finished = True
                raise _backend_error(exc) from exc
            replica = accepted.get("replica_id")
            self._on_replica.setdefault(replica, set()).add(key)
            self._open_channel(replica)
            self._spawn(self._watch(response, key))
            yield accepted
            held: Any = None  # taken from the queue but not merged: the next item
            while True:
                item, held = (held if held is not None else await queue.get()), None
                # a caller that fell behind takes every delta already here as one (one gRPC message, not many)
                while _open_delta(item) and not queue.empty():
                    following = queue.get_nowait()
                    if not _delta(following):
                        held = following
                        break
                    item = merge_deltas(item, following)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.get("finish_reason") or "error" in item:
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
                response = self._channel_method(replica).remote({"router": self.router_id, "target_replica": replica})
                try:
                    async with asyncio.timeout(self.channel_open_timeout_s):
                        opened = await anext(response)
                    if opened and opened[0][0] == "misrouted":
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

    async def replica_stats(self) -> list[dict[str, Any]]:
        try:
            results = await self.handle.broadcast("stats").results_async(timeout_s=self.stats_timeout_s,
                                                                         return_exceptions=True)
        except Exception:  # no replica running (DeploymentUnavailableError), timeout, controller away
            return []
        return [r for r in results if isinstance(r, dict)]

    async def model_info(self) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.handle.model_info.remote(), self.stats_timeout_s * 6)
        except Exception as exc:
            raise BackendError(f"no replica answered model_info: {exc}") from exc
