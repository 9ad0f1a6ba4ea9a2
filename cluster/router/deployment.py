"""The `Router` Ray Serve deployment: one `GptossServer` over the ModelReplica deployment's handle."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from gptoss_cluster.cluster.lora_registry import RayAdapterRegistry
from gptoss_cluster.cluster.router.serve_backend import ServeBackend
from gptoss_cluster.cluster.router.server import GptossServer
from gptoss_cluster.cluster.router.settings import RouterSettings
from gptoss_cluster.cluster.tracing import Tracer

__all__ = ["RouterImpl"]


class RouterImpl:
    """The body of the `Router` Serve deployment (cluster.app applies the deployment options)."""

    async def __init__(self, replica_handle: Any, settings: dict[str, Any]) -> None:
        from gptoss_cluster.cluster.metrics import Metrics

        self.settings = RouterSettings.from_dict(settings)
        # spans over OTLP when this process's OTEL_* variables configure an endpoint (cluster.app copies them into
        # the deployment's runtime_env); off and free otherwise
        self.tracer = Tracer.from_env("router")
        from ray import serve

        context = serve.get_replica_context()
        self.settings.router_name = context.replica_id.unique_id
        # the Admin service's adapter changes, for ModelReplicas that start later (cluster.lora_registry)
        registry = await asyncio.to_thread(RayAdapterRegistry, context.app_name)
        backend = ServeBackend(replica_handle, transport=self.settings.replica_transport, adapter_registry=registry)
        self.server = GptossServer(backend, self.settings, Metrics.for_process(), self.tracer)
        await self.server.start()

    async def info(self) -> dict[str, Any]:
        """Where this router serves and how busy it is (benchmarks, tests and operators read it)."""
        s, core = self.server, self.server.core
        return {"port": s.port, "host": s.settings.host, "http_port": s.http_port,
                "ready_replicas": core.ready_replicas, "draining": core.draining, "inflight": core.inflight,
                "queued": core.admission.queued, "running": core.admission.running,
                "capacity": core.admission.capacity, "pid": os.getpid()}

    async def drain(self, timeout_s: float | None = None) -> bool:
        return await self.server.drain(timeout_s)

    async def check_health(self) -> None:
        if self.server.grpc.server is None and not self.server.core.draining:
            raise RuntimeError("the gRPC server is not running")

    async def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            await server.drain()
            await server.stop()
        tracer = getattr(self, "tracer", None)
        if tracer is not None:
            tracer.shutdown()  # exports the spans still batched
