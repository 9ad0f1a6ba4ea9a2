"""Where the router sends requests: ModelReplica replicas behind a Serve handle, or replica cores in this process.

Both backends speak the replica streaming contract of `cluster.replica` (dict events) and raise `BackendError` for
infrastructure failures (a replica died or cannot be reached) so that the router can retry once before the first
token and answer UNAVAILABLE otherwise.

- `ServeBackend(handle)`: the production path. `stream` calls `ModelReplica.generate` through the deployment handle
  (the replica is chosen by `cluster.router.replica_choice.PrefixAffinityRouter`); closing the stream cancels the
  Serve request, which cancels the replica's generator and aborts the engine request. `replica_stats` broadcasts
  `stats` to every running replica.
- `LocalBackend(cores)`: `ReplicaCore`s in this process, chosen by the same `AffinityPolicy` (tests, benchmarks,
  and a single-process server without Ray).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

from cluster.router.replica_choice import AffinityPolicy

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
def _is_infrastructure_error(exc: BaseException) -> bool:
    from ray import exceptions as rex

    try:
        from ray.serve.exceptions import DeploymentUnavailableError
    except ImportError:  # pragma: no cover - older Serve
        DeploymentUnavailableError = ()  # noqa: N806
    return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError, rex.RaySystemError, rex.RayTaskError,
                            rex.ObjectLostError, rex.WorkerCrashedError, rex.NodeDiedError,
                            DeploymentUnavailableError))


class ServeBackend(Backend):
    """ModelReplica replicas through a Serve deployment handle."""

    def __init__(self, handle: Any, *, stats_timeout_s: float = 5.0) -> None:
        self.handle = handle
        self.stats_timeout_s = stats_timeout_s
        self._stream_handle = handle.options(stream=True)

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        response = self._stream_handle.generate.remote(request)
        finished = False
        try:
            async for item in response:
                if item.get("finish_reason") or "error" in item:
                    finished = True  # the replica is done with it: nothing to cancel when the caller stops here
                yield item
            finished = True
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            finished = True
            if _is_infrastructure_error(exc):
                raise BackendError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
            raise
        finally:
            if not finished:  # the caller stopped early (cancelled, deadline, stop string): cancel on the replica
                with contextlib.suppress(Exception):
                    response.cancel()

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
