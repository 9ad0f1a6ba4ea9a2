"""cluster/tracing.py: configured by the standard OTEL_* variables, off and free when unset, and spans that reach a
real OTLP/gRPC receiver with the W3C context continued."""

from __future__ import annotations

import subprocess
import sys

import pytest
from otlp_receiver import OtlpReceiver

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
