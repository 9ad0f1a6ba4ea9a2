"""Admission control of one router: a bounded, prioritised waiting room in front of the replicas.

Every request asks for a slot before it is sent to a replica. Slots are the requests the replicas can take at once
(the sum of their `max_ongoing_requests`, refreshed as replicas come and go); while all are taken, requests wait
here, lowest `priority` value first, then in arrival order. The waiting room holds at most `max_queued` requests:
one more is refused at once with `QueueFull`, which carries a retry hint (`retry_after_ms`, sent to gRPC clients as
the `grpc-retry-pushback-ms` trailer) computed from how fast slots have been freeing up lately. A request whose
deadline passes while it waits gets `DeadlineExceeded`; a cancelled waiter leaves the queue without taking a slot.

    admission = Admission(max_queued=1024, capacity=256)
    async with admission.slot(priority=0, deadline=time.monotonic() + 30):
        ...  # talk to a replica
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

__all__ = ["Admission", "AdmissionError", "DeadlineExceeded", "QueueFull", "Unavailable"]

MIN_PUSHBACK_MS = 50
MAX_PUSHBACK_MS = 30_000


class AdmissionError(Exception):
    """A request that was not admitted (the subclass says why)."""


class QueueFull(AdmissionError):
    def __init__(self, queued: int, retry_after_ms: int) -> None:
        super().__init__(f"the router's queue is full ({queued} requests waiting); retry in {retry_after_ms} ms")
        self.queued = queued
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(AdmissionError):
    def __init__(self, waited_s: float) -> None:
        super().__init__(f"the deadline passed after {waited_s:.3f} s in the router's queue")
        self.waited_s = waited_s


class Unavailable(AdmissionError):
    """No replica can take requests (capacity 0) and the request may not wait for one."""


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    future: asyncio.Future[None] = field(compare=False)
    enqueued_at: float = field(compare=False, default=0.0)


class Admission:
    """Slots (requests in flight to replicas) plus a bounded priority queue of requests waiting for one.

    Single event loop: every method must be called from the loop that runs the router's gRPC server.
    `capacity=None` means unlimited slots (nothing ever waits).
    """

    def __init__(self, max_queued: int, capacity: int | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0:
            raise ValueError(f"max_queued must be an integer >= 0, got {max_queued!r}")
        self.max_queued = max_queued
        self._capacity = capacity
        self._clock = clock
        self._running = 0
        self._heap: list[_Waiter] = []
        self._queued = 0  # live waiters in the heap (cancelled ones are removed lazily)
        self._seq = itertools.count()
        self._releases: deque[float] = deque(maxlen=64)  # times slots were freed, for the pushback estimate
        self.admitted_total = 0
        self.rejected_total = 0
        self.on_change: Callable[[Admission], None] | None = None  # metrics hook: called when queued/running change

    # ------------------------------------------------------------------------------------------------ state
    @property
    def capacity(self) -> int | None:
        return self._capacity

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return self._queued

    def set_capacity(self, capacity: int | None) -> None:
        """New slot count (replicas came or went); waiters are let in at once if it grew."""
        if capacity is not None and capacity < 0:
            raise ValueError(f"capacity must be >= 0 or None, got {capacity!r}")
        self._capacity = capacity
        self._grant()

    def _has_free_slot(self) -> bool:
        return self._capacity is None or self._running < self._capacity

    def retry_after_ms(self) -> int:
        """How long a refused client should wait: the queue ahead of it drained at the recent release rate."""
        now = self._clock()
        recent = [t for t in self._releases if now - t <= 30.0]
        if len(recent) >= 2 and recent[-1] > recent[0]:
            rate = (len(recent) - 1) / (recent[-1] - recent[0])  # slots freed per second
            ms = 1000.0 * (self._queued + 1) / rate
        else:
            ms = 1000.0
        return int(min(MAX_PUSHBACK_MS, max(MIN_PUSHBACK_MS, math.ceil(ms))))

    # ------------------------------------------------------------------------------------------------ slots
    async def acquire(self, priority: int = 0, deadline: float | None = None) -> None:
        """Wait for a slot (at most until `deadline`, on this object's clock). Raises QueueFull or
        DeadlineExceeded; on cancellation the request leaves the queue and takes no slot."""
        if not self._queued and self._has_free_slot():
            self._take()
            return
        if self._queued >= self.max_queued:
            self.rejected_total += 1
            raise QueueFull(self._queued, self.retry_after_ms())
        start = self._clock()
        if deadline is not None and deadline <= start:
            raise DeadlineExceeded(0.0)
        waiter = _Waiter(priority, next(self._seq), asyncio.get_running_loop().create_future(), start)
        heapq.heappush(self._heap, waiter)
        self._queued += 1
        self._changed()
        try:
            timeout = None if deadline is None else max(0.0, deadline - start)
            try:
                await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
            except TimeoutError:
                raise DeadlineExceeded(self._clock() - start) from None
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release()  # the slot was granted as we gave up: hand it on
            else:
                waiter.future.cancel()
                self._queued -= 1
                self._changed()
            raise

    def release(self) -> None:
        """Give a slot back (the request ended, whatever the outcome)."""
        self._release()

    @contextlib.asynccontextmanager
    async def slot(self, priority: int = 0, deadline: float | None = None) -> AsyncIterator[None]:
        await self.acquire(priority, deadline)
        try:
            yield
        finally:
            self.release()

    # ------------------------------------------------------------------------------------------------ internals
    def _take(self) -> None:
        self._running += 1
        self.admitted_total += 1
        self._changed()

    def _release(self) -> None:
        if self._running <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._running -= 1
        self._releases.append(self._clock())
        self._grant()
        self._changed()

    def _grant(self) -> None:
        while self._heap and self._has_free_slot():
            waiter = heapq.heappop(self._heap)
            if waiter.future.done():  # cancelled or timed out: already uncounted
                continue
            self._queued -= 1
            self._take()
            waiter.future.set_result(None)
        # drop cancelled waiters at the top so the heap does not grow with dead entries
        while self._heap and self._heap[0].future.done():
            heapq.heappop(self._heap)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)
