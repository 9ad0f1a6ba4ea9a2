"""Serving benchmark (in the spirit of `vllm bench serve`): a concurrency sweep of streaming requests against the
gRPC router, with TTFT / inter-token / end-to-end percentiles and throughput, and the router's added latency measured
against calling the engine directly in the same run.

Targets:

    # 1. router + replica(s) of the tiny model in one child process (LocalBackend, no Ray)
    .venv/bin/python benchmarks/serving.py --concurrency 1,16,64
    # 2. the router's own overhead: a scripted engine (fixed token cadence, no model) behind the router
    .venv/bin/python benchmarks/serving.py --engine scripted --step-ms 20 --concurrency 64
    # 3. the production path on a local Ray (127.0.0.1): the Router deployment (real RouterImpl, gRPC server,
    #    ServeBackend, the request router) in front of ModelReplica deployments (tiny model, or --engine scripted:
    #    the same deployment methods around a scripted engine)
    .venv/bin/python benchmarks/serving.py --serve --engine scripted --step-ms 20 --concurrency 64
    # 4. a running cluster (gptoss-cluster serve / Helm); with --ray-app the replicas are also called directly
    #    through a Serve handle (this process joins the Ray cluster: run it on a cluster node)
    .venv/bin/python benchmarks/serving.py --address 127.0.0.1:50051 --ray-app gptoss --concurrency 1,16,64
    # 5. the router's own per-request and per-token CPU in isolation: its Generate body (GptossServer.generate_events:
    #    validation, admission, replica choice, detokenization, response messages, metrics) over a scripted replica
    #    in this process, no gRPC, no Ray, one request at a time
    .venv/bin/python benchmarks/serving.py --micro
    # 6. what one streamed item costs through a Serve deployment handle (local Ray, a deployment yielding small deltas
    #    as fast as it can or every 20 ms): CPU per item in the consuming process and in the replica
    .venv/bin/python benchmarks/serving.py --serve-micro
    # any of 1-3 and 5 with tracing on (cluster.tracing): --trace exports every span to an OTLP/gRPC sink in a
    # process of its own (a collector elsewhere; it counts the spans and drops them); 5 then adds the traced
    # router body and the replica's span recording next to the untraced paths
    .venv/bin/python benchmarks/serving.py --micro --trace

Paths. Router = the gRPC Generate call from this process. Direct = the same requests straight to the engine: the
replica core in the server process with no gRPC (1, 2), or the router's own replica transport (`ServeBackend`:
`ModelReplica.submit` and the token channel through a Serve deployment handle) from this process, no router (3, 4).
"Added" = router minus direct at each percentile. gRPC floor (1, 2) = the same
client calling a bare grpc.aio Generate in the server process that streams the same replica's tokens, grouped as the
router's `--stream-interval` groups them, with none of the router's work: floor minus direct is what a streamed gRPC
call costs on the machine, router minus floor is the router's own code. `--client-cpus 0` runs this process (the
client) on CPU 0 and everything else on the other CPUs, as a client on another machine would.

Fairness. Both paths run at the same concurrency on statistically identical prompts, interleaved: every level runs
`--rounds` rounds, each round both paths back to back, the order alternating, and the figures pool all rounds.
Arrivals (`--arrival`): `poisson` is an open loop at `--request-rate` requests/s (the same seeded arrival times for
every path) with at most `concurrency` in flight, as `vllm bench serve`; it keeps arrivals independent of the
engine's steps (in a closed loop a direct caller's next request starts right after a step, before the next one).
`steady` (default) keeps exactly `concurrency` streams in flight with their starts spread
evenly over one request's duration (a closed loop in steady state: new requests arrive while the others stream, as
in production); `burst` starts them all at the same instant (the first wave of a closed loop: the last of 64
simultaneous arrivals waits for the 63 before it, so its TTFT measures the router's per-request cost times 63).
CPU: the router process's CPU time per request (router path minus direct path in the same process for 1-3; the
engine's work is the same in both) separates the router's own overhead from CPU contention on a shared machine; the
client's CPU per request is printed too. Processes run with the GC frozen after start-up, as Ray Serve does for its
replicas (RAY_SERVE_FREEZE_GC_ON_STARTUP).

Workload: random prompt token ids (`--input-len`), exactly `--output-len` generated tokens (EOS ignored), greedy.
`--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptoss_cluster.cluster.bench import (  # noqa: E402
    CLOSED_LOOP,
    Pacing,
    Record,
    Sender,
    format_row,
    router_level,
    run_level,
    summarize,
    table_header,
    workload,
)
from gptoss_cluster.cluster.router.policies import ROUTING_POLICIES  # noqa: E402

DEFAULT_CHECKPOINT = Path(os.environ.get("TMPDIR", "/tmp")) / "gptoss-bench" / "tiny-hf"
APP = "gptoss-bench"


def process_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads) or of `pid` (same machine)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_list(text: str) -> set[int]:
    """'0' / '0,2' / '0-3' -> CPU ids."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def pin_process(cpus: set[int]) -> None:
    """Move every thread of this process onto `cpus` (sched_setaffinity of pid 0 moves only the calling thread)."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            pass


def freeze_gc() -> None:
    """What Ray Serve does once a replica is initialized: start-up objects leave the GC's generations, so that
    collections in the request path stay short."""
    gc.collect()
    gc.freeze()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _engine_request(prompt: list[int], output_len: int) -> Any:
    """What the router would send a replica for this prompt (cluster.contract.ReplicaRequest), greedy, EOS ignored."""
    from gptoss_cluster.cluster.contract import ReplicaRequest

    return ReplicaRequest(os.urandom(8).hex(), prompt, _greedy(output_len))


@functools.cache
def _greedy(output_len: int) -> Any:
    """Greedy sampling of exactly `output_len` tokens (immutable: one object serves every direct request, so the
    direct path costs what a caller that validated once would pay)."""
    from gptoss_cluster.workers.sampling import SamplingParams

    return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)


# ------------------------------------------------------------------------------------------------ tracing
def _sink_process(conn: Any) -> None:
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = [0]

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the proto's name)
            received[0] += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    while conn.recv() == "count":
        conn.send(received[0])
    server.stop(None)


class OtlpSink:
    """An OTLP/gRPC trace receiver in a process of its own (a collector elsewhere: its CPU is nobody's here) that
    counts the spans it is sent and drops them. `env()`: the standard variables that point tracers at it."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_sink_process, args=(child,), daemon=True)
        self.proc.start()
        self.endpoint = f"http://127.0.0.1:{self.conn.recv()}"

    def env(self) -> dict[str, str]:
        # batches of up to 512 spans at least every 200 ms, and a queue that never drops one at these rates
        return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_BSP_MAX_QUEUE_SIZE": "65536"}

    def spans(self) -> int:
        self.conn.send("count")
        return int(self.conn.recv())

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(10)


def replica_span_cost(requests: int = 2000) -> float:
    """CPU seconds per request of the replica's tracing: its spans recorded at a request's end (request span, three
    engine phases, first_token event, attributes) and their export, for a request with a traceparent."""
    import types

    from gptoss_cluster.cluster.contract import ReplicaRequest
    from gptoss_cluster.cluster.replica import ReplicaCore
    from gptoss_cluster.cluster.tracing import Tracer
    from gptoss_cluster.workers.engine import RequestOutput, RequestTimes, Usage

    tracer = Tracer.from_env("replica")
    core = types.SimpleNamespace(served_name="bench", replica_id="bench#r0")  # what _record_spans reads
    now = time.monotonic()
    out = RequestOutput("r", [5], finished=True, finish_reason="length", usage=Usage(64, 32, 0),
                        times=RequestTimes(now, now + 0.001, now + 0.01, now + 0.5))
    request = ReplicaRequest("r", list(range(64)), _greedy(32),
                             trace_context={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    t0 = time.process_time()
    for _ in range(requests):
        ReplicaCore._record_spans(core, tracer, request, time.time_ns(), out, None)  # type: ignore[arg-type]
    tracer.flush()
    spent = time.process_time() - t0
    tracer.shutdown()
    return spent / requests


# ------------------------------------------------------------------------------------------------ local target
def _direct_sender(cores: list[Any], output_len: int) -> Sender:
    """Requests straight into the replica cores (round robin), no router, no gRPC."""
    from gptoss_cluster.cluster.contract import Delta, ReplicaError

    turn = [0]

    async def send(prompt: list[int], record: Record) -> None:
        core = cores[turn[0] % len(cores)]
        turn[0] += 1
        async for item in core.generate(_engine_request(prompt, output_len)):
            if isinstance(item, ReplicaError):
                raise RuntimeError(item.message)
            if isinstance(item, Delta):
                record.got(len(item.token_ids))

    return send


def _floor_server(cores: list[Any], stream_interval: int = 1) -> Any:
    """The gRPC floor: a bare grpc.aio server whose Generate streams the replica cores' tokens with none of the
    router's work (no validation, admission, replica choice, text, metrics), grouped as the router groups them: the
    first token at once, then GenerateResponses of at least `stream_interval` tokens (the last whatever is left).
    Same client, transport, process, engine and messages as the router path: router minus floor is the router's own
    code; floor minus direct is what one streamed gRPC call costs on this machine."""
    import grpc

    from gptoss_cluster.cluster.contract import Delta
    from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
    from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc

    turn = [0]

    class Floor(pb_grpc.InferenceServicer):
        async def Generate(self, request: Any, context: Any) -> Any:  # noqa: N802
            core = cores[turn[0] % len(cores)]
            turn[0] += 1
            engine_request = _engine_request(list(request.token_ids.ids), request.sampling.max_tokens)
            held: list[int] = []
            first = True
            async for item in core.generate(engine_request):
                if not isinstance(item, Delta):
                    continue
                held += item.token_ids
                if item.finished:
                    u = item.usage
                    yield pb.GenerateResponse(token_ids=held, finish_reason=pb.FINISH_REASON_LENGTH,
                                              usage=pb.Usage(prompt_tokens=u.prompt_tokens,
                                                             completion_tokens=u.completion_tokens,
                                                             cached_prompt_tokens=u.cached_prompt_tokens))
                    return
                if first or len(held) >= stream_interval:
                    yield pb.GenerateResponse(token_ids=held)
                    held, first = [], False

    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(Floor(), server)
    return server


def _server_process(conn: Any, engine: str, model: str, replicas: int, scripted: dict[str, Any], num_blocks: int,
                    stream_interval: int = 1, routing_policy: str = "prefix_affinity") -> None:
    os.environ.setdefault("GPTOSS_NO_PROGRESS", "1")
    from gptoss_cluster.cluster.metrics import Metrics
    from gptoss_cluster.cluster.router.backend import LocalBackend
    from gptoss_cluster.cluster.router.policies import make_policy
    from gptoss_cluster.cluster.router.server import GptossServer
    from gptoss_cluster.cluster.router.settings import RouterSettings
    from gptoss_cluster.cluster.tracing import Tracer

    async def main() -> None:
        # as the Router and ModelReplica deployments do: spans when the OTEL_* variables say so (--trace)
        router_tracer, replica_tracer = Tracer.from_env("router"), Tracer.from_env("replica")
        if engine == "scripted":
            from gptoss_cluster.cluster.router.testing import ScriptedReplica

            cores = [ScriptedReplica(**scripted) for _ in range(replicas)]
        else:
            from gptoss_cluster.cluster.replica import ReplicaCore, ReplicaSettings
            from gptoss_cluster.workers.engine import LocalExecutor

            settings = ReplicaSettings(model=model, dtype="float32", max_ongoing_requests=1024,
                                       engine={"num_blocks": num_blocks, "max_num_seqs": 256})
            first = ReplicaCore(settings, replica_id="bench#r0", tracer=replica_tracer)
            cores = [first] + [ReplicaCore(settings, replica_id=f"bench#r{i}", model_config=first.model_config,
                                           executor=LocalExecutor(first.executor.model, True), tracer=replica_tracer)
                               for i in range(1, replicas)]
        settings = RouterSettings(host="127.0.0.1", port=0, max_queued_requests=4096, health_interval_s=0.5,
                                  stream_interval=stream_interval)
        server = GptossServer(LocalBackend(cores, make_policy(routing_policy)), settings, Metrics(), router_tracer)
        port = await server.start()
        await server.wait_ready(60)
        floor = _floor_server(cores, stream_interval)
        floor_port = floor.add_insecure_port("127.0.0.1:0")
        await floor.start()
        freeze_gc()
        conn.send(("ready", port, floor_port, os.getpid()))
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "stop":
                break
            _, prompts, concurrency, output_len, pacing = command
            records, wall = await run_level(_direct_sender(cores, output_len), prompts, concurrency, pacing)
            conn.send(("result", records, wall))
        await server.stop(0)
        await floor.stop(0)
        for core in cores:
            await core.shutdown()
        router_tracer.shutdown()
        replica_tracer.shutdown()

    asyncio.run(main())


class LocalTarget:
    """A router + replica(s) in a child process; `direct` runs a level inside that process."""

    def __init__(self, engine: str, model: str, replicas: int, scripted: dict[str, Any], num_blocks: int,
                 stream_interval: int = 1, routing_policy: str = "prefix_affinity") -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_server_process, daemon=True,
                                args=(child, engine, model, replicas, scripted, num_blocks, stream_interval,
                                      routing_policy))
        self.proc.start()
        if not self.conn.poll(600):
            raise TimeoutError("the server process did not start")
        _, port, floor_port, self.router_pid = self.conn.recv()
        self.address = f"127.0.0.1:{port}"
        self.floor_address: str | None = f"127.0.0.1:{floor_port}"

    async def direct(self, prompts: list[list[int]], concurrency: int, output_len: int,
                     pacing: Pacing) -> tuple[list[Record], float] | None:
        self.conn.send(("direct", prompts, concurrency, output_len, pacing))
        loop = asyncio.get_running_loop()
        _, records, wall = await loop.run_in_executor(None, self.conn.recv)
        return records, wall

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


# ------------------------------------------------------------------------------------------------ Ray targets
class RayTarget:
    """A running cluster; `direct` sends the requests through the router's replica transport (`ServeBackend` over a
    Serve handle) from this process, no router."""

    def __init__(self, address: str, app: str | None, transport: str = "grpc") -> None:
        self.address = address
        self.transport = transport
        self.floor_address: str | None = None
        self.handle = None
        self.router_pid: int | None = None
        if app:
            from gptoss_cluster.cluster.app import ray_auth_token

            if ray_auth_token() and "RAY_AUTH_MODE" not in os.environ:
                os.environ["RAY_AUTH_MODE"] = "token"  # Ray only sends its token to an explicit address when told
            from ray import serve

            from gptoss_cluster.workers.engine.ray_executor import connect_ray

            connect_ray(os.environ.get("RAY_ADDRESS") or "auto")  # keeps a loopback address on loopback
            self.handle = serve.get_deployment_handle("ModelReplica", app_name=app)
            self._find_router(app)

    def _find_router(self, app: str) -> None:
        """The router's pid, when it runs on this machine (for its CPU time)."""
        from ray import serve

        try:
            info = serve.get_deployment_handle("Router", app_name=app).info.remote().result(timeout_s=30)
        except Exception:  # noqa: BLE001 - an older router without info(): no CPU figure
            return
        if os.path.exists(f"/proc/{info.get('pid')}"):
            self.router_pid = int(info["pid"])

    async def direct(self, prompts: list[list[int]], concurrency: int, output_len: int,
                     pacing: Pacing) -> tuple[list[Record], float] | None:
        if self.handle is None:
            return None
        from gptoss_cluster.cluster.contract import Delta, ReplicaError
        from gptoss_cluster.cluster.router.serve_backend import ServeBackend

        # the router's own replica transport (per-request call + multiplexed token channel), without the router
        backend = ServeBackend(self.handle, transport=self.transport)

        async def send(prompt: list[int], record: Record) -> None:
            async for item in backend.stream(_engine_request(prompt, output_len)):
                if isinstance(item, ReplicaError):
                    raise RuntimeError(item.message)
                if isinstance(item, Delta):
                    record.got(len(item.token_ids))
                    if item.finished:
                        return

        try:
            return await run_level(send, prompts, concurrency, pacing)
        finally:
            await backend.close()

    def close(self) -> None:
        return None


class ServeTarget(RayTarget):
    """A local Ray on 127.0.0.1 running the real Router deployment in front of ModelReplica deployments: the tiny
    model (cluster.app's application), or a scripted engine inside the same deployment methods."""

    def __init__(self, engine: str, model: str, replicas: int, scripted: dict[str, Any], num_blocks: int,
                 env: dict[str, str] | None = None, stream_interval: int = 1,
                 router_env: dict[str, str] | None = None, access_log: bool = False,
                 transport: str = "grpc", routing_policy: str = "prefix_affinity") -> None:
        from ray import serve

        from gptoss_cluster.workers.engine.ray_executor import connect_ray

        connect_ray(None, num_cpus=max(4, 2 * replicas + 2), log_to_driver=False)
        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1", "port": _free_port()})
        port = _free_port()
        if engine == "scripted":
            from ray.serve.config import RequestRouterConfig

            from gptoss_cluster.cluster.app import (
                DEPLOYMENT_LOGGING,
                REPLICA_SERVE_ENV,
                ROUTER_SERVE_ENV,
                tracing_env,
            )
            from gptoss_cluster.cluster.router.deployment import RouterImpl
            from gptoss_cluster.cluster.router.serve_routing import PolicyRequestRouter
            from gptoss_cluster.cluster.router.settings import RouterSettings
            from gptoss_cluster.cluster.router.testing import ScriptedReplicaImpl

            logging = {**DEPLOYMENT_LOGGING, "enable_access_log": True} if access_log else DEPLOYMENT_LOGGING
            replica = serve.deployment(
                name="ModelReplica", num_replicas=replicas, max_ongoing_requests=1024,
                ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {**tracing_env(), **REPLICA_SERVE_ENV,
                                                                                  **(env or {})}}},
                request_router_config=RequestRouterConfig(request_router_class=PolicyRequestRouter,
                                                          request_router_kwargs={"policy": routing_policy}),
                logging_config=logging,
            )(ScriptedReplicaImpl)
            router = serve.deployment(name="Router", num_replicas=1, max_ongoing_requests=1000,
                                      ray_actor_options={"num_cpus": 0.5, "runtime_env": {
                                          "env_vars": {**tracing_env(), **ROUTER_SERVE_ENV, **(env or {}),
                                                       **(router_env or {})}}},
                                      logging_config=logging)(RouterImpl)
            settings = RouterSettings(host="127.0.0.1", port=port, max_queued_requests=4096, health_interval_s=0.5,
                                      stream_interval=stream_interval, replica_transport=transport)
            app = router.bind(replica.bind(scripted), settings.to_dict())
        else:
            from gptoss_cluster.cluster.app import build_application

            app = build_application(_tiny_config(model, replicas, port, num_blocks, stream_interval, transport,
                                                 routing_policy))
        serve.run(app, name=APP, route_prefix=None)
        super().__init__(f"127.0.0.1:{port}", None, transport)
        self.handle = serve.get_deployment_handle("ModelReplica", app_name=APP)
        self._find_router(APP)
        deadline = time.monotonic() + 120
        router = serve.get_deployment_handle("Router", app_name=APP)
        while not router.info.remote().result(timeout_s=30).get("ready_replicas"):
            if time.monotonic() > deadline:
                raise TimeoutError("the router saw no ready replica within 120 s")
            time.sleep(0.2)

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _tiny_config(model: str, replicas: int, port: int, num_blocks: int, stream_interval: int = 1,
                 transport: str = "grpc", routing_policy: str = "prefix_affinity") -> Any:
    from gptoss_cluster.cluster.app import parse_args

    config = parse_args({"model": model, "num_replicas": replicas, "dtype": "float32", "grpc_port": port,
                         "metrics_port": 0, "max_ongoing_requests": 1024, "max_queued_requests": 4096,
                         "stream_interval": stream_interval, "replica_transport": transport,
                         "routing_policy": routing_policy,
                         "engine": {"num_blocks": num_blocks, "max_num_seqs": 256}})
    config.grpc_host = "127.0.0.1"
    return config


# ------------------------------------------------------------------------------------------------ router path
# ------------------------------------------------------------------------------------------------ micro
def micro(reps: int = 5, requests: int = 1000, long_tokens: int = 256, trace: bool = False) -> dict[str, Any]:
    """CPU per request (1-token requests) and per extra token (`long_tokens`-token requests) of: the scripted
    replica alone (direct), the router's Generate body over it, and the same with a deadline (timeout) set; with
    `trace` (the OTEL_* variables point at a sink) also the body with tracing on, each call with a traceparent, its
    spans' export included (flushed inside the timing). The best of `reps` repetitions (interference from other
    processes only ever adds)."""
    from gptoss_cluster.cluster.client import generate_request
    from gptoss_cluster.cluster.metrics import Metrics
    from gptoss_cluster.cluster.router.backend import LocalBackend
    from gptoss_cluster.cluster.router.server import GptossServer
    from gptoss_cluster.cluster.router.settings import RouterSettings
    from gptoss_cluster.cluster.router.testing import ScriptedReplica
    from gptoss_cluster.cluster.tracing import Tracer
    from gptoss_cluster.workers.harmony import get_tokenizer

    async def run() -> dict[str, Any]:
        text = get_tokenizer().encode("The quick brown fox jumps over the lazy dog. " * 80)
        core = ScriptedReplica(text, max_ongoing_requests=1024)
        server = GptossServer(LocalBackend([core]), RouterSettings(host="127.0.0.1", port=0, health_interval_s=5),
                              Metrics())
        await server.start()
        await server.wait_ready(30)
        tracer = Tracer.from_env("router") if trace else None
        traced = None
        if tracer is not None:
            traced = GptossServer(LocalBackend([core]), RouterSettings(host="127.0.0.1", port=0, health_interval_s=5),
                                  Metrics(), tracer)
            await traced.start()
            await traced.wait_ready(30)
        freeze_gc()
        prompt = list(range(1000, 1064))
        caller = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}

        async def direct(out: int, n: int) -> None:
            for _ in range(n):
                async for _item in core.generate(_engine_request(prompt, out)):
                    pass

        async def router(out: int, n: int, timeout: float | None, via: Any = server) -> None:
            for _ in range(n):
                request = generate_request(prompt, max_tokens=out, ignore_eos=True, temperature=0)
                async for _response in via.core.generate_events(request, timeout=timeout, trace_context=caller):
                    pass
            if via is traced:
                tracer.flush()  # the spans' export counts too

        paths: dict[str, Callable[[int, int], Awaitable[None]]] = {
            "direct (scripted replica alone)": direct,
            "router body": lambda out, n: router(out, n, None),
            "router body, with a deadline": lambda out, n: router(out, n, 600.0),
        }
        if traced is not None:
            paths["router body, traced (4 spans exported per call)"] = lambda out, n: router(out, n, None, traced)
        best: dict[str, list[float]] = {name: [float("inf"), float("inf")] for name in paths}
        for _ in range(reps):
            for name, fn in paths.items():  # interleaved
                t0 = time.process_time()
                await fn(1, requests)
                t1 = time.process_time()
                await fn(long_tokens, requests // 25)
                t2 = time.process_time()
                per_request = (t1 - t0) / requests
                per_token = ((t2 - t1) / (requests // 25) - per_request) / (long_tokens - 1)
                best[name] = [min(best[name][0], per_request), min(best[name][1], per_token)]
        await server.stop(0)
        if traced is not None:
            await traced.stop(0)
            tracer.shutdown()
        return {name: {"us_per_request": v[0] * 1e6, "us_per_token": v[1] * 1e6} for name, v in best.items()}

    return asyncio.run(run())


class _Items:
    """Body of the --serve-micro deployment: streams `n` deltas of `per` token ids, `sleep_s` apart."""

    async def stream(self, n: int, per: int, sleep_s: float) -> Any:
        from gptoss_cluster.cluster.contract import Delta

        for _ in range(n):
            if sleep_s:
                await asyncio.sleep(sleep_s)
            yield Delta(list(range(per)))

    def pid(self) -> int:
        return os.getpid()


def serve_micro(items: int = 3200) -> list[dict[str, Any]]:
    """CPU per streamed item through a Serve handle: consumer (this process) and replica, for 1 and 16 concurrent
    streams, 1 or 8 token ids per item, items back to back or 20 ms apart (a decode cadence)."""
    import ray
    from ray import serve

    from gptoss_cluster.workers.engine.ray_executor import connect_ray

    connect_ray(None, num_cpus=4, log_to_driver=False)
    serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1", "port": _free_port()})
    handle = serve.run(serve.deployment(name="Items", max_ongoing_requests=1000,
                                        ray_actor_options={"num_cpus": 0.5})(_Items).bind(),
                       name="gptoss-bench-items", route_prefix=None)
    pid = handle.pid.remote().result()
    stream = handle.options(stream=True)
    freeze_gc()

    async def run(streams: int, per: int, sleep_s: float) -> dict[str, Any]:
        async def one() -> int:
            k = 0
            async for _ in stream.stream.remote(items // streams, per, sleep_s):
                k += 1
            return k

        if streams == 1:
            await one()  # warm the path
        t0, c0, r0 = time.perf_counter(), process_cpu_s(), process_cpu_s(pid)
        total = sum(await asyncio.gather(*(one() for _ in range(streams))))
        t1, c1, r1 = time.perf_counter(), process_cpu_s(), process_cpu_s(pid)
        return {"streams": streams, "tokens_per_item": per, "sleep_ms": sleep_s * 1e3, "items": total,
                "wall_us_per_item": (t1 - t0) / total * 1e6, "consumer_cpu_us_per_item": (c1 - c0) / total * 1e6,
                "replica_cpu_us_per_item": (r1 - r0) / total * 1e6}

    try:
        cases = [(1, 1, 0.0), (16, 1, 0.0), (16, 8, 0.0), (16, 1, 0.02)]
        return [asyncio.run(run(*case)) for case in cases]
    finally:
        serve.shutdown()
        ray.shutdown()


# ------------------------------------------------------------------------------------------------ main
def _paths(target: Any, level: int, n: int, args: argparse.Namespace, token: str | None, pacing: Pacing,
           seed: int) -> dict[str, Callable[[], Awaitable[tuple[list[Record], float] | None]]]:
    """One round's runs (different prompts of the same shape: no prefix-cache help for any)."""
    paths: dict[str, Callable[[], Awaitable[tuple[list[Record], float] | None]]] = {
        "direct": lambda: target.direct(workload(n, args.input_len, seed), level, args.output_len, pacing),
        "router": lambda: router_level(target.address, workload(n, args.input_len, seed + 1), level,
                                       args.output_len, token, pacing),
    }
    if target.floor_address:
        paths["grpc floor"] = lambda: router_level(target.floor_address, workload(n, args.input_len, seed + 2),
                                                   level, args.output_len, None, pacing)
    return paths


async def _measure(fn: Callable[[], Awaitable[tuple[list[Record], float] | None]], router_pid: int | None
                   ) -> tuple[list[Record], float, dict[str, float]] | None:
    """Run one path's level; CPU seconds of the server (router) process and of this process meanwhile."""
    s0 = process_cpu_s(router_pid) if router_pid else None
    c0 = process_cpu_s()
    result = await fn()
    c1 = process_cpu_s()
    s1 = process_cpu_s(router_pid) if router_pid else None
    if result is None:
        return None
    cpu = {"client": c1 - c0}
    if s0 is not None and s1 is not None:
        cpu["server"] = s1 - s0
    return result[0], result[1], cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="a running router HOST:PORT (default: start one locally)")
    p.add_argument("--ray-app", default=None, help="with --address: Serve application to call directly")
    p.add_argument("--serve", action="store_true", help="start a local Ray + Serve application (target 3)")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="--serve --engine scripted: environment of both deployments, over cluster.app's "
                        "REPLICA_SERVE_ENV / ROUTER_SERVE_ENV (e.g. Serve's own flags)")
    p.add_argument("--router-env", action="append", default=[], metavar="KEY=VALUE",
                   help="--serve --engine scripted: environment of the Router deployment only, over "
                        "cluster.app.ROUTER_SERVE_ENV")
    p.add_argument("--access-log", action="store_true",
                   help="--serve --engine scripted: Serve's access log line per call on (cluster.app turns it off)")
    p.add_argument("--engine", choices=["tiny", "scripted"], default="tiny", help="local target's engine")
    p.add_argument("--model", default=None, help="checkpoint for --engine tiny (default: written once)")
    p.add_argument("--replicas", type=int, default=1, help="local replicas (default 1)")
    p.add_argument("--step-ms", type=float, default=20.0, help="scripted engine: ms per token (default 20)")
    p.add_argument("--lockstep", action="store_true",
                   help="scripted engine: one step clock for all streams, as a batching engine")
    p.add_argument("--coalesce", action="store_true",
                   help="scripted engine: tokens fall due on schedule and each item carries all that are due, as "
                        "ReplicaCore does with the engine's queued outputs (default: one token per item)")
    p.add_argument("--first-token-ms", type=float, default=None,
                   help="scripted engine: each stream's first token this long after its request arrived, off the "
                        "step clock (TTFT then shows the router's latency, not rounded to whole lockstep steps)")
    p.add_argument("--num-blocks", type=int, default=4096, help="KV blocks per local replica")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated levels (default 1,16,64)")
    p.add_argument("--num-requests", type=int, default=0, help="requests per path, level and round (default: "
                                                                    "4 x concurrency, >= 16)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per level (default 2)")
    p.add_argument("--arrival", choices=["steady", "burst", "poisson"], default="steady",
                   help="steady: closed loop, starts spread over one request's duration; burst: closed loop, all at "
                        "once; poisson: open loop at --request-rate, at most --concurrency in flight")
    p.add_argument("--request-rate", type=float, default=0.0,
                   help="requests/s of --arrival poisson (the same seeded arrival times for every path)")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="the router's stream_interval: tokens per delta after the first (default 1)")
    p.add_argument("--replica-transport", choices=["grpc", "ray"], default="grpc",
                   help="--serve / --ray-app: how the router's and the direct path's Serve calls reach the replicas "
                        "(RouterSettings.replica_transport; default grpc)")
    p.add_argument("--routing-policy", choices=ROUTING_POLICIES, default="prefix_affinity",
                   help="which replica serves a request, with --replicas > 1 (cluster.router.policies; default "
                        "prefix_affinity)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=4, help="requests before measuring (default 4)")
    p.add_argument("--client-cpus", type=cpu_list, default=None, metavar="LIST",
                   help="run the client (this process) on these CPUs and the servers (router, replicas, Ray) on the "
                        "others, as a client on another machine would (e.g. 0 on a 2-core box)")
    p.add_argument("--json", type=Path, default=None, help="write all figures here")
    p.add_argument("--micro", action="store_true", help="only the in-process per-request / per-token CPU (target 5)")
    p.add_argument("--serve-micro", action="store_true", help="only the CPU per streamed Serve item (target 6)")
    p.add_argument("--trace", action="store_true",
                   help="tracing on: every span exported to an OTLP/gRPC sink in a process of its own (targets 1-3, 5)")
    args = p.parse_args(argv)
    sink: OtlpSink | None = None
    if args.trace:
        sink = OtlpSink()
        os.environ.update(sink.env())  # read by the tracers of this process and of every one it starts
    try:
        return _main(args, p, sink)
    finally:
        if sink is not None:
            sink.close()


def _main(args: argparse.Namespace, p: argparse.ArgumentParser, sink: OtlpSink | None) -> int:
    if args.serve_micro:
        rows = serve_micro()
        print("| streams | token ids / item | items every | items | wall us/item | consumer CPU us/item | "
              "replica CPU us/item |")
        print("|---:|---:|---|---:|---:|---:|---:|")
        for r in rows:
            cadence = f"{r['sleep_ms']:g} ms" if r["sleep_ms"] else "back to back"
            print(f"| {r['streams']} | {r['tokens_per_item']} | {cadence} | {r['items']} | "
                  f"{r['wall_us_per_item']:.0f} | {r['consumer_cpu_us_per_item']:.0f} | "
                  f"{r['replica_cpu_us_per_item']:.0f} |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0
    if args.micro:
        figures = micro(trace=sink is not None)
        if sink is not None:
            figures["replica spans at a request's end (4 spans, exported)"] = {
                "us_per_request": replica_span_cost() * 1e6, "us_per_token": 0.0}
            figures["spans received by the sink"] = sink.spans()
        print("| path (in process, no gRPC, CPU time) | per request (1 token) us | per extra token us |")
        print("|---|---:|---:|")
        for name, v in figures.items():
            if isinstance(v, dict):
                print(f"| {name} | {v['us_per_request']:.0f} | {v['us_per_token']:.1f} |")
        if sink is not None:
            print(f"spans received by the sink: {figures['spans received by the sink']}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0
    if (args.arrival == "poisson") != (args.request_rate > 0):
        p.error("--arrival poisson needs --request-rate > 0, and --request-rate needs --arrival poisson")
    levels = [int(c) for c in args.concurrency.split(",") if c]
    token = os.environ.get("GPTOSS_AUTH_TOKEN") or None

    model = args.model
    if args.engine == "tiny" and model is None and not args.address:
        from gptoss_cluster.workers.checkpoint import write_checkpoint
        from gptoss_cluster.workers.config import ModelConfig

        model = str(DEFAULT_CHECKPOINT)
        if not (DEFAULT_CHECKPOINT / "config.json").exists():
            write_checkpoint(ModelConfig.preset("tiny"), DEFAULT_CHECKPOINT, seed=0, progress=False)
    scripted = {"step_s": args.step_ms / 1000, "max_ongoing_requests": 1024, "lockstep": args.lockstep,
                "coalesce": args.coalesce,
                "first_token_s": None if args.first_token_ms is None else args.first_token_ms / 1000}
    engine = (f"{args.replicas} {args.engine} replica(s)"
              + (f" ({args.step_ms:g} ms/token{', lockstep' if args.lockstep else ''}"
                 f"{', coalescing' if args.coalesce else ''}"
                 f"{f', first token {args.first_token_ms:g} ms after arrival' if args.first_token_ms else ''})"
                 if args.engine == "scripted" else " (float32, CPU)")
              + (f"; router stream_interval {args.stream_interval}" if args.stream_interval != 1 else "")
              + (f"; routing policy {args.routing_policy}" if args.replicas > 1 else ""))
    server_cpus: set[int] | None = None
    if args.client_cpus is not None:
        server_cpus = os.sched_getaffinity(0) - args.client_cpus
        if not args.client_cpus <= os.sched_getaffinity(0) or not server_cpus:
            p.error(f"--client-cpus: must be some of this machine's CPUs {sorted(os.sched_getaffinity(0))}, "
                    "not all")
        pin_process(server_cpus)  # what starts now (the server process, Ray's processes) inherits the servers' CPUs
    if args.address:
        target: Any = RayTarget(args.address, args.ray_app, args.replica_transport)
        what = f"cluster at {args.address}"
    elif args.serve:
        env = dict(kv.split("=", 1) for kv in args.serve_env)
        router_env = dict(kv.split("=", 1) for kv in args.router_env)
        target = ServeTarget(args.engine, model or "", args.replicas, scripted, args.num_blocks, env,
                             args.stream_interval, router_env, args.access_log, args.replica_transport,
                             args.routing_policy)
        what = (f"local Ray Serve: Router deployment + {engine} as ModelReplica deployment(s), "
                f"{args.replica_transport} transport"
                + (f"; deployments' env {env}" if env else "") + (f"; Router's env {router_env}" if router_env else ""))
    else:
        target = LocalTarget(args.engine, model or "", args.replicas, scripted, args.num_blocks, args.stream_interval,
                             args.routing_policy)
        what = f"local router (LocalBackend, one process) + {engine}"
    if args.client_cpus is not None and server_cpus is not None:
        pin_process(args.client_cpus)
        what += f"; client on CPUs {sorted(args.client_cpus)}, servers on {sorted(server_cpus)}"
    if sink is not None:
        what += "; tracing on (spans to an OTLP sink in a process of its own)"
    freeze_gc()
    results: dict[str, Any] = {"target": what, "input_len": args.input_len, "output_len": args.output_len,
                               "arrival": args.arrival, "rounds": args.rounds, "levels": {}}
    print(f"# serving benchmark: {what}; prompts {args.input_len} tokens, outputs {args.output_len} tokens; "
          f"{args.arrival} arrivals; {args.rounds} interleaved rounds per level")
    print(table_header("path @ concurrency"))

    async def sweep() -> None:
        warm = workload(args.warmup, args.input_len, args.seed + 99)
        request_s = 0.0
        if warm:
            await router_level(target.address, warm, len(warm), args.output_len, token)
            direct = await target.direct(warm, 1, args.output_len, CLOSED_LOOP)
            if direct is not None:
                request_s = statistics.median(r.times[-1] - r.start for r in direct[0] if r.times)
        for level in levels:
            n = args.num_requests or max(16, 4 * level)
            pooled: dict[str, list[Any]] = {}
            for rnd in range(args.rounds):
                seed = args.seed + 1000 * level + 10 * rnd
                pacing = Pacing(stagger_s=request_s if args.arrival == "steady" else 0.0,
                                rate=args.request_rate if args.arrival == "poisson" else 0.0, seed=seed)
                runs = _paths(target, level, n, args, token, pacing, seed)
                order = list(runs)
                for name in (order if rnd % 2 == 0 else order[::-1]):  # interleaved, alternating order
                    got = await _measure(runs[name], target.router_pid)
                    if got is None:
                        continue
                    records, wall, cpu = got
                    pool = pooled.setdefault(name, [[], 0.0, {}])
                    pool[0].extend(records)
                    pool[1] += wall
                    for k, v in cpu.items():
                        pool[2][k] = pool[2].get(k, 0.0) + v
            entry: dict[str, Any] = {}
            for name, (records, wall, cpu) in pooled.items():
                if records:
                    entry[name] = summarize(records, wall, cpu)
            router, direct = entry["router"], entry.get("direct")
            if direct is not None:
                entry["added_ms"] = {k: {q: router[k][q] - direct[k][q] for q in ("p50", "p90", "p99")}
                                     for k in ("ttft_ms", "itl_ms", "e2e_ms")}
                rc, dc = router["cpu_ms_per_request"], direct["cpu_ms_per_request"]
                if "server" in rc and "server" in dc:
                    entry["router_cpu_ms_per_request"] = rc["server"] - dc["server"]
                print(format_row(f"direct @ {level}", direct))
            floor = entry.get("grpc floor")
            if floor is not None:
                entry["router_over_floor_ms"] = {k: {q: router[k][q] - floor[k][q] for q in ("p50", "p90", "p99")}
                                                 for k in ("ttft_ms", "itl_ms", "e2e_ms")}
                print(format_row(f"gRPC floor @ {level}", floor))
            print(format_row(f"router @ {level}", router))
            if direct is not None:
                a = entry["added_ms"]["ttft_ms"]
                cpu_text = ""
                if "router_cpu_ms_per_request" in entry:
                    own = entry["router_cpu_ms_per_request"]
                    cpu_text = (f"router's own CPU {own:.2f} ms/request ({own * 1e3 / args.output_len:.0f} us per "
                                f"output token, all included)")
                print(f"| router added TTFT @ {level} | | | | | {a['p50']:+.2f} / {a['p90']:+.2f} / "
                      f"{a['p99']:+.2f} | {entry['added_ms']['itl_ms']['p50']:+.2f} / "
                      f"{entry['added_ms']['itl_ms']['p99']:+.2f} | | {cpu_text} |")
            if floor is not None:
                f = entry["router_over_floor_ms"]["ttft_ms"]
                own = router["cpu_ms_per_request"].get("server", 0.0) - floor["cpu_ms_per_request"].get("server", 0.0)
                print(f"| router over gRPC floor, TTFT @ {level} | | | | | {f['p50']:+.2f} / {f['p90']:+.2f} / "
                      f"{f['p99']:+.2f} | | | router code's CPU {own:.2f} ms/request |")
            sys.stdout.flush()
            results["levels"][str(level)] = entry

    try:
        asyncio.run(sweep())
    finally:
        target.close()
    if sink is not None:
        time.sleep(1.0)  # the last batches (the tracers flushed as their processes stopped)
        results["spans_received"] = sink.spans()
        print(f"tracing on: the sink received {results['spans_received']} spans")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
