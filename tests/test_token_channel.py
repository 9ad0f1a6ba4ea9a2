"""The multiplexed token channel between router and replica (cluster.token_channel.TokenChannels, ServeBackend).

The replica half runs without Ray first (a scripted core, one event loop): deltas batch per step, arrive whole and
in order, wait for a late channel, and a cancelled request is aborted. Then the whole path on a local Ray (loopback):
ServeBackend in this process against two scripted ModelReplica deployments behind the deployment's request router.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from gptoss_cluster.cluster.app import REPLICA_SERVE_ENV
from gptoss_cluster.cluster.contract import (
    Accepted,
    ChannelOpen,
    ChannelRoute,
    Delta,
    Misrouted,
    ReplicaRequest,
    ReplicaStats,
)
from gptoss_cluster.cluster.router.testing import ScriptedReplica
from gptoss_cluster.cluster.token_channel import TokenChannels
from gptoss_cluster.workers.constraint import Constraint, ResponseFormat
from gptoss_cluster.workers.sampling import SamplingParams

STEP_S = 0.02


def _request(key: int | str, max_tokens: int, router: str = "r1", prompt: list[int] | None = None,
             **fields) -> ReplicaRequest:
    """An int key: request q<key> on router `router`'s channel (calls to TokenChannels); a str: that request id, for
    the ServeBackend, which sets the channel itself."""
    if isinstance(key, int):
        fields["channel"] = ChannelRoute(router, key)
    return ReplicaRequest(f"q{key}" if isinstance(key, int) else key, prompt or [1, 2, 3],
                          SamplingParams(max_tokens=max_tokens, ignore_eos=True), **fields)


async def _submit(channels: TokenChannels, core: ScriptedReplica, request: ReplicaRequest) -> Accepted:
    """Run one request's submit call to its end; its first event (the answer to the call)."""
    events = channels.submit(request, core.generate)
    first = await anext(events)
    async for _ in events:
        raise AssertionError("submit yields only its first event")
    return first


def test_channel_batches_one_item_per_step_and_delivers_every_delta_in_order():
    async def main():
        core = ScriptedReplica(step_s=STEP_S, lockstep=True, replica_id="rep-a")
        channels = TokenChannels("rep-a", idle_close_s=0.3)
        n, max_tokens = 16, 8
        # the requests start before the channel is open: their deltas wait in the outbox
        submits = [asyncio.create_task(_submit(channels, core, _request(k, max_tokens))) for k in range(n)]
        await asyncio.sleep(3 * STEP_S)
        got: dict[int, list[int]] = {k: [] for k in range(n)}
        finishes: dict[int, str] = {}
        batches = 0
        async for batch in channels.stream(ChannelOpen("r1", "rep-a")):
            if not batch:
                continue  # the "open" item
            batches += 1
            for key, item in batch:
                assert key not in finishes, "a delta after the request finished"
                got[key] += item.token_ids
                if item.finish_reason:
                    finishes[key] = item.finish_reason
        # the stream closed by itself: nothing was running any more for idle_close_s
        firsts = await asyncio.gather(*submits)
        assert all(f == Accepted("rep-a") for f in firsts)
        assert got == {k: [1000 + i for i in range(max_tokens)] for k in range(n)}
        assert finishes == dict.fromkeys(range(n), "length")
        # one Serve item per step for all 16 requests (plus the backlog in the first), not one per token
        assert batches <= max_tokens + 2, batches
        assert channels.stats().deltas == n * max_tokens
        assert channels.stats().routers == 0

    asyncio.run(main())


def test_a_backlog_goes_out_in_bounded_batches_in_order():
    """A router far behind gets its backlog in items of at most max_batch_items deltas (each item is one message
    of Serve's transport, which has a size limit), none lost or reordered."""
    async def main():
        core = ScriptedReplica(step_s=STEP_S, lockstep=True, replica_id="rep-a")
        channels = TokenChannels("rep-a", idle_close_s=0.3, max_batch_items=5)
        n, max_tokens = 12, 6
        submits = [asyncio.create_task(_submit(channels, core, _request(k, max_tokens))) for k in range(n)]
        await asyncio.sleep(4 * STEP_S)  # ~3 steps x 12 requests of deltas wait in the outbox
        got: dict[int, list[int]] = {k: [] for k in range(n)}
        sizes = []
        async for batch in channels.stream(ChannelOpen("r1", "rep-a")):
            if batch:
                sizes.append(len(batch))
                for key, item in batch:
                    got[key] += item.token_ids
        await asyncio.gather(*submits)
        assert got == {k: [1000 + i for i in range(max_tokens)] for k in range(n)}
        assert max(sizes) == 5 and sizes.count(5) >= 4, sizes  # the backlog came in full pieces

    asyncio.run(main())


def test_misrouted_channel_says_so_and_a_new_channel_takes_over():
    async def main():
        channels = TokenChannels("rep-a", idle_close_s=5)
        items = [b async for b in channels.stream(ChannelOpen("r1", "rep-b"))]
        assert items == [Misrouted("rep-a")]

        core = ScriptedReplica(step_s=STEP_S, replica_id="rep-a")
        old = channels.stream(ChannelOpen("r1", "rep-a"))
        assert await anext(old) == []
        submit = asyncio.create_task(_submit(channels, core, _request(1, 4)))
        await asyncio.sleep(STEP_S / 2)
        new = channels.stream(ChannelOpen("r1", "rep-a"))  # the router lost the old one
        assert await anext(new) == []
        with pytest.raises(StopAsyncIteration):
            await anext(old)  # the old channel ends; the deltas go to the new one
        tokens = []
        while len(tokens) < 4:
            tokens += [t for _, item in await anext(new) for t in item.token_ids]
        assert tokens == [1000, 1001, 1002, 1003]
        await submit
        await new.aclose()

    asyncio.run(main())


def test_cancelling_a_submit_aborts_the_request_on_the_replica():
    async def main():
        core = ScriptedReplica(step_s=STEP_S, replica_id="rep-a")
        channels = TokenChannels("rep-a")
        submit = asyncio.create_task(_submit(channels, core, _request(7, 1000)))
        await asyncio.sleep(5 * STEP_S)
        assert "q7" in core.live
        submit.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await submit
        assert core.aborted == ["q7"] and not core.live

    asyncio.run(main())


# ================================================================================================ on Ray Serve
@pytest.fixture(scope="module")
def scripted_app():
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from gptoss_cluster.cluster.router.serve_routing import PolicyRequestRouter
    from gptoss_cluster.cluster.router.testing import ScriptedReplicaImpl
    from gptoss_cluster.workers.engine.ray_executor import connect_ray

    if ray.is_initialized():
        ray.shutdown()
    connect_ray(None, num_cpus=4, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    replica = serve.deployment(
        name="ModelReplica", num_replicas=2, max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": REPLICA_SERVE_ENV}},
        request_router_config=RequestRouterConfig(request_router_class=PolicyRequestRouter,
                                                  request_router_kwargs={"policy": "prefix_affinity"}),
    )(ScriptedReplicaImpl)
    serve.run(replica.bind({"step_s": STEP_S, "lockstep": True}), name="channel-test", route_prefix=None)
    try:
        yield serve.get_deployment_handle("ModelReplica", app_name="channel-test")
    finally:
        serve.shutdown()
        ray.shutdown()


async def _collect(backend, request: ReplicaRequest) -> tuple[str, list[int], str]:
    replica, tokens, finish = "", [], ""
    async for item in backend.stream(request):
        if isinstance(item, Accepted):
            replica = item.replica_id
            continue
        assert isinstance(item, Delta), item
        tokens += item.token_ids
        if item.finish_reason:
            finish = item.finish_reason
            break
    return replica, tokens, finish


@pytest.mark.parametrize("transport", ["grpc", "ray"])
def test_serve_backend_streams_many_requests_over_one_channel_per_replica(scripted_app, transport):
    from gptoss_cluster.cluster.router.serve_backend import ServeBackend

    async def main():
        backend = ServeBackend(scripted_app, transport=transport)
        try:
            # Every prompt its own first KV block: with 7 shared prefixes (as this test had) prefix affinity may,
            # by design, keep all 48 small requests on the replicas that first took each prefix (3 k tokens stay
            # within the load bound's 2048-token slack), and whether that is one replica or both depended on timing.
            # Distinct prefixes route by load alone, which spreads them; this test is about the channel.
            n, max_tokens = 48, 24
            results = await asyncio.gather(*(
                _collect(backend, _request(f"q{k}", max_tokens, prompt=[100 + k] * (16 + k))) for k in range(n)))
            assert all(tokens == [1000 + i for i in range(max_tokens)] and finish == "length"
                       for _, tokens, finish in results)
            used = {replica for replica, _, _ in results}
            assert len(used) == 2, "the load spreads over both replicas"
            stats = await backend.replica_stats()
            assert all(isinstance(s, ReplicaStats) for s in stats) and len(stats) == 2
            assert sum(s.channels.deltas for s in stats) >= n * max_tokens / 2  # coalescing may merge deltas
            # a batch per step for all of this router's requests on the replica, not one Serve item per token
            assert sum(s.channels.batches for s in stats) < n * max_tokens / 4, stats
            assert set(backend._channels) <= used

            # closing a stream early cancels the request on its replica
            stream = backend.stream(_request("long", 5000, prompt=[5] * 20))
            accepted = await anext(stream)
            for _ in range(3):
                assert (await anext(stream)).token_ids
            await stream.aclose()
            for _ in range(100):
                stats = {s.replica_id: s for s in await backend.replica_stats()}
                if stats[accepted.replica_id].load.num_running == 0:
                    break
                await asyncio.sleep(0.05)
            assert stats[accepted.replica_id].load.num_running == 0

            # a caller that falls behind gets the deltas already there merged into one, none lost
            items = []
            async for item in backend.stream(_request("slow", 20, prompt=[9] * 20)):
                if isinstance(item, Delta):
                    items.append(item)
                    if item.finish_reason:
                        break
                    await asyncio.sleep(5 * STEP_S)
            assert [t for item in items for t in item.token_ids] == [1000 + i for i in range(20)]
            assert len(items) < 10 and items[-1].finish_reason == "length"
            assert items[-1].usage.completion_tokens == 20
        finally:
            await backend.close()

    asyncio.run(main())


def test_serve_backend_carries_a_request_over_the_grpc_transports_default_limit(scripted_app):
    """A request larger than the 4 MiB that Serve's gRPC transport takes by default (a large grammar, say) reaches
    its replica: the replica's environment raises the limit (cluster.app.REPLICA_SERVE_ENV)."""
    from gptoss_cluster.cluster.router.serve_backend import ServeBackend

    async def main():
        backend = ServeBackend(scripted_app, transport="grpc")
        try:
            grammar = Constraint(ResponseFormat("grammar", "root ::= " + "x" * (6 << 20)))
            request = _request("big", 4, prompt=[3] * 20, constraint=grammar)
            _, tokens, finish = await _collect(backend, request)
            assert tokens == [1000, 1001, 1002, 1003] and finish == "length"
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["grpc", "ray"])
def test_serve_backend_fails_requests_of_a_replica_that_dies(scripted_app, transport):
    from gptoss_cluster.cluster.router.backend import BackendError
    from gptoss_cluster.cluster.router.serve_backend import ServeBackend

    async def main():
        backend = ServeBackend(scripted_app, transport=transport)
        try:
            streams = [backend.stream(_request(f"d{k}", 5000, prompt=[k] * 20)) for k in range(6)]
            accepted = [await anext(s) for s in streams]
            for s in streams:
                await anext(s)  # streaming
            victim = accepted[0].replica_id
            pid = next(s.pid for s in await backend.replica_stats() if s.replica_id == victim)
            os.kill(pid, 9)
            for s, a in zip(streams, accepted, strict=True):
                if a.replica_id != victim:
                    await s.aclose()
                    continue
                with pytest.raises(BackendError):
                    async with asyncio.timeout(60):
                        while True:
                            await anext(s)
        finally:
            await backend.close()

    asyncio.run(main())
