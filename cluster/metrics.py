"""Every gptoss-cluster metric, defined once, and the node's Prometheus endpoint.

One `Metrics` object per process (`Metrics()` or `Metrics.for_process()`), created at start-up and passed down to
the router, the replica and the engine; nothing here is a module-level object that changes. Recording goes through
a few methods named after what happened:

    metrics.observe_request(method="Chat", code="OK", protocol="grpc", ttft_s=0.21, e2e_s=3.4, queue_s=0.01,
                            inter_token_s=[0.02, 0.021, ...], prompt_tokens=120, generation_tokens=180)
    timer = metrics.request_timer("Chat", "grpc")      # or let a timer measure it: .dispatched() .tokens(n) .finish()
    metrics.record_engine_stats(engine.stats(), replica="r1", shards=2)   # EngineStats or a dict, cumulative
    metrics.record_expert_counts(delta_counts, replica="r1", shards=2)    # [layers, experts] routed tokens
    metrics.set_replica_states({"running": 3, "starting": 1}, target=4)
    metrics.set_router_queue(router="router-0", queued=12, capacity=256)

One scrape per node. Every process of a node (routers, replicas, shard workers) writes its samples to files in
`PROMETHEUS_MULTIPROC_DIR` (prometheus-client's multiprocess mode); whoever serves the node's port renders the merged
view of that directory: `start_metrics_server(port, host)` from any process, or the exporter
`python -m gptoss_cluster.cluster.metrics --port 9400` (the Helm chart runs it as a sidecar).
The variable must be in the process
environment before `prometheus_client` is first imported (Ray: the application's `runtime_env.env_vars`, which
every replica and its shard actors inherit); `Metrics()` refuses to start half-configured. Without the variable,
each process serves only its own registry (tests, a single-process `LLM`).

Gauges use the `livemostrecent` mode: one series per label set (no `pid` label), the value of the process that wrote
last, dropped when that process dies (the node's exporter reaps dead pids on every scrape when it can see them).
Counters and histograms of dead processes stay in the sum, so rates never see a reset when a replica restarts.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import errno
import itertools
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric

PREFIX = "gptoss_"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_PORT = 9400
PROTOCOLS = ("grpc", "http")
# Replica states of the Admin API (ReplicaInfo.state), lower-cased; each is exported, zero when absent.
REPLICA_STATES = ("starting", "running", "draining", "unhealthy")

# Buckets (seconds / tokens / requests): LLM serving spans milliseconds per token to minutes per request.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0,
               600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

REQUEST_LABELS = ("method", "protocol")
REQUEST_CODE_LABELS = ("method", "code", "protocol")
REPLICA_LABELS = ("replica",)
EXPERT_LABELS = ("replica", "rank", "layer", "expert")
LAYER_LABELS = ("replica", "layer")
LORA_LABELS = ("replica", "lora_adapter")

# record_engine_stats: cumulative counters of an EngineStats snapshot -> the counter that gets their increase.
_ENGINE_COUNTERS = {
    "prefix_cache_queries": "prefix_cache_query_tokens",
    "prefix_cache_hits": "prefix_cache_hit_tokens",
    "num_preemptions": "preemptions",
    "num_prefill_tokens": "engine_prefill_tokens",
    "num_decode_tokens": "engine_decode_tokens",
    "num_steps": "engine_steps",
}
_STEP_TIME_FIELDS = ("time_schedule_s", "time_execute_s", "time_sample_s", "time_output_s")
# record_engine_stats: cumulative per-adapter counts of an EngineStats snapshot ({adapter name: n}) -> their counter.
_LORA_COUNTERS = {"lora_requests": "lora_requests", "lora_generation_tokens": "lora_generation_tokens"}


class MetricsConfigError(RuntimeError):
    """Multiprocess mode asked for but not possible in this process (the message says how to fix it)."""


def multiprocess_dir() -> str | None:
    """The node's metrics directory when this process runs in multiprocess mode, else None (created if missing)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    if values.ValueClass is values.MutexValue:
        raise MetricsConfigError(
            f"{MULTIPROC_ENV}={path} was set after prometheus_client was imported, so this process would keep its "
            "metrics to itself; set it in the environment the process starts with (Ray: runtime_env env_vars)"
        )
    os.makedirs(path, exist_ok=True)
    return path


def _as_mapping(stats: Any) -> Mapping[str, Any]:
    if isinstance(stats, Mapping):
        return stats
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    return vars(stats)


def _matrix(counts: Any) -> list[list[float]]:
    """A [layers, experts] tensor / ndarray / nested sequence as a list of rows of floats."""
    if hasattr(counts, "detach"):
        counts = counts.detach().cpu()
    if hasattr(counts, "tolist"):
        counts = counts.tolist()
    rows = [list(map(float, row)) for row in counts]
    if rows and len({len(row) for row in rows}) != 1:
        raise ValueError("expert counts must be a [layers, experts] matrix (rows of equal length)")
    return rows


def _code_label(code: Any) -> str:
    """grpc.StatusCode.OK -> 'OK'; 429 -> '429'; strings unchanged."""
    name = getattr(code, "name", None)
    return str(name if isinstance(name, str) else code)


class _Children(dict):
    """The labelled children of one metric family by label values: `labels()` runs once per label set (the first
    use, which creates the series as before), later lookups are one dict access. Children are never removed from a
    family here, so a cached child stays the family's own."""

    def __init__(self, family: Any) -> None:
        super().__init__()
        self.family = family

    def __missing__(self, key: tuple[str, ...]) -> Any:
        child = self[key] = self.family.labels(*key)
        return child


def _observe_all(child: Any, amounts: Iterable[float]) -> None:
    """`child.observe(max(0.0, a))` for every amount, with one increment per touched bucket and one of the sum: the
    same counts and sum as one observe per amount (the sum added up here first), at a fraction of the cost (per
    token, and in multiprocess mode each increment is a write to the shared file). Falls back to `observe` where the
    histogram child's layout is not prometheus_client's (`_upper_bounds`, `_buckets`, `_sum`)."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total_value = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total_value is None or len(bounds) != len(buckets):
        for amount in amounts:
            child.observe(max(0.0, amount))
        return
    clipped = [a if a > 0.0 else 0.0 for a in amounts]  # max(0.0, a), NaN included
    if not clipped:
        return
    total_value.inc(sum(clipped))
    # observe's bucket: the first with amount <= bound (the last bound is +Inf)
    for i, count in collections.Counter(map(bisect.bisect_left, itertools.repeat(bounds), clipped)).items():
        buckets[i].inc(count)


class Metrics:
    """The metric objects of one process, on one registry. Create once per process and pass it down (in
    multiprocess mode two objects in one process would overwrite each other's samples in the shared files)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiproc_dir = multiprocess_dir()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._types: dict[str, str] = {}
        self._lock = threading.Lock()
        self._last_engine: dict[str, dict[str, float]] = {}  # replica -> last cumulative values seen
        self._last_experts: dict[str, list[list[float]]] = {}
        self._expert_children: dict[tuple[str, int, int], list[list[Counter]]] = {}

        # ---- per request (recorded by the router, once per finished request)
        self.time_to_first_token = self._histogram(
            "gptoss_time_to_first_token_seconds",
            "Time from the request's arrival at the router to its first generated token.",
            REQUEST_LABELS, TTFT_BUCKETS)
        self.inter_token_latency = self._histogram(
            "gptoss_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request (one observation per token after the first).",
            REQUEST_LABELS, ITL_BUCKETS)
        self.request_duration = self._histogram(
            "gptoss_request_duration_seconds",
            "End-to-end request latency: arrival at the router to the last response message.",
            REQUEST_LABELS, E2E_BUCKETS)
        self.request_queue_time = self._histogram(
            "gptoss_request_queue_time_seconds",
            "Time a request waited before its first prefill step (router admission queue + engine waiting queue).",
            REQUEST_LABELS, QUEUE_BUCKETS)
        self.prompt_tokens = self._counter(
            "gptoss_prompt_tokens", "Prompt tokens of finished requests.", REQUEST_LABELS)
        self.generation_tokens = self._counter(
            "gptoss_generation_tokens", "Tokens generated for finished requests.", REQUEST_LABELS)
        self.requests = self._counter(
            "gptoss_requests",
            "Finished requests by method and status code (gRPC status name, or the HTTP status for protocol=http).",
            REQUEST_CODE_LABELS)

        # ---- router admission (recorded by each router)
        self.router_queued = self._gauge(
            "gptoss_router_queued_requests", "Requests waiting in the router's admission queue.", ("router",))
        self.router_queue_capacity = self._gauge(
            "gptoss_router_queue_capacity_requests",
            "Size of the router's admission queue (beyond it: RESOURCE_EXHAUSTED).", ("router",))

        # ---- per replica (recorded by the replica from its engine's stats)
        self.running_requests = self._gauge(
            "gptoss_running_requests", "Requests in the replica's running batch.", REPLICA_LABELS)
        self.waiting_requests = self._gauge(
            "gptoss_waiting_requests", "Requests waiting in the replica's engine queue (incl. preempted).",
            REPLICA_LABELS)
        self.kv_cache_usage = self._gauge(
            "gptoss_kv_cache_usage_ratio", "Fraction of the replica's KV-cache blocks referenced by requests (0-1).",
            REPLICA_LABELS)
        self.prefix_cache_query_tokens = self._counter(
            "gptoss_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache.", REPLICA_LABELS)
        self.prefix_cache_hit_tokens = self._counter(
            "gptoss_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", REPLICA_LABELS)
        self.preemptions = self._counter(
            "gptoss_preemptions", "Requests preempted because the KV cache ran out (they recompute later).",
            REPLICA_LABELS)
        self.engine_prefill_tokens = self._counter(
            "gptoss_engine_prefill_tokens", "Prompt tokens computed by the replica (prefix-cache hits excluded).",
            REPLICA_LABELS)
        self.engine_decode_tokens = self._counter(
            "gptoss_engine_decode_tokens", "Tokens generated by the replica.", REPLICA_LABELS)
        self.engine_steps = self._counter(
            "gptoss_engine_steps", "Engine steps (one batched forward each).", REPLICA_LABELS)
        self.engine_step_time = self._counter(
            "gptoss_engine_step_seconds", "Wall time spent in engine steps (schedule + forward + sample + output).",
            REPLICA_LABELS)
        self.engine_step_duration = self._histogram(
            "gptoss_engine_step_duration_seconds",
            "Duration of one engine step (the latest step, sampled at each stats report).",
            REPLICA_LABELS, STEP_BUCKETS)
        self.engine_batch_size = self._histogram(
            "gptoss_engine_batch_size_requests",
            "Requests in the running batch (sampled at each stats report that saw new steps).",
            REPLICA_LABELS, BATCH_REQUEST_BUCKETS)
        self.engine_batch_tokens = self._histogram(
            "gptoss_engine_batch_tokens",
            "Tokens computed in one engine step (the latest step, sampled at each stats report).",
            REPLICA_LABELS, BATCH_TOKEN_BUCKETS)

        # ---- LoRA adapters (recorded by the replica from its engine's stats)
        self.lora_requests = self._counter(
            "gptoss_lora_requests", "Finished requests that ran with each LoRA adapter.", LORA_LABELS)
        self.lora_generation_tokens = self._counter(
            "gptoss_lora_generation_tokens", "Tokens generated with each LoRA adapter.", LORA_LABELS)
        self.lora_resident_adapters = self._gauge(
            "gptoss_lora_resident_adapters",
            "LoRA adapters resident on the replica's shards now (at most max_loras; the rest wait on disk).",
            REPLICA_LABELS)

        # ---- MoE
        self.expert_routed_tokens = self._counter(
            "gptoss_expert_routed_tokens",
            "Tokens routed to each expert of each MoE layer (a token counts once for each of its top-k experts); "
            "rank is the shard that computes the expert.",
            EXPERT_LABELS)
        self.expert_load_imbalance = self._gauge(
            "gptoss_expert_load_imbalance_ratio",
            "Max over mean of the tokens routed to the layer's experts since the previous report (1 = balanced).",
            LAYER_LABELS)

        # ---- cluster
        self.replicas = self._gauge(
            "gptoss_replicas", "ModelReplica replicas by state.", ("state",))
        self.replicas_target = self._gauge(
            "gptoss_replicas_target", "ModelReplica replicas wanted (num_replicas or the autoscaler's decision).")

        # Ready children of the per-request and router series (`labels()` costs microseconds; a request records up
        # to 7 of them and each admission change 2): by (method, protocol), (method, code, protocol), (router,).
        self._requests = _Children(self.requests)
        self._queue_time = _Children(self.request_queue_time)
        self._ttft = _Children(self.time_to_first_token)
        self._itl = _Children(self.inter_token_latency)
        self._duration = _Children(self.request_duration)
        self._prompt_tokens = _Children(self.prompt_tokens)
        self._generation_tokens = _Children(self.generation_tokens)
        self._router_queued = _Children(self.router_queued)
        self._router_capacity = _Children(self.router_queue_capacity)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def for_process(cls) -> Metrics:
        """The factory the product uses: a fresh registry, multiprocess mode when the environment asks for it."""
        return cls()

    def _histogram(self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
        self._types[name] = "histogram"
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def _counter(self, name: str, doc: str, labels: Sequence[str]) -> Counter:
        self._types[name] = "counter"
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        self._types[name] = "gauge"
        return Gauge(name, doc, labels, registry=self.registry, multiprocess_mode="livemostrecent")

    @property
    def families(self) -> dict[str, str]:
        """{family name: 'counter' | 'gauge' | 'histogram'} of every metric (counter names without `_total`)."""
        return dict(self._types)

    def sample_names(self) -> set[str]:
        """Every sample name the exposition can carry: `_total` counters, `_bucket/_sum/_count` histograms."""
        suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
        return {name + s for name, typ in self._types.items() for s in suffixes[typ]}

    # ------------------------------------------------------------------------------------------ per request
    def observe_request(
        self,
        *,
        method: str,
        code: Any,
        protocol: str = "grpc",
        ttft_s: float | None = None,
        e2e_s: float | None = None,
        queue_s: float | None = None,
        inter_token_s: Iterable[float] | None = None,
        prompt_tokens: int = 0,
        generation_tokens: int = 0,
    ) -> None:
        """One finished request (any outcome). Timings left None were not reached (e.g. no token before an error)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        labels = (method, protocol)
        self._requests[(method, _code_label(code), protocol)].inc()
        if queue_s is not None:
            self._queue_time[labels].observe(max(0.0, queue_s))
        if ttft_s is not None:
            self._ttft[labels].observe(max(0.0, ttft_s))
        if inter_token_s is not None:
            _observe_all(self._itl[labels], inter_token_s)
        if e2e_s is not None:
            self._duration[labels].observe(max(0.0, e2e_s))
        if prompt_tokens:
            self._prompt_tokens[labels].inc(prompt_tokens)
        if generation_tokens:
            self._generation_tokens[labels].inc(generation_tokens)

    def request_timer(self, method: str, protocol: str = "grpc", *, clock: Any = time.monotonic) -> RequestTimer:
        """A timer started now that measures one request and records it with `observe_request` at `finish`."""
        return RequestTimer(self, method, protocol, clock)

    def set_router_queue(self, *, router: str, queued: int, capacity: int) -> None:
        key = (router,)
        self._router_queued[key].set(queued)
        self._router_capacity[key].set(capacity)

    # ------------------------------------------------------------------------------------------ per replica
    def record_engine_stats(self, stats: Any, *, replica: str, shards: int = 1) -> None:
        """An engine stats snapshot (`workers.engine.EngineStats`, or a dict with the same keys; missing keys are
        skipped). Counters in the snapshot are cumulative since the engine started; their increase since the
        previous call for this replica goes to the `_total` counters (a decrease means the engine restarted: its
        whole value counts). `expert_counts` ([layers, experts], cumulative) goes to `record_expert_counts`.
        Call it periodically (about once a second) from the process that owns the engine."""
        s = _as_mapping(stats)
        with self._lock:
            last = self._last_engine.setdefault(replica, {})
            deltas: dict[str, float] = {}
            for key in (*_ENGINE_COUNTERS, "step_time_s"):
                if key == "step_time_s":
                    if not all(s.get(k) is not None for k in _STEP_TIME_FIELDS):
                        continue
                    value = float(sum(s[k] for k in _STEP_TIME_FIELDS))
                elif s.get(key) is None:
                    continue
                else:
                    value = float(s[key])
                previous = last.get(key, 0.0)
                deltas[key] = value - previous if value >= previous else value
                last[key] = value
        # Every counter in the snapshot gets its series at the first report, at 0 until the event happens: a counter
        # born at its first increment (a first preemption) would show "no data" and hide that increment from rate().
        for key, attr in (*_ENGINE_COUNTERS.items(), ("step_time_s", "engine_step_time")):
            if key in deltas:
                child = getattr(self, attr).labels(replica)
                if deltas[key]:
                    child.inc(deltas[key])

        if s.get("num_running") is not None:
            self.running_requests.labels(replica).set(s["num_running"])
        if s.get("num_waiting") is not None:
            self.waiting_requests.labels(replica).set(s["num_waiting"])
        kv = s.get("kv_usage", s.get("kv_cache_usage"))
        if kv is not None:
            self.kv_cache_usage.labels(replica).set(kv)
        for key, attr in _LORA_COUNTERS.items():
            self._record_per_adapter(replica, key, s.get(key), getattr(self, attr))
        if s.get("lora_resident") is not None:
            self.lora_resident_adapters.labels(replica).set(s["lora_resident"])
        if deltas.get("num_steps"):  # new steps since the last report: sample the latest one
            if s.get("last_step_time_s") is not None:
                self.engine_step_duration.labels(replica).observe(s["last_step_time_s"])
            if s.get("last_step_tokens") is not None:
                self.engine_batch_tokens.labels(replica).observe(s["last_step_tokens"])
            if s.get("num_running") is not None:
                self.engine_batch_size.labels(replica).observe(s["num_running"])

        counts = s.get("expert_counts")
        if counts is not None:
            rows = _matrix(counts)
            with self._lock:
                previous = self._last_experts.get(replica)
                self._last_experts[replica] = rows
            if previous is not None and len(previous) == len(rows) and all(
                    len(p) == len(r) for p, r in zip(previous, rows, strict=True)):
                restarted = any(c < p for p_row, r_row in zip(previous, rows, strict=True)
                                for p, c in zip(p_row, r_row, strict=True))
                if not restarted:
                    rows = [[c - p for p, c in zip(p_row, r_row, strict=True)]
                            for p_row, r_row in zip(previous, rows, strict=True)]
            self.record_expert_counts(rows, replica=replica, shards=shards)

    def _record_per_adapter(self, replica: str, key: str, counts: Mapping[str, float] | None, family: Counter
                            ) -> None:
        """Cumulative per-adapter counts ({adapter name: n}) -> the increase of each adapter's series since the
        previous report (a decrease: the engine restarted, or the adapter was registered anew: its whole value)."""
        if not counts:
            return
        with self._lock:
            last = self._last_engine.setdefault(replica, {})
            increases = {}
            for name, value in counts.items():
                previous = last.get(f"{key}:{name}", 0.0)
                increases[name] = value - previous if value >= previous else value
                last[f"{key}:{name}"] = float(value)
        for name, increase in increases.items():
            child = family.labels(replica, name)  # the series exists from the first report, at 0 until used
            if increase:
                child.inc(increase)

    def record_expert_counts(self, counts: Any, *, replica: str, shards: int = 1) -> None:
        """Tokens routed to each expert since the previous call: a [layers, experts] tensor, ndarray or nested list
        over global expert ids (every rank sees the same routing; report it once per replica). The `rank` label is
        the shard that computes the expert under expert parallelism (experts [r·E/G, (r+1)·E/G) on rank r of G =
        `shards`), so `sum by (rank)` is each GPU's MoE load. Also sets the per-layer imbalance gauge (max / mean
        over the layer's experts) for layers that saw tokens."""
        rows = _matrix(counts)
        if not rows:
            return
        num_experts = len(rows[0])
        if shards < 1 or (num_experts and num_experts % shards):
            raise ValueError(f"shards must be a positive divisor of the expert count {num_experts}, got {shards}")
        children = self._expert_series(replica, len(rows), num_experts, shards)
        for layer, row in enumerate(rows):
            for expert, count in enumerate(row):
                if count < 0:
                    raise ValueError(f"negative expert count {count} (layer {layer}, expert {expert})")
                if count:
                    children[layer][expert].inc(count)
            total = sum(row)
            if total > 0:
                self.expert_load_imbalance.labels(replica, str(layer)).set(max(row) / (total / num_experts))

    def _expert_series(self, replica: str, layers: int, experts: int, shards: int) -> list[list[Counter]]:
        key = (replica, layers, experts, shards)
        with self._lock:
            cached = self._expert_children.get(key)
            if cached is None:  # every expert gets a series (zero until routed to): the heatmap shows cold experts
                per_rank = experts // shards
                cached = [[self.expert_routed_tokens.labels(replica, str(e // per_rank), str(layer), str(e))
                           for e in range(experts)] for layer in range(layers)]
                self._expert_children[key] = cached
            return cached

    # ------------------------------------------------------------------------------------------ cluster
    def set_replica_states(self, counts: Mapping[str, int], *, target: int | None = None) -> None:
        """ModelReplica replicas by state ({'running': 3, 'starting': 1}); known states missing from `counts` are
        exported as 0. `target`: the replica count wanted (num_replicas or the autoscaler's current decision)."""
        merged = dict.fromkeys(REPLICA_STATES, 0)
        for state, n in counts.items():
            merged[state.lower()] = merged.get(state.lower(), 0) + n
        for state, n in merged.items():
            self.replicas.labels(state).set(n)
        if target is not None:
            self.replicas_target.set(target)

    # ------------------------------------------------------------------------------------------ exposition
    def render(self) -> bytes:
        """The exposition text: the whole node's (multiprocess mode) or this process's registry."""
        if self.multiproc_dir:
            return render_node_metrics(self.multiproc_dir)
        return generate_latest(self.registry)


class RequestTimer:
    """Measures one request on a monotonic clock; `finish` records it (once).

        timer = metrics.request_timer("Generate", "grpc")
        timer.dispatched()             # left the router's admission queue, sent to a replica
        timer.tokens(n)                # each streamed delta of n tokens
        timer.finish("OK", prompt_tokens=12)
    """

    def __init__(self, metrics: Metrics, method: str, protocol: str, clock: Any = time.monotonic) -> None:
        self.metrics, self.method, self.protocol, self._clock = metrics, method, protocol, clock
        self.start = clock()
        self.dispatched_at: float | None = None
        self.first_token_at: float | None = None
        self._last_token_at: float | None = None
        self.generated = 0
        self.gaps: list[float] = []
        self.finished = False

    def dispatched(self) -> None:
        if self.dispatched_at is None:
            self.dispatched_at = self._clock()

    def tokens(self, n: int = 1) -> None:
        """n new tokens arrived together: the first ever sets TTFT; later ones spread the gap over the n tokens."""
        if n <= 0:
            return
        now = self._clock()
        if self.first_token_at is None:
            self.first_token_at = now
        elif n == 1:
            self.gaps.append(now - self._last_token_at)
        else:
            self.gaps.extend([(now - self._last_token_at) / n] * n)
        self._last_token_at = now
        self.generated += n

    def finish(self, code: Any, *, prompt_tokens: int = 0, generation_tokens: int | None = None,
               engine_queue_s: float = 0.0) -> None:
        """`engine_queue_s`: time the replica's engine kept it waiting, when the replica reports it."""
        if self.finished:
            return
        self.finished = True
        now = self._clock()
        queue = None if self.dispatched_at is None else self.dispatched_at - self.start + engine_queue_s
        self.metrics.observe_request(
            method=self.method, code=code, protocol=self.protocol,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.start,
            e2e_s=now - self.start, queue_s=queue, inter_token_s=self.gaps, prompt_tokens=prompt_tokens,
            generation_tokens=self.generated if generation_tokens is None else generation_tokens,
        )


# ================================================================================================ node exposition
_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_processes(path: str) -> list[int]:
    """Drop the live gauges of processes that no longer exist (`mark_process_dead`). Only meaningful where this
    process shares the PID namespace of the writers (same container, or a pod with shareProcessNamespace)."""
    dead = set()
    for name in os.listdir(path):
        match = _LIVE_FILE.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in sorted(dead):
        try:
            multiprocess.mark_process_dead(pid, path)
        except FileNotFoundError:  # a concurrent scrape removed it first
            pass
    return sorted(dead)


class NodeCollector:
    """The merged `gptoss_*` metrics of every process that wrote to the node's multiprocess directory."""

    def __init__(self, path: str, *, reap_dead: bool = True) -> None:
        if not os.path.isdir(path):
            raise ValueError(f"metrics directory {path!r} does not exist")
        self.path, self.reap_dead = path, reap_dead

    def collect(self) -> Iterator[Metric]:
        if self.reap_dead:
            reap_dead_processes(self.path)
        for family in multiprocess.MultiProcessCollector(None, path=self.path).collect():
            if family.name.startswith(PREFIX):
                yield family


def node_registry(path: str | None = None, *, reap_dead: bool = True) -> CollectorRegistry:
    path = path or os.environ.get(MULTIPROC_ENV)
    if not path:
        raise MetricsConfigError(f"no metrics directory: pass one or set {MULTIPROC_ENV}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(path, reap_dead=reap_dead))
    return registry


def render_node_metrics(path: str | None = None, *, reap_dead: bool = True) -> bytes:
    """The exposition text of the node: every process's samples under `path` (default $PROMETHEUS_MULTIPROC_DIR)."""
    return generate_latest(node_registry(path, reap_dead=reap_dead))


@dataclasses.dataclass
class MetricsServer:
    """A running exposition endpoint (HTTP, any path, text format)."""

    httpd: Any
    thread: threading.Thread

    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(
    port: int = DEFAULT_PORT,
    host: str = "0.0.0.0",
    *,
    metrics: Metrics | None = None,
    multiproc_dir: str | None = None,
    reap_dead: bool = True,
    exist_ok: bool = False,
) -> MetricsServer | None:
    """Serve the node's metrics on host:port (port 0: an ephemeral port; see `.port`) from a daemon thread.

    Multiprocess mode (a directory from `multiproc_dir`, `metrics`, or the environment): the merged view of every
    process on the node. Otherwise `metrics`' own registry. `exist_ok`: when the port is taken (another process of
    the node already serves it), return None instead of raising."""
    path = multiproc_dir or (metrics.multiproc_dir if metrics is not None else None) or os.environ.get(MULTIPROC_ENV)
    if path:
        registry = node_registry(path, reap_dead=reap_dead)
    elif metrics is not None:
        registry = metrics.registry
    else:
        raise MetricsConfigError(f"nothing to serve: pass metrics=, multiproc_dir=, or set {MULTIPROC_ENV}")
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exist_ok and exc.errno == errno.EADDRINUSE:
            return None
        raise
    return MetricsServer(httpd, thread)


# ================================================================================================ the exporter
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gptoss_cluster.cluster.metrics`: serve the node's merged metrics (the chart's sidecar)."""
    parser = argparse.ArgumentParser(prog="python -m gptoss_cluster.cluster.metrics", description=main.__doc__)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.add_argument("--dir", default=os.environ.get(MULTIPROC_ENV),
                        help=f"the node's metrics directory (default ${MULTIPROC_ENV})")
    parser.add_argument("--no-reap", action="store_true",
                        help="never drop gauges of exited processes (use when their PIDs are not visible here)")
    args = parser.parse_args(argv)
    if not args.dir:
        parser.exit(2, f"{parser.prog}: error: no metrics directory: pass --dir or set {MULTIPROC_ENV}\n")
    os.makedirs(args.dir, exist_ok=True)
    server = start_metrics_server(args.port, args.host, multiproc_dir=args.dir, reap_dead=not args.no_reap)
    assert server is not None
    print(f"serving {args.dir} on http://{args.host}:{server.port}/metrics", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "MULTIPROC_ENV", "PREFIX", "REPLICA_STATES", "Metrics", "MetricsConfigError", "MetricsServer", "NodeCollector",
    "RequestTimer", "main", "multiprocess_dir", "node_registry", "reap_dead_processes", "render_node_metrics",
    "start_metrics_server",
]
