"""One router process's servers: gptoss.v1 over gRPC and the OpenAI-compatible HTTP API, on one router core.

`GptossServer(backend, settings, metrics, tracer)` puts together a `RouterCore` (`cluster.router.core`: validation,
admission, replica choice, retries, deadlines, draining; spans when `tracer` is on), its gRPC service
(`cluster.router.grpc_service`), the OpenAI HTTP app when `http_port` is set (`cluster.router.openai_http`, uvicorn
on the same event loop) and the metrics endpoint when `metrics_port` is set; both servers check the same bearer token
(`resolve_auth_token`). The
`Router` Serve deployment runs one over a `ServeBackend` (`cluster.router.deployment`); tests and benchmarks run one
over a `LocalBackend`.

`drain()` turns gRPC health NOT_SERVING first (HTTP /health answers 503), then refuses new calls (UNAVAILABLE, HTTP
503) and lets running ones finish, bounded by a timeout.
"""

from __future__ import annotations

import logging
from typing import Any

from gptoss_cluster.cluster.router.backend import Backend
from gptoss_cluster.cluster.router.core import RouterCore
from gptoss_cluster.cluster.router.grpc_service import GrpcService
from gptoss_cluster.cluster.router.settings import RouterSettings, resolve_auth_token
from gptoss_cluster.cluster.tracing import Tracer

__all__ = ["GptossServer"]

logger = logging.getLogger("gptoss.router")


class GptossServer:
    """gptoss.v1 (gRPC), the OpenAI-compatible HTTP API and metrics over one RouterCore."""

    def __init__(self, backend: Backend, settings: RouterSettings | None = None, metrics: Any = None,
                 tracer: Tracer | None = None) -> None:
        self.settings = settings or RouterSettings()
        self.metrics = metrics
        self.token = resolve_auth_token(self.settings)
        self.core = RouterCore(backend, self.settings, metrics, tracer)
        self.grpc = GrpcService(self.core, self.token)
        self.core.on_ready = self.grpc.set_ready
        self.http: Any = None  # cluster.router.openai_http.HttpServer while http_port is set
        self._metrics_server: Any = None

    @property
    def port(self) -> int | None:
        """The bound gRPC port."""
        return self.grpc.port

    @property
    def http_port(self) -> int | None:
        """The bound port of the OpenAI-compatible HTTP server (None: off)."""
        return None if self.http is None else self.http.port

    async def start(self) -> int:
        """Bind and serve gRPC (and HTTP, metrics), start polling the replicas; returns the bound gRPC port."""
        s = self.settings
        if s.http_port:  # bound first: a taken port fails the start before anything serves
            from gptoss_cluster.cluster.router.openai_http import HttpServer

            self.http = HttpServer(self.core, self.token, s.http_host or s.host, s.http_port)
        try:
            port = await self.grpc.start(s)
        except BaseException:
            if self.http is not None:
                self.http.close()
                self.http = None
            raise
        if s.metrics_port and self.metrics is not None:
            from gptoss_cluster.cluster.metrics import start_metrics_server

            self._metrics_server = start_metrics_server(s.metrics_port, s.metrics_host, metrics=self.metrics,
                                                        exist_ok=True)
        if self.http is not None:
            await self.http.start()
        self.core.start()
        logger.info("gRPC server on %s:%d (auth %s, tls %s)%s", s.host, port, "on" if self.token else "off",
                    "on" if s.tls_cert_file else "off",
                    f"; OpenAI-compatible HTTP on {self.http.host}:{self.http.port}" if self.http else "")
        return port

    async def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Wait until a replica is ready (the Inference health service SERVING)."""
        return await self.core.wait_ready(timeout_s)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Health NOT_SERVING first, then refuse new calls and wait for running ones; True if all finished."""
        self.core.draining = True  # before health changes: no poll may turn it SERVING again
        await self.grpc.enter_graceful_shutdown()
        return await self.core.drain(timeout_s)

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.core.stop()
        if self.http is not None:
            await self.http.stop(grace_s)
            self.http = None
        await self.grpc.stop(grace_s)
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
