"""The Serve application: arguments -> the `Router` and `ModelReplica` deployments; configs; scaling.

`build_app(args)` is the import path the Helm chart and `serve deploy` use
(`gptoss_cluster.cluster.app:build_app`); `args` are exactly the keys of
`helm/gptoss-cluster/files/serve-args.schema.json` (unknown keys are refused, naming them).
`AppConfig` holds the same settings plus a few that belong to the machine rather than the chart (bind addresses,
CPU shares, TLS files); `build_app` takes those from the environment (`GPTOSS_GRPC_HOST`, `GPTOSS_HTTP_HOST`,
`GPTOSS_METRICS_HOST`, `GPTOSS_AUTH_TOKEN_FILE`, `GPTOSS_TLS_CERT_FILE`, `GPTOSS_TLS_KEY_FILE`; set them in the
application's `runtime_env.env_vars`), and `build_application(config)` takes them directly (the CLI, tests).
Tracing (`cluster.tracing`) follows the standard OTEL_* variables: those of the process that builds the application
go into both deployments' runtime_env (`tracing_env`).

Replica count lives in the Serve config (`deployments: [{name: ModelReplica, num_replicas: N}]`, or
`autoscaling_config`), so scaling is a light config update that Serve applies without touching running replicas:
`serve_config(...)` writes that config, `DashboardClient` PUTs it through the Ray dashboard's Serve REST API (port
8265, with Ray's auth token) and `scale(...)` changes the replica count of a running application (see
docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_cluster.cluster.contract import REPLICA_TRANSPORTS, lora_name_problem
from gptoss_cluster.cluster.router.policies import ROUTING_POLICIES

APP_NAME = "gptoss"
IMPORT_PATH = "gptoss_cluster.cluster.app:build_app"
ROUTER = "Router"
MODEL_REPLICA = "ModelReplica"
# Serve's own flags, in each deployment's runtime_env. Both deployments run their code on the replica's main event
# loop, not on a thread and loop of their own: their code is async and never blocks the loop (engine steps, weight
# loading and statistics run in threads), and every Serve call otherwise hops between the two threads. The Router
# also runs Serve's request router on that loop. Measured at 64 streams on 2 cores (benchmarks/RESULTS.md):
# Router: -16 % CPU per request, median added TTFT +25 -> +8 ms (session 4); ModelReplica: TTFT p50 -25 to -50 % on
# both the router and the direct path (session 5).
# Serve's gRPC transport between deployments (replica_transport "grpc") refuses messages over 4 MiB by default, on the
# replica (a request: prompt ids, grammar) and on the router (a token-channel batch). The router already bounds what
# it takes from clients (max_message_bytes) and the replica bounds its batches (cluster.token_channel.TokenChannels), so
# the transport's own limit only has to stay out of the way.
SERVE_GRPC_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
REPLICA_SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                     "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(SERVE_GRPC_MAX_MESSAGE_BYTES)}
ROUTER_SERVE_ENV = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", **REPLICA_SERVE_ENV}
# No Serve access log line per call: every request is a `submit` call on a ModelReplica (plus long-lived channel
# calls), which the router's own request metrics and logs already cover; at hundreds of requests a second the lines
# cost CPU in the replica and in Ray's log forwarding. A Serve config's deployment `logging_config` can turn it on.
DEPLOYMENT_LOGGING = {"enable_access_log": False}
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
SERVE_APPS_PATH = "/api/serve/applications/"

SHARD_COUNTS = (1, 2, 4, 8)
DEVICES = ("cuda", "cpu")
DTYPES = ("bfloat16", "float32")  # float16 is not supported by the engine
EFFORTS = ("low", "medium", "high")
AUTOSCALING_KEYS = {"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
                    "upscale_delay_s", "downscale_delay_s"}
ENGINE_KEYS = {"block_size", "num_blocks", "kv_memory_fraction", "cpu_kv_space_gib", "max_num_batched_tokens",
               "max_num_seqs", "max_model_len", "enable_prefix_caching", "enable_chunked_prefill", "scheduling_policy",
               "seed", "count_expert_tokens"}
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"}
# CPU-only machines time-share their cores: the placement group asks for CPU fractions, not whole cores.
CPU_REPLICA_SHARE = 0.25
CPU_SHARD_SHARE = 0.5
ENV_OVERRIDES = {"GPTOSS_GRPC_HOST": "grpc_host", "GPTOSS_HTTP_HOST": "http_host",
                 "GPTOSS_METRICS_HOST": "metrics_host", "GPTOSS_AUTH_TOKEN_FILE": "auth_token_file",
                 "GPTOSS_TLS_CERT_FILE": "tls_cert_file", "GPTOSS_TLS_KEY_FILE": "tls_key_file"}


class AppConfigError(ValueError):
    """Invalid application arguments; the message names the key."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class AppConfig:
    """Everything that shapes one deployment of the application (validated by `validate`)."""

    # ---- the build_app argument schema (helm/gptoss-cluster/files/serve-args.schema.json)
    model: str
    served_model_name: str | None = None
    shards_per_replica: int = 1
    device: str | None = None  # None: cuda when the Ray cluster has GPUs, else cpu
    dtype: str = "bfloat16"
    num_replicas: int | None = None  # None and no autoscaling_config: 1
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = 256
    router_replicas: int = 1
    max_queued_requests: int = 1024
    stream_interval: int = 1  # tokens per streamed delta after the first (RouterSettings.stream_interval)
    replica_transport: str = "grpc"  # router -> replica calls: Serve's gRPC transport or Ray actor tasks ("ray")
    routing_policy: str = "prefix_affinity"  # which replica serves a request (cluster.router.policies)
    grpc_port: int = 50051
    http_port: int = 8000  # the Routers' OpenAI-compatible HTTP server; 0: off
    metrics_port: int = 9400
    auth_token_env: str = "GPTOSS_AUTH_TOKEN"
    engine: dict[str, Any] = field(default_factory=dict)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    default_reasoning_effort: str = "medium"
    lora_modules: dict[str, str] = field(default_factory=dict)  # LoRA adapters loaded at start: name -> PEFT directory
    max_loras: int = 4  # LoRA adapters resident per shard at once (vLLM's --max-loras)
    max_lora_rank: int = 16  # the largest LoRA rank accepted (vLLM's --max-lora-rank)
    # ---- this machine's settings (environment for build_app; arguments for build_application)
    grpc_host: str = "0.0.0.0"
    http_host: str | None = None  # None: grpc_host
    metrics_host: str = "0.0.0.0"
    auth_token_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    max_message_bytes: int = 8 * 1024 * 1024
    replica_cpus: float | None = None  # None: 1 on GPU nodes, CPU_REPLICA_SHARE on CPU
    shard_cpus: float | None = None  # None: 1 on GPU nodes, CPU_SHARD_SHARE on CPU
    router_cpus: float = 0.5
    placement_strategy: str = "STRICT_PACK"
    health_interval_s: float = 1.0
    routing_stats_period_s: float = 1.0
    graceful_shutdown_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0

    @property
    def name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))

    @property
    def replicas(self) -> int:
        return self.num_replicas if self.num_replicas is not None else 1

    def chart_args(self) -> dict[str, Any]:
        """The build_app arguments (schema keys only) describing this config."""
        out: dict[str, Any] = {"model": self.model}
        if self.served_model_name:
            out["served_model_name"] = self.served_model_name
        out["shards_per_replica"] = self.shards_per_replica
        if self.device:
            out["device"] = self.device
        out["dtype"] = self.dtype
        if self.autoscaling_config is not None:
            out["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            out["num_replicas"] = self.replicas
        out.update(max_ongoing_requests=self.max_ongoing_requests, router_replicas=self.router_replicas,
                   max_queued_requests=self.max_queued_requests, stream_interval=self.stream_interval,
                   replica_transport=self.replica_transport, routing_policy=self.routing_policy,
                   grpc_port=self.grpc_port, http_port=self.http_port,
                   metrics_port=self.metrics_port, auth_token_env=self.auth_token_env)
        if self.engine:
            out["engine"] = dict(self.engine)
        if self.sampling_defaults:
            out["sampling_defaults"] = dict(self.sampling_defaults)
        out["default_reasoning_effort"] = self.default_reasoning_effort
        if self.lora_modules:
            out["lora_modules"] = dict(self.lora_modules)
        out.update(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank)
        return out


_SCHEMA_KEYS = ("model", "served_model_name", "shards_per_replica", "device", "dtype", "num_replicas",
                "autoscaling_config", "max_ongoing_requests", "router_replicas", "max_queued_requests",
                "stream_interval", "replica_transport", "routing_policy", "grpc_port",
                "http_port", "metrics_port", "auth_token_env", "engine", "sampling_defaults",
                "default_reasoning_effort", "lora_modules", "max_loras", "max_lora_rank")


def parse_args(args: Mapping[str, Any] | None) -> AppConfig:
    """Validate build_app arguments (the chart's schema) into an AppConfig; AppConfigError names the bad key."""
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise AppConfigError(f"build_app arguments must be a mapping, got {type(args).__name__}")
    unknown = sorted(set(args) - set(_SCHEMA_KEYS))
    if unknown:
        raise AppConfigError(f"unknown argument(s) {', '.join(map(repr, unknown))}; known: {', '.join(_SCHEMA_KEYS)}")
    if "model" not in args:
        raise AppConfigError("'model' is required: the checkpoint directory")
    config = AppConfig(**{k: copy.deepcopy(v) for k, v in args.items()})
    validate(config)
    return config


def validate(c: AppConfig) -> AppConfig:
    def fail(key: str, problem: str) -> None:
        raise AppConfigError(f"{key}: {problem}")

    if not isinstance(c.model, str) or not c.model:
        fail("model", f"must be a non-empty path, got {c.model!r}")
    if c.served_model_name is not None and not isinstance(c.served_model_name, str):
        fail("served_model_name", "must be a string")
    if c.shards_per_replica not in SHARD_COUNTS or not _is_int(c.shards_per_replica):
        fail("shards_per_replica", f"must be one of {SHARD_COUNTS}, got {c.shards_per_replica!r}")
    if c.device is not None and c.device not in DEVICES:
        fail("device", f"must be one of {DEVICES}, got {c.device!r}")
    if c.dtype not in DTYPES:
        fail("dtype", f"must be one of {DTYPES}, got {c.dtype!r}")
    if c.num_replicas is not None and c.autoscaling_config is not None:
        fail("num_replicas", "give num_replicas or autoscaling_config, not both")
    if c.num_replicas is not None and (not _is_int(c.num_replicas) or c.num_replicas < 1):
        fail("num_replicas", f"must be an integer >= 1, got {c.num_replicas!r}")
    if c.autoscaling_config is not None:
        a = c.autoscaling_config
        if not isinstance(a, Mapping):
            fail("autoscaling_config", "must be a mapping")
        for key in a:
            if key not in AUTOSCALING_KEYS:
                fail(f"autoscaling_config.{key}", f"unknown key; known: {', '.join(sorted(AUTOSCALING_KEYS))}")
        for key in ("min_replicas", "max_replicas", "initial_replicas"):
            if a.get(key) is not None and (not _is_int(a[key]) or a[key] < (1 if key == "max_replicas" else 0)):
                fail(f"autoscaling_config.{key}", f"must be an integer >= {1 if key == 'max_replicas' else 0}")
        if a.get("min_replicas", 1) > a.get("max_replicas", max(1, a.get("min_replicas", 1))):
            fail("autoscaling_config.min_replicas", "must not exceed max_replicas")
        for key in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
            if key in a and (not _is_num(a[key]) or a[key] < 0 or (key == "target_ongoing_requests" and
                                                                  a[key] == 0)):
                fail(f"autoscaling_config.{key}", f"must be a number {'> 0' if 'target' in key else '>= 0'}")
    for key, low in (("max_ongoing_requests", 1), ("router_replicas", 1), ("max_queued_requests", 0),
                     ("stream_interval", 1), ("grpc_port", 0), ("http_port", 0), ("metrics_port", 0)):
        value = getattr(c, key)
        if not _is_int(value) or value < low or (key.endswith("port") and value > 65535):
            fail(key, f"must be an integer >= {low}{' and <= 65535' if key.endswith('port') else ''}, got {value!r}")
    if c.replica_transport not in REPLICA_TRANSPORTS:
        fail("replica_transport", f"must be one of {REPLICA_TRANSPORTS}, got {c.replica_transport!r}")
    if c.routing_policy not in ROUTING_POLICIES:
        fail("routing_policy", f"must be one of {ROUTING_POLICIES}, got {c.routing_policy!r}")
    if c.http_port and c.http_port == c.grpc_port:
        fail("http_port", f"must differ from grpc_port ({c.grpc_port}); 0 turns the HTTP server off")
    if not isinstance(c.auth_token_env, str):
        fail("auth_token_env", "must be a string (the name of an environment variable)")
    from gptoss_cluster.workers.engine.config import EngineConfig
    from gptoss_cluster.workers.sampling import SamplingParams

    for name, known, cls in (("engine", ENGINE_KEYS, EngineConfig),
                             ("sampling_defaults", SAMPLING_KEYS, SamplingParams)):
        fields = getattr(c, name)
        if not isinstance(fields, Mapping):
            fail(name, f"must be a mapping of {cls.__name__} fields")
        for key in fields:
            if key not in known:
                fail(f"{name}.{key}", f"unknown key; known: {', '.join(sorted(known))}")
        try:
            cls(**fields)  # the dataclass's own checks, so the message matches what the replica would say
        except (TypeError, ValueError) as exc:
            fail(name, str(exc))
    if c.default_reasoning_effort not in EFFORTS:
        fail("default_reasoning_effort", f"must be one of {EFFORTS}, got {c.default_reasoning_effort!r}")
    if not isinstance(c.lora_modules, Mapping):
        fail("lora_modules", "must be a mapping of adapter name -> PEFT adapter directory")
    for name, path in c.lora_modules.items():
        problem = lora_name_problem(name) if isinstance(name, str) else "the adapter name must be a string"
        if problem is not None:
            fail(f"lora_modules.{name}", problem)
        if name == c.name:
            fail(f"lora_modules.{name}", "an adapter cannot take the served model's name")
        if not isinstance(path, str) or not path:
            fail(f"lora_modules.{name}", f"must be a non-empty path (the PEFT adapter directory), got {path!r}")
    for key in ("max_loras", "max_lora_rank"):
        value = getattr(c, key)
        if not _is_int(value) or value < 1:
            fail(key, f"must be an integer >= 1, got {value!r}")
    for key in ("replica_cpus", "shard_cpus"):
        value = getattr(c, key)
        if value is not None and (not _is_num(value) or value <= 0):
            fail(key, f"must be a number > 0, got {value!r}")
    if c.placement_strategy not in ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"):
        fail("placement_strategy", f"must be STRICT_PACK, PACK, SPREAD or STRICT_SPREAD, got {c.placement_strategy!r}")
    if bool(c.tls_cert_file) != bool(c.tls_key_file):
        fail("tls_cert_file", "TLS needs both a certificate and a key file")
    return c


def _resolve_device(config: AppConfig) -> str:
    if config.device:
        return config.device
    try:
        import ray

        if ray.is_initialized():
            return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    except Exception:
        pass
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def placement(config: AppConfig, device: str) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(placement group bundles, the replica actor's resources). Bundle 0 holds the replica actor; each of the G
    shard bundles one ShardWorker. With one shard the model runs inside the replica (LocalExecutor), so the single
    bundle carries the device itself."""
    g = config.shards_per_replica
    gpu = device == "cuda"
    replica_cpu = config.replica_cpus if config.replica_cpus is not None else (1.0 if gpu else CPU_REPLICA_SHARE)
    shard_cpu = config.shard_cpus if config.shard_cpus is not None else (1.0 if gpu else CPU_SHARD_SHARE)
    if g == 1:
        bundle = {"CPU": replica_cpu if gpu else replica_cpu + shard_cpu}
        if gpu:
            bundle["GPU"] = 1.0
        actor = {"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0.0)}
        return [bundle], actor
    shard = {"CPU": shard_cpu, "GPU": 1.0} if gpu else {"CPU": shard_cpu}
    return [{"CPU": replica_cpu}] + [dict(shard) for _ in range(g)], {"num_cpus": replica_cpu, "num_gpus": 0.0}


def replica_settings(config: AppConfig, device: str) -> dict[str, Any]:
    from gptoss_cluster.cluster.replica import ReplicaSettings

    # No KV default here: on CPU the engine sizes its pool by what it can use (EngineConfig.cpu_kv_space_gib).
    return ReplicaSettings(
        model=config.model, served_model_name=config.name, shards_per_replica=config.shards_per_replica,
        device=device, dtype=config.dtype, engine=dict(config.engine),
        placement_strategy=config.placement_strategy, max_ongoing_requests=config.max_ongoing_requests,
        drain_timeout_s=config.graceful_shutdown_timeout_s, metrics_port=config.metrics_port,
        metrics_host=config.metrics_host, lora_modules=dict(config.lora_modules), max_loras=config.max_loras,
        max_lora_rank=config.max_lora_rank,
    ).to_dict()


def router_settings(config: AppConfig) -> dict[str, Any]:
    from gptoss_cluster.cluster.router.settings import RouterSettings

    return RouterSettings(
        served_model_name=config.name, host=config.grpc_host, port=config.grpc_port, http_port=config.http_port,
        http_host=config.http_host,
        max_queued_requests=config.max_queued_requests, stream_interval=config.stream_interval,
        replica_transport=config.replica_transport, auth_token_env=config.auth_token_env,
        auth_token_file=config.auth_token_file, tls_cert_file=config.tls_cert_file,
        tls_key_file=config.tls_key_file, max_message_bytes=config.max_message_bytes,
        sampling_defaults=dict(config.sampling_defaults), default_reasoning_effort=config.default_reasoning_effort,
        health_interval_s=config.health_interval_s, drain_timeout_s=config.drain_timeout_s,
        metrics_port=config.metrics_port, metrics_host=config.metrics_host,
    ).to_dict()


def tracing_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The OTEL_* variables of this process (default: os.environ), which configure the deployments' tracing
    (cluster.tracing: spans over OTLP/gRPC when an endpoint is set). Both deployments get them in their runtime_env,
    so that `gptoss-cluster serve` or a Python driver with OTEL_* set in its shell traces, also against a remote
    RAY_ADDRESS (the endpoint must then be reachable from the cluster's nodes). On Kubernetes the chart sets them on
    the Ray pods instead (values `tracing`)."""
    env = os.environ if environ is None else environ
    return {key: value for key, value in env.items() if key.startswith("OTEL_")}


def replica_actor_options(config: AppConfig, device: str) -> dict[str, Any]:
    """The ModelReplica deployment's Ray actor options: its share of placement bundle 0, Serve's flags and this
    process's OTEL_* variables (`tracing_env`)."""
    return {**placement(config, device)[1], "runtime_env": {"env_vars": {**tracing_env(), **REPLICA_SERVE_ENV}}}


def router_actor_options(config: AppConfig) -> dict[str, Any]:
    """The Router deployment's Ray actor options (Serve merges these env vars with the application's): its CPUs,
    Serve's flags and this process's OTEL_* variables (`tracing_env`)."""
    return {"num_cpus": config.router_cpus, "runtime_env": {"env_vars": {**tracing_env(), **ROUTER_SERVE_ENV}}}


def replica_max_ongoing(config: AppConfig) -> int:
    """ModelReplica's Serve `max_ongoing_requests`: the requests it takes, plus one slot per Router replica for that
    router's token channel (a long-lived call; see cluster.token_channel.TokenChannels)."""
    return config.max_ongoing_requests + config.router_replicas


def build_application(config: AppConfig) -> Any:
    """The bound Serve application (Router -> ModelReplica) for a validated AppConfig."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from gptoss_cluster.cluster.replica import ModelReplicaImpl
    from gptoss_cluster.cluster.router.deployment import RouterImpl
    from gptoss_cluster.cluster.router.serve_routing import PolicyRequestRouter

    validate(config)
    device = _resolve_device(config)
    bundles, _ = placement(config, device)
    scaling: dict[str, Any] = ({"autoscaling_config": dict(config.autoscaling_config)}
                               if config.autoscaling_config is not None else {"num_replicas": config.replicas})
    model_replica = serve.deployment(
        name=MODEL_REPLICA,
        max_ongoing_requests=replica_max_ongoing(config),
        ray_actor_options=replica_actor_options(config, device),
        placement_group_bundles=bundles,
        placement_group_strategy=config.placement_strategy,
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        logging_config=DEPLOYMENT_LOGGING,
        request_router_config=RequestRouterConfig(
            request_router_class=PolicyRequestRouter,
            request_router_kwargs={"policy": config.routing_policy},
            request_routing_stats_period_s=config.routing_stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 5 * config.routing_stats_period_s),
        ),
        **scaling,
    )(ModelReplicaImpl)
    router = serve.deployment(
        name=ROUTER,
        num_replicas=config.router_replicas,
        ray_actor_options=router_actor_options(config),
        max_ongoing_requests=1000,
        health_check_period_s=5.0,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=config.drain_timeout_s + 5.0,
        logging_config=DEPLOYMENT_LOGGING,
    )(RouterImpl)
    return router.bind(model_replica.bind(replica_settings(config, device)), router_settings(config))


def build_app(args: dict[str, Any]) -> Any:
    """`gptoss_cluster.cluster.app:build_app`: the chart's arguments (see the module docstring) -> serve.Application."""
    config = parse_args(args)
    for env, key in ENV_OVERRIDES.items():
        if os.environ.get(env):
            setattr(config, key, os.environ[env])
    return build_application(config)


# ================================================================================================ Serve configs
def app_config(config: AppConfig, *, app_name: str = APP_NAME, env_vars: Mapping[str, str] | None = None,
               route_prefix: str | None = None) -> dict[str, Any]:
    """One entry of a Serve config's `applications` (what `serve deploy` / the REST API take)."""
    validate(config)
    device = _resolve_device(config)
    bundles, _ = placement(config, device)
    args = config.chart_args()
    args["device"] = device
    replica: dict[str, Any] = {"name": MODEL_REPLICA, "max_ongoing_requests": replica_max_ongoing(config),
                               "ray_actor_options": replica_actor_options(config, device),
                               "placement_group_bundles": bundles,
                               "placement_group_strategy": config.placement_strategy}
    if config.autoscaling_config is not None:
        replica["autoscaling_config"] = dict(config.autoscaling_config)
    else:
        replica["num_replicas"] = config.replicas
    app: dict[str, Any] = {
        "name": app_name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [
            {"name": ROUTER, "num_replicas": config.router_replicas,
             "ray_actor_options": router_actor_options(config)},
            replica,
        ],
    }
    env = dict(env_vars or {})
    for var, key in ENV_OVERRIDES.items():
        value = getattr(config, key)
        if value and value != getattr(AppConfig, key, None):
            env.setdefault(var, str(value))
    if env:
        app["runtime_env"] = {"env_vars": env}
    return app


def serve_config(applications: list[dict[str, Any]], *, proxy_location: str = "Disabled",
                 http_host: str = "127.0.0.1", http_port: int = 8000) -> dict[str, Any]:
    """A whole Serve config (ServeDeploySchema) for the given application entries."""
    return {"proxy_location": proxy_location, "http_options": {"host": http_host, "port": http_port},
            "applications": applications}


def to_yaml(config: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False)


# ================================================================================================ dashboard REST API
def ray_auth_token() -> str | None:
    """Ray's cluster token, found where Ray looks: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


class DashboardError(RuntimeError):
    """The Ray dashboard refused or failed a request (the message says what it answered)."""


class DashboardClient:
    """The Ray dashboard's Serve REST API (`/api/serve/applications/`), with Ray's token as a bearer token."""

    def __init__(self, address: str = DEFAULT_DASHBOARD, token: str | None = None, timeout_s: float = 30.0) -> None:
        if "://" not in address:
            address = f"http://{address}"
        self.address = address.rstrip("/")
        self.token = token if token is not None else ray_auth_token()
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.address + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip().splitlines()
            hint = " (Ray's auth token: set RAY_AUTH_TOKEN or ~/.ray/auth_token)" if exc.code in (401, 403) else ""
            raise DashboardError(f"{method} {self.address}{path}: HTTP {exc.code}{hint}: "
                                 f"{detail[0] if detail else exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DashboardError(f"cannot reach the Ray dashboard at {self.address}: {reason}") from None
        return json.loads(text) if text.strip() else None

    def details(self) -> dict[str, Any]:
        return self._request("GET", SERVE_APPS_PATH) or {}

    def put(self, config: Mapping[str, Any]) -> None:
        self._request("PUT", SERVE_APPS_PATH, dict(config))

    def declarative_config(self, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The Serve config now applied: every application deployed from a config, with the cluster options."""
        details = details if details is not None else self.details()
        apps = [a["deployed_app_config"] for a in (details.get("applications") or {}).values()
                if a.get("deployed_app_config")]
        out: dict[str, Any] = {"applications": apps}
        if details.get("proxy_location"):
            out["proxy_location"] = details["proxy_location"]
        http = details.get("http_options")
        if http:
            out["http_options"] = {k: http[k] for k in ("host", "port") if k in http}
        return out

    def deploy_app(self, app: Mapping[str, Any], *, proxy_location: str = "Disabled") -> None:
        """Add or replace one application, keeping every other config-deployed application as it is (a PUT
        replaces the whole declarative set)."""
        current = self.declarative_config()
        apps = [a for a in current["applications"] if a.get("name") != app["name"]] + [dict(app)]
        current["applications"] = apps
        current.setdefault("proxy_location", proxy_location)
        self.put(current)

    def delete_app(self, name: str) -> None:
        current = self.declarative_config()
        current["applications"] = [a for a in current["applications"] if a.get("name") != name]
        self.put(current)

    def replica_states(self, app_name: str = APP_NAME, deployment: str = MODEL_REPLICA) -> dict[str, int]:
        app = (self.details().get("applications") or {}).get(app_name) or {}
        dep = (app.get("deployments") or {}).get(deployment) or {}
        counts: dict[str, int] = {}
        for replica in dep.get("replicas") or []:
            counts[replica.get("state", "UNKNOWN")] = counts.get(replica.get("state", "UNKNOWN"), 0) + 1
        return counts


def scale(replicas: int | None = None, *, autoscaling: Mapping[str, Any] | None = None,
          address: str = DEFAULT_DASHBOARD, app_name: str = APP_NAME, token: str | None = None,
          wait_s: float = 0.0) -> dict[str, Any]:
    """Set the ModelReplica replica count (or autoscaling bounds) of a running, config-deployed application through
    the dashboard's REST API; with `wait_s`, wait until that many replicas run. Returns the new deployment entry."""
    if (replicas is None) == (autoscaling is None):
        raise ValueError("give replicas or autoscaling, not both")
    if replicas is not None and (not _is_int(replicas) or replicas < 1):
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    client = DashboardClient(address, token)
    details = client.details()
    app = (details.get("applications") or {}).get(app_name)
    if app is None:
        known = ", ".join(sorted(details.get("applications") or {})) or "none"
        raise DashboardError(f"no Serve application {app_name!r} on {client.address} (applications: {known})")
    if not app.get("deployed_app_config"):
        raise DashboardError(f"application {app_name!r} was deployed with the Python API (serve.run), not a config; "
                             "deploy it with `gptoss-cluster serve` or `serve deploy` to scale it this way")
    config = client.declarative_config(details)
    target = next(a for a in config["applications"] if a.get("name") == app_name)
    deployments = target.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == MODEL_REPLICA), None)
    if entry is None:
        entry = {"name": MODEL_REPLICA}
        deployments.append(entry)
    if replicas is not None:
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = replicas
    else:
        entry.pop("num_replicas", None)
        entry["autoscaling_config"] = dict(autoscaling or {})
    client.put(config)
    if wait_s and replicas is not None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            states = client.replica_states(app_name)
            if states.get("RUNNING", 0) == replicas and sum(states.values()) == replicas:
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"{MODEL_REPLICA} did not reach {replicas} running replicas in {wait_s:.0f} s "
                               f"(now: {client.replica_states(app_name)})")
    return entry


# ================================================================================================ a local cluster
def default_model_dir() -> Path:
    """Where `gptoss-cluster serve` keeps the embedded tiny checkpoint: $GPTOSS_CACHE_DIR/models/tiny (default
    ~/.cache/gptoss-cluster/models/tiny)."""
    root = os.environ.get("GPTOSS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gptoss-cluster")
    return Path(root) / "models" / "tiny"


def ensure_tiny_checkpoint(path: Path | None = None) -> Path:
    """The deterministic tiny checkpoint (seed 0), written on first use."""
    from gptoss_cluster.workers.checkpoint import CheckpointError, open_checkpoint, write_checkpoint
    from gptoss_cluster.workers.config import ModelConfig

    path = Path(path or default_model_dir())
    try:
        with open_checkpoint(path):
            return path
    except (CheckpointError, OSError):
        pass
    try:
        write_checkpoint(ModelConfig.preset("tiny"), path, layout="hf", seed=0, progress=False,
                         overwrite=path.exists())
    except FileExistsError:  # another process wrote it meanwhile
        pass
    return path


def cpus_needed(config: AppConfig, device: str) -> float:
    bundles, _ = placement(config, device)
    replicas = config.replicas if config.autoscaling_config is None else int(
        config.autoscaling_config.get("max_replicas", 1))
    return replicas * sum(b.get("CPU", 0.0) for b in bundles) + config.router_replicas * config.router_cpus


class LocalCluster:
    """Runs the application on Ray: starts a Ray node on loopback with its dashboard (or joins `ray_address` /
    $RAY_ADDRESS), deploys the config through the dashboard's REST API (so it can be scaled the same way), waits
    until the router reports a ready replica, and on `close()` removes the application (routers drain: health
    NOT_SERVING first, running requests finish) and stops the Ray node it started."""

    def __init__(self, config: AppConfig, *, app_name: str = APP_NAME, ray_address: str | None = None,
                 dashboard_host: str = "127.0.0.1", dashboard_port: int = 8265, dashboard: str | None = None,
                 num_cpus: int | None = None, env_vars: Mapping[str, str] | None = None) -> None:
        self.config = validate(config)
        self.app_name = app_name
        self.ray_address = ray_address if ray_address is not None else os.environ.get("RAY_ADDRESS") or None
        self.dashboard = dashboard or f"http://{dashboard_host}:{dashboard_port}"
        self.dashboard_host, self.dashboard_port = dashboard_host, dashboard_port
        self.num_cpus = num_cpus
        self.env_vars = dict(env_vars or {})
        self.started_ray = False
        self.deployed = False
        self.gcs_address: str | None = None
        self.client: DashboardClient | None = None

    def start(self, ready_timeout_s: float = 600.0, log: Any = None) -> LocalCluster:
        import ray

        from gptoss_cluster.workers.engine.ray_executor import connect_ray

        log = log or (lambda *_: None)
        if not ray.is_initialized():
            if self.ray_address:
                log(f"joining the Ray cluster at {self.ray_address}")
                if ray_auth_token() and "RAY_AUTH_MODE" not in os.environ:
                    # Ray sends its token to an explicitly named cluster only when the mode says so
                    os.environ["RAY_AUTH_MODE"] = "token"
                connect_ray(self.ray_address)
            else:
                device = self.config.device or _resolve_device(self.config)
                cpus = self.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus_needed(self.config, device)) + 1)
                log(f"starting Ray on 127.0.0.1 ({cpus} CPUs, dashboard {self.dashboard})")
                connect_ray(None, num_cpus=cpus, include_dashboard=True, dashboard_host=self.dashboard_host,
                            dashboard_port=self.dashboard_port)
                self.started_ray = True
        self.config.device = _resolve_device(self.config)
        self.gcs_address = ray.get_runtime_context().gcs_address
        self.client = DashboardClient(self.dashboard)
        deadline = time.monotonic() + 120
        while True:  # the dashboard's Serve module can answer a little after ray.init returns
            try:
                self.client.details()
                break
            except DashboardError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        if self.app_name not in (self.client.details().get("applications") or {}):
            # a new deploy starts with no run-time LoRA changes (one deleted by other means left its registry)
            from gptoss_cluster.cluster.lora_registry import kill_registry

            kill_registry(self.app_name)
        app = app_config(self.config, app_name=self.app_name, env_vars=self.env_vars)
        self.client.deploy_app(app)
        self.deployed = True
        log(f"deployed application {self.app_name!r}; waiting for a ready replica")
        self.wait_ready(ready_timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Until the router's health says gptoss.v1.Inference SERVING (raises on a failed deployment)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from gptoss_cluster.cluster.router.grpc_service import INFERENCE_SERVICE

        assert self.client is not None
        host = "127.0.0.1" if self.config.grpc_host in ("0.0.0.0", "::", "") else self.config.grpc_host
        target = f"{host}:{self.config.grpc_port}"
        deadline = time.monotonic() + timeout_s
        last_check = 0.0
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() - last_check > 10:  # only to fail fast; the dashboard is slow under load
                    last_check = time.monotonic()
                    app = (self.client.details().get("applications") or {}).get(self.app_name) or {}
                    if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
                        raise RuntimeError(f"application {self.app_name!r} is {app['status']}: "
                                           f"{(app.get('message') or '').strip()[:2000]}")
                time.sleep(0.25)
        raise TimeoutError(f"no replica became ready within {timeout_s:.0f} s (router {target})")

    def close(self, timeout_s: float = 120.0) -> None:
        if self.deployed and self.client is not None:
            try:
                self.client.delete_app(self.app_name)
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline and self.app_name in (self.client.details().get("applications")
                                                                        or {}):
                    time.sleep(0.25)
            except DashboardError:
                pass
            self.deployed = False
            with contextlib.suppress(Exception):  # its run-time LoRA adapter changes end with it
                from gptoss_cluster.cluster.lora_registry import kill_registry

                kill_registry(self.app_name)
        if self.started_ray:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
            self.started_ray = False

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.close()


__all__ = ["APP_NAME", "AppConfig", "AppConfigError", "DashboardClient", "DashboardError", "LocalCluster",
           "MODEL_REPLICA", "ROUTER", "app_config", "build_app", "build_application", "default_model_dir",
           "ensure_tiny_checkpoint", "parse_args", "placement", "ray_auth_token", "scale", "serve_config", "to_yaml",
           "tracing_env", "validate"]
