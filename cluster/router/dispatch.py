"""One request's trip to a replica and back: admission, one retry before the first token, the deadline, the stream
interval.

`replica_deltas(backend, request, admission, ...)` is what the router core iterates for every Generate and Chat call,
whatever its transport; the backend chooses the replica (its routing policy) and carries the messages of
`cluster.contract`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

from gptoss_cluster.cluster.contract import Accepted, Delta, ErrorCode, ReplicaError, ReplicaRequest
from gptoss_cluster.cluster.router.admission import Admission, DeadlineExceeded, QueueFull
from gptoss_cluster.cluster.router.backend import Backend, BackendError
from gptoss_cluster.cluster.router.errors import RouterError

__all__ = ["replica_deltas"]

logger = logging.getLogger("gptoss.router")


async def replica_deltas(backend: Backend, request: ReplicaRequest, admission: Admission, *,
                         timeout_s: float | None, stream_interval: int = 1,
                         on_dispatch: Callable[[], None] | None = None,
                         on_accepted: Callable[[str], None] | None = None) -> AsyncIterator[Delta]:
    """The request's deltas as the router passes them on, once `admission` lets it through (`on_dispatch` is told
    then, and `on_accepted` the id of each replica that accepts it): the first at once, later ones in deltas of at
    least `stream_interval` tokens (or the last), all within `timeout_s` seconds from now (None: no bound). Raises
    RouterError: RESOURCE_EXHAUSTED (the queue is full), DEADLINE_EXCEEDED, the replica's own error, or UNAVAILABLE
    when the replica failed and a retry on another one (only before the first token) failed too. Closing the
    generator cancels the request on its replica."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        await admission.acquire(request.priority, deadline)
    except QueueFull as exc:
        raise RouterError(ErrorCode.RESOURCE_EXHAUSTED, str(exc), retry_after_ms=exc.retry_after_ms) from None
    except DeadlineExceeded as exc:
        raise RouterError(ErrorCode.DEADLINE_EXCEEDED, str(exc)) from None
    try:
        if on_dispatch is not None:
            on_dispatch()
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
                        if on_accepted is not None:
                            on_accepted(replica_id)
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
    finally:
        admission.release()
