"""The router's settings (`RouterSettings`, filled by cluster.app from the application's arguments) and its token."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gptoss_cluster.cluster.contract import from_dict

__all__ = ["RouterSettings", "resolve_auth_token"]


@dataclass
class RouterSettings:
    """Knobs of one router (cluster.app fills them from the application's arguments)."""

    served_model_name: str = ""
    host: str = "0.0.0.0"
    port: int = 50051
    http_port: int = 0  # the OpenAI-compatible HTTP server; 0: off
    http_host: str | None = None  # None: the gRPC host
    max_queued_requests: int = 1024
    max_inflight_per_replica: int | None = None  # None: each replica's max_ongoing_requests
    auth_token_env: str = "GPTOSS_AUTH_TOKEN"
    auth_token_file: str | None = None
    auth_token: str | None = None  # resolved token (never put it in a config: use the env var or file)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    max_message_bytes: int = 8 * 1024 * 1024
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    default_reasoning_effort: str = "medium"
    health_interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    # After the first token, pass a request's tokens on in deltas of at least this many (or its last): fewer
    # messages per token for the router, Serve and the client, at the cost of a coarser stream (vLLM's and
    # SGLang's --stream-interval). 1: every delta as it comes.
    stream_interval: int = 1
    # How Serve carries the per-request and token-channel calls to the replicas: "grpc" (Serve's gRPC transport
    # between deployments) or "ray" (Ray actor tasks); see cluster.router.serve_backend.ServeBackend.
    replica_transport: str = "grpc"
    router_name: str = "router"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouterSettings:
        """Refuses unknown keys by name: a setting renamed on one side must not fall back to its default."""
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("auth_token")
        return out


def resolve_auth_token(settings: RouterSettings) -> str | None:
    """The bearer token the router requires: settings.auth_token, else the file, else $auth_token_env; None: off."""
    if settings.auth_token:
        return settings.auth_token
    if settings.auth_token_file:
        with open(settings.auth_token_file) as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"auth token file {settings.auth_token_file} is empty")
        return token
    if settings.auth_token_env:
        return os.environ.get(settings.auth_token_env, "").strip() or None
    return None
