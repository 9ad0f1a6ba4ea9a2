"""One request's trip to a replica and back: one retry before the first token, the deadline, the stream interval.

`replica_deltas(backend, request, ...)` is what the router core iterates for every Generate and Chat call, whatever
its transport; the backend chooses the replica (its routing policy) and carries the messages of `cluster.contract`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from gptoss_cluster.cluster.contract import Accepted, Delta, ErrorCode, ReplicaError, ReplicaRequest
from gptoss_cluster.cluster.router.backend import Backend, BackendError
from gptoss_cluster.cluster.router.errors import RouterError

__all__ = ["replica_deltas"]

logger = logging.getLogger("gptoss.router")


async def replica_deltas(backend: Backend, request: ReplicaRequest, *, deadline: float | None,
                         timeout_s: float | None, stream_interval: int = 1) -> AsyncIterator[Delta]:
    """The request's deltas as the router passes them on: the first at once, later ones in deltas of at least
    `stream_interval` tokens (or the last). `deadline` is on `time.monotonic()`'s clock (`timeout_s`, the seconds it
    stands for, only names it in the message). Raises RouterError: DEADLINE_EXCEEDED, the replica's own error, or
    UNAVAILABLE when the replica failed and a retry on another one (only before the first token) failed too. Closing
    the generator cancels the request on its replica."""
    exclude: list[str] = []
    held: Delta | None = None  # deltas taken but not yet passed on (stream_interval > 1)
    for attempt in range(2):
        stream = backend.stream(request)
        replica_id: str | None = None
        started = False
        try:
            while True:
                try:
                    if deadline is None:
                        event = await anext(stream)
                    else:  # a timer in this task (asyncio.wait_for would start a task per event)
                        async with asyncio.timeout(deadline - time.monotonic()):
                            event = await anext(stream)
                except StopAsyncIteration:
                    raise BackendError(f"replica {replica_id} closed the stream early") from None
                except TimeoutError:
                    raise RouterError(ErrorCode.DEADLINE_EXCEEDED,
                                      f"the deadline ({timeout_s:.3f} s) passed while generating") from None
                if isinstance(event, Delta):
                    if not started:  # the first token goes out at once, whatever the stream interval
                        started = True
                    else:
                        held = event if held is None else held.merge(event)
                        if len(held.token_ids) < stream_interval and not held.finished:
                            continue
                        event, held = held, None
                    yield event
                    if event.finished:
                        return
                elif isinstance(event, Accepted):
                    replica_id = event.replica_id
                elif isinstance(event, ReplicaError):
                    if event.code is ErrorCode.UNAVAILABLE and not started and attempt == 0:
                        raise BackendError(event.message)
                    raise RouterError(event.code, event.message)
                else:
                    raise TypeError(f"a backend yielded {event!r}, which is no replica event")
        except BackendError as exc:
            if not started and attempt == 0:
                logger.warning("replica %s failed before the first token (%s); retrying elsewhere", replica_id, exc)
                if replica_id:
                    exclude.append(replica_id)
                    request = dataclasses.replace(request, exclude_replicas=tuple(exclude))
                continue
            raise RouterError(ErrorCode.UNAVAILABLE, f"the replica serving this request failed: {exc}") from None
        finally:
            await stream.aclose()
