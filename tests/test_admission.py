"""Admission control: slots, the bounded priority queue, pushback, deadlines, cancellation; and the same behaviour
through the gRPC router (RESOURCE_EXHAUSTED with grpc-retry-pushback-ms, priorities, DEADLINE_EXCEEDED in queue)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from gptoss_cluster.cluster.client import Client, generate_request
from gptoss_cluster.cluster.router.admission import Admission, DeadlineExceeded, QueueFull
from gptoss_cluster.cluster.router.grpc_service import PUSHBACK_TRAILER
from gptoss_cluster.cluster.router.settings import RouterSettings
from gptoss_cluster.cluster.router.testing import ScriptedReplica, ServerThread


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


# ------------------------------------------------------------------------------------------------ unit
def test_slots_then_queue_then_refusal_with_pushback():
    async def main():
        adm = Admission(max_queued=2, capacity=2)
        await adm.acquire()
        await adm.acquire()
        assert (adm.running, adm.queued) == (2, 0)
        waiters = [asyncio.create_task(adm.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        assert adm.queued == 2
        with pytest.raises(QueueFull) as info:
            await adm.acquire()
        assert 50 <= info.value.retry_after_ms <= 30_000
        assert "queue is full" in str(info.value)
        adm.release()
        await asyncio.sleep(0.01)
        assert (adm.running, adm.queued) == (2, 1) and sum(w.done() for w in waiters) == 1
        adm.release()  # hands the slot to the second waiter
        adm.release()
        await asyncio.gather(*waiters)
        assert (adm.running, adm.queued) == (1, 0)
        assert adm.rejected_total == 1 and adm.admitted_total == 4

    run(main())


def test_priority_order_then_arrival():
    async def main():
        adm = Admission(max_queued=10, capacity=1)
        await adm.acquire()
        order: list[str] = []

        async def wait(name, priority):
            await adm.acquire(priority)
            order.append(name)

        tasks = [asyncio.create_task(wait(n, p)) for n, p in (("low1", 5), ("high", 0), ("low2", 5), ("mid", 1))]
        await asyncio.sleep(0)
        for _ in range(4):
            adm.release()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert order == ["high", "mid", "low1", "low2"]

    run(main())


def test_deadline_in_queue_and_cancellation_leave_no_trace():
    async def main():
        adm = Admission(max_queued=4, capacity=1)
        await adm.acquire()
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await adm.acquire(deadline=time.monotonic() + 0.05)
        assert time.monotonic() - start < 1
        assert adm.queued == 0
        task = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert adm.queued == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert adm.queued == 0
        adm.release()
        assert adm.running == 0
        await adm.acquire()  # the cancelled waiter did not take the freed slot
        assert adm.running == 1

    run(main())


def test_capacity_changes_and_zero_queue():
    async def main():
        adm = Admission(max_queued=0, capacity=0)
        with pytest.raises(QueueFull):
            await adm.acquire()
        adm = Admission(max_queued=3, capacity=0)
        tasks = [asyncio.create_task(adm.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        assert adm.queued == 3
        adm.set_capacity(2)  # replicas came up
        await asyncio.sleep(0)
        assert (adm.running, adm.queued) == (2, 1)
        adm.set_capacity(None)  # unlimited
        await asyncio.gather(*tasks)
        assert adm.running == 3
        with pytest.raises(RuntimeError):
            Admission(1, 1).release()
        async with adm.slot():
            assert adm.running == 4
        assert adm.running == 3

    run(main())


def test_pushback_follows_the_release_rate():
    now = [0.0]
    adm = Admission(max_queued=1, capacity=1, clock=lambda: now[0])

    async def main():
        await adm.acquire()
        for _ in range(10):  # a slot frees every 0.1 s
            now[0] += 0.1
            adm.release()
            await adm.acquire()
        asyncio.get_running_loop().create_task(adm.acquire())
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await adm.acquire()
        assert 150 <= info.value.retry_after_ms <= 250  # (1 queued + this one) / 10 per second

    run(main())


# ------------------------------------------------------------------------------------------------ over gRPC
@pytest.fixture()
def slow_server():
    replica = ScriptedReplica([7], step_s=0.05, max_ongoing_requests=1)
    st = ServerThread()
    address = st.start([replica], RouterSettings(host="127.0.0.1", port=0, max_queued_requests=2,
                                                 health_interval_s=0.05))
    yield st, address, replica
    st.stop()


def _stream_in_thread(client, results, name, **kw):
    def target():
        try:
            results[name] = ("ok", sum(len(r.token_ids) for r in client.generate([1, 2], **kw)))
        except grpc.RpcError as exc:
            results[name] = (exc.code(), exc.details())

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert predicate()


def test_full_queue_answers_resource_exhausted_with_pushback(slow_server):
    st, address, replica = slow_server
    results: dict[str, object] = {}
    with Client(address, timeout=30) as c:
        threads = [_stream_in_thread(c, results, "running", max_tokens=20, ignore_eos=True)]
        _wait(lambda: st.server.core.admission.running == 1)
        threads += [_stream_in_thread(c, results, f"queued{i}", max_tokens=2, ignore_eos=True) for i in range(2)]
        _wait(lambda: st.server.core.admission.queued == 2)
        call = c.inference.Generate(generate_request([1], max_tokens=1), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in info.value.details()
        trailers = dict(info.value.trailing_metadata())
        assert int(trailers[PUSHBACK_TRAILER]) >= 50
        for t in threads:
            t.join(30)
    assert results == {"running": ("ok", 20), "queued0": ("ok", 2), "queued1": ("ok", 2)}


def test_priorities_and_queue_deadline_over_grpc(slow_server):
    st, address, replica = slow_server
    results: dict[str, object] = {}
    with Client(address, timeout=30) as c:
        threads = [_stream_in_thread(c, results, "first", max_tokens=10, ignore_eos=True)]
        _wait(lambda: st.server.core.admission.running == 1)
        threads.append(_stream_in_thread(c, results, "low", max_tokens=1, priority=9, ignore_eos=True,
                                         request_id="low"))
        _wait(lambda: st.server.core.admission.queued == 1)
        threads.append(_stream_in_thread(c, results, "high", max_tokens=1, priority=-1, ignore_eos=True,
                                         request_id="high"))
        _wait(lambda: st.server.core.admission.queued == 2)
        for t in threads:
            t.join(30)
        assert [r.request_id for r in replica.started[1:]] == ["high", "low"]
        # a deadline that passes while queued
        threads = [_stream_in_thread(c, results, "blocker", max_tokens=30, ignore_eos=True)]
        _wait(lambda: st.server.core.admission.running == 1)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(c.generate([1], max_tokens=1, timeout_seconds=0.2))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "queue" in info.value.details() and time.monotonic() - start < 2
        for t in threads:
            t.join(30)
    assert results["blocker"] == ("ok", 30)
