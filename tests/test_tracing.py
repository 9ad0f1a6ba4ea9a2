"""cluster/tracing.py: configured by the standard OTEL_* variables, off and free when unset, and spans that reach a
real OTLP/gRPC receiver with the W3C context continued."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
from otlp_receiver import OtlpReceiver

from gptoss_cluster.cluster.client import Client
from gptoss_cluster.cluster.tracing import NO_SPAN, Tracer, TracingConfig, TracingConfigError, trace_context_of

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.mark.parametrize(("env", "enabled"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, True),
])
def test_config_from_the_standard_variables(env, enabled):
    config = TracingConfig.from_env(env)
    assert config.enabled is enabled
    assert config.service_name == env.get("OTEL_SERVICE_NAME", "gptoss-cluster")


@pytest.mark.parametrize(("env", "named"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
     "http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin"),
])
def test_settings_it_cannot_honour_are_refused_by_name(env, named):
    with pytest.raises(TracingConfigError, match=named):
        TracingConfig.from_env(env)


def test_off_is_free_and_imports_no_sdk():
    code = ("import sys; from gptoss_cluster.cluster.tracing import Tracer, TracingConfig\n"
            "t = Tracer(TracingConfig.from_env({}), 'router')\n"
            f"s = t.start('x', {{'traceparent': '{TRACEPARENT}'}}); s.set('a', 1); s.end()\n"
            "assert not t.enabled and s.context() == {} and not s.recording\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert Tracer(TracingConfig(False), "router").start("x") is NO_SPAN


def test_trace_context_from_grpc_metadata_and_http_headers():
    metadata = (("authorization", "Bearer t"), ("traceparent", TRACEPARENT), ("tracestate", "k=v"))
    assert trace_context_of(metadata) == {"traceparent": TRACEPARENT, "tracestate": "k=v"}
    assert trace_context_of({"TraceParent": TRACEPARENT, "x": "y"}) == {"traceparent": TRACEPARENT}
    assert trace_context_of(()) == {}


def test_spans_reach_an_otlp_receiver_continuing_the_callers_trace(monkeypatch):
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "gptoss-test")
        router = Tracer.from_env("router")
        replica = Tracer.from_env("replica")
        try:
            request = router.start("router.request", {"traceparent": TRACEPARENT}, {"gen_ai.request.model": "m"},
                                   kind="server")
            carried = request.context()  # what the typed contract carries to the replica's process
            assert carried["traceparent"].split("-")[1] == TRACE_ID
            with replica.span("replica.request", carried, {"gen_ai.usage.output_tokens": 3}) as served:
                replica.start("engine.decode", served).end()
            request.end()
            fresh = router.start("router.request")  # no context given: a new trace
            fresh.end()
            router.flush()
            replica.flush()
            spans = receiver.wait_for(lambda spans: len(spans) == 4)
        finally:
            router.shutdown()
            replica.shutdown()
    by_name = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    (root,) = [s for s in by_name["router.request"] if s.trace_id == TRACE_ID]
    (served,) = by_name["replica.request"]
    (decode,) = by_name["engine.decode"]
    assert root.parent_span_id == PARENT_ID and root.service == "gptoss-test" and root.component == "router"
    assert served.trace_id == decode.trace_id == TRACE_ID and served.component == "replica"
    assert served.parent_span_id == root.span_id and decode.parent_span_id == served.span_id
    assert root.attributes == {"gen_ai.request.model": "m"} and served.attributes == {"gen_ai.usage.output_tokens": 3}
    (other,) = [s for s in by_name["router.request"] if s.trace_id != TRACE_ID]
    assert other.parent_span_id == ""


# ======================================================================================== the router and the replica
# The spans a request leaves behind: the router's (over a scripted replica, and over the tiny model's ReplicaCore in
# this process), then both processes of a real Ray Serve application (the acceptance test).
CHILDREN = ["router.validate", "router.admission", "router.dispatch"]


@pytest.fixture
def otlp(monkeypatch):
    """An OTLP/gRPC receiver, and the standard variables pointing this process's tracers at it."""
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        yield receiver


def _of_trace(spans, trace_id=TRACE_ID):
    out = {}
    for span in spans:
        if span.trace_id == trace_id:
            out.setdefault(span.name, []).append(span)
    return out


def _has(*names, trace_id=TRACE_ID):
    return lambda spans: set(names) <= set(_of_trace(spans, trace_id))


def _check_router_spans(by_name, method, protocol, replica_id):
    """The router's span of one call (a child of the caller's span) and its three phases, back to back."""
    (root,) = by_name[f"gptoss.router.{method}"]
    assert root.component == "router" and root.kind == "SPAN_KIND_SERVER" and root.parent_span_id == PARENT_ID
    assert root.attributes["gptoss.protocol"] == protocol and root.attributes["gptoss.replica"] == replica_id
    assert root.attributes["gen_ai.operation.name"] == ("chat" if method == "Chat" else "text_completion")
    assert "first_token" in root.events and root.status == "STATUS_CODE_UNSET"
    children = [by_name[name][0] for name in CHILDREN]
    assert all(c.parent_span_id == root.span_id and c.component == "router" for c in children)
    assert root.start_ns == children[0].start_ns
    assert [c.end_ns for c in children[:-1]] == [c.start_ns for c in children[1:]]  # one phase after the other
    assert children[-1].end_ns <= root.events["first_token"] <= root.end_ns
    assert children[-1].attributes == {"gptoss.replica": replica_id}
    return root


def test_router_spans_continue_the_callers_traceparent_from_grpc_metadata(otlp):
    from gptoss_cluster.cluster.client import chat_request
    from gptoss_cluster.cluster.router.settings import RouterSettings
    from gptoss_cluster.cluster.router.testing import ScriptedReplica, ServerThread

    replica = ScriptedReplica(replica_id="app#ModelReplica#s0")
    tracer = Tracer.from_env("router")
    with ServerThread() as st:
        st.start([replica], RouterSettings(host="127.0.0.1", port=0, health_interval_s=0.05), tracer=tracer)
        with Client(st.address) as client:
            responses = list(client.inference.Chat(
                chat_request("Hi", max_tokens=5, temperature=0), timeout=30,
                metadata=(("traceparent", TRACEPARENT), ("tracestate", "vendor=1"))))
        tracer.flush()
        spans = otlp.wait_for(_has("gptoss.router.Chat", *CHILDREN))
    tracer.shutdown()
    root = _check_router_spans(_of_trace(spans), "Chat", "grpc", replica.replica_id)
    (sent,) = replica.started
    final = responses[-1]
    assert root.attributes == {
        "gen_ai.operation.name": "chat", "gptoss.protocol": "grpc", "gen_ai.request.model": "scripted",
        "gen_ai.response.id": sent.request_id, "gen_ai.usage.input_tokens": final.usage.prompt_tokens,
        "gen_ai.request.max_tokens": 5, "gptoss.replica": replica.replica_id,
        "gen_ai.response.finish_reasons": ["length"], "gen_ai.usage.output_tokens": 5,
        "gen_ai.usage.reasoning.output_tokens": final.usage.reasoning_tokens,
        "gen_ai.usage.cache_read.input_tokens": 0}
    # the replica is handed the router span's context, the caller's tracestate with it
    assert sent.trace_context == {"traceparent": f"00-{TRACE_ID}-{root.span_id}-01", "tracestate": "vendor=1"}


def test_a_call_the_caller_did_not_sample_leaves_no_span_and_tells_the_replica_so(otlp):
    """The default sampler follows the caller's decision: a traceparent with the sampled flag off makes no span, and
    the replica is handed a context saying so (its own spans follow the same decision)."""
    from gptoss_cluster.cluster.client import chat_request
    from gptoss_cluster.cluster.router.settings import RouterSettings
    from gptoss_cluster.cluster.router.testing import ScriptedReplica, ServerThread

    unsampled = "11111111111111111111111111111111"
    replica = ScriptedReplica()
    tracer = Tracer.from_env("router")
    with ServerThread() as st:
        st.start([replica], RouterSettings(host="127.0.0.1", port=0, health_interval_s=0.05), tracer=tracer)
        with Client(st.address) as client:
            for traceparent in (f"00-{unsampled}-{PARENT_ID}-00", TRACEPARENT):
                list(client.inference.Chat(chat_request("Hi", max_tokens=2), timeout=30,
                                           metadata=(("traceparent", traceparent),)))
        tracer.flush()
        spans = otlp.wait_for(_has("gptoss.router.Chat", *CHILDREN))  # the sampled call's, exported after
    tracer.shutdown()
    assert not [s for s in spans if s.trace_id == unsampled]
    first, second = (r.trace_context["traceparent"] for r in replica.started)
    assert first.startswith(f"00-{unsampled}-") and first.endswith("-00") and second.endswith("-01")


def test_a_failed_call_records_its_status_and_the_phase_it_failed_in(otlp):
    from gptoss_cluster.cluster.router.settings import RouterSettings
    from gptoss_cluster.cluster.router.testing import ScriptedReplica, ServerThread
    from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb

    tracer = Tracer.from_env("router")
    with ServerThread() as st:
        st.start([ScriptedReplica()], RouterSettings(host="127.0.0.1", port=0, health_interval_s=0.05), tracer=tracer)
        with Client(st.address) as client, pytest.raises(grpc.RpcError) as info:
            list(client.inference.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                                              sampling=pb.SamplingParams(max_tokens=10 ** 6))))
        tracer.flush()
        spans = otlp.wait_for(lambda spans: {"gptoss.router.Generate", "router.validate"} <= {s.name for s in spans})
    tracer.shutdown()
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    (root,) = [s for s in spans if s.name == "gptoss.router.Generate"]
    (validate,) = [s for s in spans if s.name == "router.validate"]
    assert root.parent_span_id == "" and validate.parent_span_id == root.span_id  # no traceparent: a new trace
    assert root.status == validate.status == "STATUS_CODE_ERROR"
    assert root.attributes["error.type"] == "INVALID_ARGUMENT" and "max_tokens" in root.status_message
    assert {s.name for s in spans} == {"gptoss.router.Generate", "router.validate"}  # it never reached admission


def test_replica_spans_follow_the_engine_in_one_process(otlp, checkpoints):
    """Router and ReplicaCore (the tiny model) in this process, each with its tracer: the replica's spans are
    children of the router's, the engine's phases children of the replica's, back to back."""
    from gptoss_cluster.cluster.client import chat_request
    from gptoss_cluster.cluster.replica import ReplicaCore, ReplicaSettings
    from gptoss_cluster.cluster.router.settings import RouterSettings
    from gptoss_cluster.cluster.router.testing import ServerThread

    router_tracer, replica_tracer = Tracer.from_env("router"), Tracer.from_env("replica")
    core = ReplicaCore(ReplicaSettings(model=str(checkpoints["tiny-hf"]), dtype="float32", served_model_name="tiny",
                                       engine={"num_blocks": 64, "max_model_len": 512, "max_num_seqs": 4}),
                       replica_id="app#ModelReplica#t0", tracer=replica_tracer)
    with ServerThread() as st:
        st.start([core], RouterSettings(host="127.0.0.1", port=0, health_interval_s=0.05), tracer=router_tracer)
        with Client(st.address) as client:
            responses = list(client.inference.Chat(chat_request("Hi", max_tokens=6, temperature=0), timeout=60,
                                                   metadata=(("traceparent", TRACEPARENT),)))
        router_tracer.flush()
        replica_tracer.flush()
        spans = otlp.wait_for(_has("gptoss.router.Chat", "gptoss.replica.request", "engine.decode"))
        st.run(core.shutdown())
    router_tracer.shutdown()
    replica_tracer.shutdown()
    by_name = _of_trace(spans)
    root = _check_router_spans(by_name, "Chat", "grpc", core.replica_id)
    (served,) = by_name["gptoss.replica.request"]
    engine = [by_name[name][0] for name in ("engine.queue", "engine.prefill", "engine.decode")]
    usage = responses[-1].usage
    assert served.component == "replica" and served.kind == "SPAN_KIND_SERVER"
    assert served.parent_span_id == root.span_id and all(e.parent_span_id == served.span_id for e in engine)
    assert served.attributes == {
        "gen_ai.request.model": "tiny", "gen_ai.response.id": served.attributes["gen_ai.response.id"],
        "gptoss.replica": core.replica_id, "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.request.max_tokens": 6, "gen_ai.response.finish_reasons": ["length"],
        "gen_ai.usage.output_tokens": 6, "gen_ai.usage.cache_read.input_tokens": usage.cached_prompt_tokens,
        "gptoss.preemptions": 0}
    assert served.status == "STATUS_CODE_UNSET"
    assert [e.end_ns for e in engine[:-1]] == [e.start_ns for e in engine[1:]]  # queue -> prefill -> decode
    assert served.start_ns <= engine[0].start_ns and engine[-1].end_ns <= served.end_ns
    assert served.events["first_token"] == engine[1].end_ns
    assert root.start_ns <= served.start_ns and served.end_ns <= root.end_ns


OFF_SCRIPT = """
import asyncio, json, sys
from gptoss_cluster.cluster.router.backend import LocalBackend
from gptoss_cluster.cluster.router.server import GptossServer
from gptoss_cluster.cluster.router.settings import RouterSettings
from gptoss_cluster.cluster.router.testing import ScriptedReplica
from gptoss_cluster.cluster.tracing import Tracer
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb

async def main():
    replica = ScriptedReplica()
    server = GptossServer(LocalBackend([replica]), RouterSettings(), None, Tracer.from_env("router"))
    await server.core.refresh()
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7] * 8), sampling=pb.SamplingParams(max_tokens=3))
    out = [r async for r in server.core.generate_events(request, trace_context={"traceparent": "TRACEPARENT"})]
    return {"tokens": sum(len(r.token_ids) for r in out), "tracer": server.core.tracer is not None,
            "trace_context": replica.started[0].trace_context,
            "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}

print(json.dumps(asyncio.run(main())))
""".replace("TRACEPARENT", TRACEPARENT)


@pytest.mark.parametrize("env", [{}, {"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}])
def test_tracing_off_exports_nothing_and_loads_no_sdk(env):
    """No endpoint (or tracing turned off): a request through the router core leaves no span, hands the replica no
    trace context, and OpenTelemetry is not even imported."""
    with OtlpReceiver() as receiver:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | env
        if env:  # an endpoint that would receive spans, were tracing on
            environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = receiver.endpoint
        out = subprocess.run([sys.executable, "-c", OFF_SCRIPT], capture_output=True, text=True, env=environ,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result == {"tokens": 3, "tracer": False, "trace_context": None, "otel": []}
        assert receiver.spans == []


def test_the_application_carries_the_otel_variables_to_both_deployments(monkeypatch):
    """The OTEL_* variables of the process that builds the application (`gptoss-cluster serve`'s shell, a driver)
    reach both deployments' runtime_env, in the code's options and in the Serve config alike; none when unset."""
    from gptoss_cluster.cluster.app import app_config, build_application, parse_args, tracing_env

    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    config = parse_args({"model": "/m", "device": "cpu"})

    def env_vars() -> list[dict[str, str]]:
        router = build_application(config)._bound_deployment  # Serve's Application has no public accessor
        replica = router.init_args[0]._bound_deployment
        entries = app_config(config)["deployments"]
        return [d.ray_actor_options["runtime_env"]["env_vars"] for d in (router, replica)] + \
            [e["ray_actor_options"]["runtime_env"]["env_vars"] for e in entries]

    assert tracing_env() == {} and not any(k.startswith("OTEL_") for env in env_vars() for k in env)
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SERVICE_NAME": "llm",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    for key, value in otel.items():
        monkeypatch.setenv(key, value)
    assert tracing_env() == otel
    assert all(otel.items() <= env.items() for env in env_vars())


def test_a_traced_http_request_leaves_spans_from_the_router_and_the_replica_process(checkpoints, monkeypatch):
    """The acceptance test: a real Ray Serve application (Router + one ModelReplica of the tiny model, deployed as
    `gptoss-cluster serve` does), the OTEL_* variables set where it is built, one POST /v1/chat/completions with a
    `traceparent` header: spans of that trace reach a real OTLP/gRPC receiver from both processes, parented
    correctly (caller -> router -> replica -> engine)."""
    import urllib.request

    import ray

    from gptoss_cluster.cluster.app import AppConfig, LocalCluster
    from tests.tools import free_port

    if ray.is_initialized():  # a previous module's connection: this test starts its own node
        ray.shutdown()
    token = "trace-test-token"
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "gptoss-trace-test")
        http_port = free_port()
        config = AppConfig(model=str(checkpoints["tiny-hf"]), served_model_name="tiny", dtype="float32",
                           device="cpu", num_replicas=1, max_ongoing_requests=16, grpc_port=free_port(),
                           grpc_host="127.0.0.1", http_port=http_port, metrics_port=0,
                           auth_token_env="GPTOSS_TRACE_TEST_TOKEN", health_interval_s=0.2,
                           routing_stats_period_s=0.5, graceful_shutdown_timeout_s=10,
                           engine={"num_blocks": 256, "max_model_len": 512, "max_num_seqs": 8})
        local = LocalCluster(config, ray_address="", dashboard_port=free_port(), num_cpus=4,
                             env_vars={"GPTOSS_TRACE_TEST_TOKEN": token, "GPTOSS_NO_PROGRESS": "1"})
        try:
            local.start(ready_timeout_s=300)
            body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                               "temperature": 0}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/chat/completions", data=body, method="POST",
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}",
                         "traceparent": TRACEPARENT})
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.loads(response.read())
            spans = receiver.wait_for(_has("gptoss.router.Chat", *CHILDREN, "gptoss.replica.request", "engine.queue",
                                           "engine.prefill", "engine.decode"), timeout_s=60)
        finally:
            local.close()
    by_name = _of_trace(spans)
    (served,) = by_name["gptoss.replica.request"]
    root = _check_router_spans(by_name, "Chat", "http", served.attributes["gptoss.replica"])
    assert root.service == served.service == "gptoss-trace-test"
    assert served.component == "replica" and served.parent_span_id == root.span_id
    assert all(by_name[name][0].parent_span_id == served.span_id and by_name[name][0].component == "replica"
               for name in ("engine.queue", "engine.prefill", "engine.decode"))
    usage = answer["usage"]
    assert root.attributes["gen_ai.usage.input_tokens"] == served.attributes["gen_ai.usage.input_tokens"] == \
        usage["prompt_tokens"]
    assert served.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 6
    assert served.attributes["gen_ai.response.finish_reasons"] == ["length"]
