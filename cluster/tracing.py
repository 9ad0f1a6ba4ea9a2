"""OpenTelemetry tracing: a W3C trace context in, spans out over OTLP/gRPC, set up by the standard OTEL_* variables.

On when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`) and
neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` says otherwise. Off, a `Tracer` is a few attribute
reads per request: the SDK is not even imported. The exporter reads the rest of the standard variables itself
(headers, insecure, certificates, timeout, compression), and the SDK the sampler (`OTEL_TRACES_SAMPLER`, e.g.
`parentbased_traceidratio` with `OTEL_TRACES_SAMPLER_ARG=0.1`), the batch processor's delays and
`OTEL_RESOURCE_ATTRIBUTES`. `OTEL_SERVICE_NAME` names the service (default: `gptoss-cluster`).

Each process (a Router replica, a ModelReplica) holds one `Tracer`, with its own provider (no global state is
touched). The trace context crosses processes as W3C `traceparent` / `tracestate` strings: from gRPC metadata or
HTTP headers into the router's span, and from the router's span into the request it sends the replica, whose spans
become its children. Attribute names follow OpenTelemetry's GenAI conventions where one exists
(`gen_ai.request.model`, `gen_ai.usage.input_tokens`, ...).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["NO_SPAN", "TRACE_HEADERS", "Attr", "Span", "Tracer", "TracingConfig", "TracingConfigError",
           "trace_context_of", "wall_ns"]

# The W3C trace context, as gRPC metadata keys and HTTP header names (lower case, as both carry them).
TRACE_HEADERS = ("traceparent", "tracestate")
SUPPORTED_PROTOCOLS = ("grpc",)


class Attr:
    """The span attributes people filter on, named once for the router and the replica: OpenTelemetry's GenAI
    conventions where one exists, `gptoss.*` for the rest."""

    MODEL = "gen_ai.request.model"
    OPERATION = "gen_ai.operation.name"  # "chat" | "text_completion"
    RESPONSE_ID = "gen_ai.response.id"  # the request id the answer carries
    MAX_TOKENS = "gen_ai.request.max_tokens"
    INPUT_TOKENS = "gen_ai.usage.input_tokens"
    OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    CACHED_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"  # prompt tokens served by the prefix cache
    REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"
    FINISH_REASONS = "gen_ai.response.finish_reasons"  # a list, as the convention has it
    ERROR_TYPE = "error.type"  # the gRPC status name of a failed call
    PROTOCOL = "gptoss.protocol"  # "grpc" | "http": how the call reached the router
    REPLICA = "gptoss.replica"  # the ModelReplica that served it
    PREEMPTIONS = "gptoss.preemptions"  # times the engine preempted it (its KV freed, recomputed later)


class TracingConfigError(ValueError):
    """An OTEL_* setting this server cannot honour (named in the message)."""


@dataclass(frozen=True)
class TracingConfig:
    """Whether and where to export spans, from the OTEL_* environment variables."""

    enabled: bool
    service_name: str = "gptoss-cluster"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TracingConfig:
        env = os.environ if environ is None else environ
        service = env.get("OTEL_SERVICE_NAME") or "gptoss-cluster"
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        exporters = [e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
        if disabled or not endpoint or exporters == ["none"]:
            return cls(False, service)
        if exporters != ["otlp"]:
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']!r}: only 'otlp' (or "
                                     "'none') is supported")
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        if protocol not in SUPPORTED_PROTOCOLS:
            raise TracingConfigError(f"OTLP protocol {protocol!r} is not supported: spans are exported over OTLP/gRPC "
                                     "(set OTEL_EXPORTER_OTLP_PROTOCOL=grpc and a gRPC endpoint, e.g. "
                                     "http://collector:4317)")
        return cls(True, service)


class Span:
    """One span, or nothing when tracing is off. `context()` is the W3C context to hand to a child process."""

    def __init__(self, span: Any = None, propagator: Any = None) -> None:
        self._span = span
        self._propagator = propagator

    @property
    def recording(self) -> bool:
        return self._span is not None and self._span.is_recording()

    def set(self, key: str, value: Any) -> None:
        if self._span is not None and value is not None:
            self._span.set_attribute(key, value)

    def set_many(self, attributes: Mapping[str, Any]) -> None:
        if self._span is not None:
            self._span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def event(self, name: str, attributes: Mapping[str, Any] | None = None, time_ns: int | None = None) -> None:
        if self._span is not None:
            self._span.add_event(name, dict(attributes or {}), timestamp=time_ns)

    def error(self, message: str) -> None:
        if self._span is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, message))

    def end(self, time_ns: int | None = None) -> None:
        if self._span is not None:
            self._span.end(end_time=time_ns)

    def context(self) -> dict[str, str]:
        """{'traceparent': ..., 'tracestate': ...} of this span ({} when tracing is off)."""
        if self._span is None:
            return {}
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(self._span))
        return carrier


NO_SPAN = Span()


class Tracer:
    """This process's spans: started from a W3C context (or as new traces), exported in batches over OTLP/gRPC."""

    def __init__(self, config: TracingConfig, component: str) -> None:
        self.config = config
        self.component = component
        self._tracer: Any = None
        self._provider: Any = None
        self._propagator: Any = None
        if not config.enabled:
            return
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.name": config.service_name, "gptoss.component": component})
        self._provider = TracerProvider(resource=resource, shutdown_on_exit=True)
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._tracer = self._provider.get_tracer("gptoss_cluster." + component)
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_env(cls, component: str) -> Tracer:
        return cls(TracingConfig.from_env(), component)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start(self, name: str, parent: Mapping[str, str] | Span | None = None,
              attributes: Mapping[str, Any] | None = None, start_time_ns: int | None = None,
              kind: str = "internal") -> Span:
        """A span named `name`, child of `parent` (a W3C carrier such as gRPC metadata / HTTP headers / the
        contract's trace context, or a Span of this process); a new trace when the parent holds no valid context."""
        if self._tracer is None:
            return NO_SPAN
        from opentelemetry import trace

        if isinstance(parent, Span):
            context = trace.set_span_in_context(parent._span) if parent._span is not None else None
        elif parent:
            context = self._propagator.extract({k.lower(): v for k, v in parent.items() if isinstance(v, str)})
        else:
            context = None
        span_kind = {"server": trace.SpanKind.SERVER, "client": trace.SpanKind.CLIENT,
                     "internal": trace.SpanKind.INTERNAL}[kind]
        span = self._tracer.start_span(name, context=context, kind=span_kind, start_time=start_time_ns,
                                       attributes={k: v for k, v in (attributes or {}).items() if v is not None})
        return Span(span, self._propagator)

    @contextlib.contextmanager
    def span(self, name: str, parent: Mapping[str, str] | Span | None = None,
             attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
        span = self.start(name, parent, attributes)
        try:
            yield span
        except BaseException as exc:
            span.error(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            span.end()

    def flush(self, timeout_ms: int = 5000) -> None:
        if self._provider is not None:
            self._provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = self._tracer = None


def wall_ns(monotonic_s: float, offset_ns: int) -> int:
    """A time.monotonic() reading as wall-clock nanoseconds (span timestamps), with `offset_ns` =
    time.time_ns() - time.monotonic_ns() read once for a batch of conversions."""
    return int(monotonic_s * 1e9) + offset_ns


def trace_context_of(headers: Mapping[str, str] | Any) -> dict[str, str]:
    """The W3C trace context in gRPC invocation metadata (a sequence of (key, value)) or HTTP headers ({} if none)."""
    items = headers.items() if isinstance(headers, Mapping) or hasattr(headers, "items") else (headers or ())
    return {key.lower(): value for key, value in items
            if isinstance(key, str) and key.lower() in TRACE_HEADERS and isinstance(value, str)}
