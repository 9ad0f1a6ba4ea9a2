"""A replica that joins later serves the adapters the Admin service loaded, and not those it unloaded
(`cluster.lora_registry`).

The registry and the router's records run against scripted replicas; a real replica core started after Admin calls
(in this process) must serve exactly the adapters its peers serve, with greedy tokens equal to the offline `LLM`; the
end-to-end test kills the only ModelReplica of a real `serve` on loopback and checks what Serve's replacement serves.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import grpc
import pytest

from gptoss_cluster.cluster.client import Client
from gptoss_cluster.cluster.lora_registry import AdapterChanges, AdapterRegistry
from gptoss_cluster.cluster.router.grpc_service import INFERENCE_SERVICE
from gptoss_cluster.cluster.router.settings import RouterSettings
from gptoss_cluster.cluster.router.testing import ScriptedReplica, ServerThread
from tests.test_lora_serving import E2E_PROMPTS, E2E_TOKENS, adapters, offline  # noqa: F401 (fixtures)
from tests.tools import free_port


def _greedy(client: Client, prompt: list[int], adapter: str | None) -> list[int]:
    return [t for d in client.generate(prompt, adapter=adapter, max_tokens=E2E_TOKENS, temperature=0,
                                       ignore_eos=True) for t in d.token_ids]


def _retried(call: Any, *args: Any, tries: int = 5) -> Any:
    """`call(*args)`, again after UNAVAILABLE: right after Serve replaced a replica, the router's poll may briefly see
    none ready (the dead one's stats call failing)."""
    for attempt in range(tries):
        try:
            return call(*args)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE or attempt == tries - 1:
                raise
            time.sleep(0.5)


# ================================================================================================ the registry
def test_registry_versions_and_what_a_replica_serves():
    registry = AdapterRegistry()

    async def run() -> None:
        assert await registry.changes() == AdapterChanges(0, {})
        assert await registry.changes(since=0) is None  # nothing new
        assert await registry.record("a", "/a") == 1
        assert await registry.record("a", "/a") == 1  # the same change twice: no new version
        assert await registry.record("sql", None) == 2
        assert await registry.record("b", "/b") == 3
        assert await registry.record("b", None) == 4
        changes = await registry.changes(since=1)
        assert changes == AdapterChanges(4, {"a": "/a", "sql": None, "b": None})
        assert await registry.changes(since=4) is None
        # start-up modules, less those unloaded, with those loaded (a reload from another directory wins)
        assert changes.adapters({"sql": "/sql", "chat": "/chat", "a": "/old-a"}) == {"chat": "/chat", "a": "/a"}

    asyncio.run(run())


def test_the_router_records_only_what_the_replicas_did(tmp_path):
    """A load that every replica refused is not recorded (a replica starting later must not fail on it); an unload
    is recorded once the replicas answered, also for a start-up adapter."""
    good = tmp_path / "good"
    good.mkdir()
    registry = AdapterRegistry()
    replicas = [ScriptedReplica(replica_id=f"r{i}", adapters={"sql": "/adapters/sql"}) for i in range(2)]
    st = ServerThread()
    address = st.start(replicas, RouterSettings(host="127.0.0.1", port=0, health_interval_s=0.05))
    st.backend.adapter_registry = registry
    try:
        with Client(address, timeout=30) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.load_lora("bad", str(tmp_path / "missing"))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert st.run(registry.changes()) == AdapterChanges(0, {})
            client.load_lora("chat", str(good))
            client.unload_lora("sql")
            with pytest.raises(grpc.RpcError) as unknown:
                client.unload_lora("never")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        changes = st.run(registry.changes())
        assert dict(changes.entries) == {"chat": str(good), "sql": None, "never": None}
        assert changes.adapters({"sql": "/adapters/sql"}) == {"chat": str(good)}
    finally:
        st.stop()


# ================================================================================================ real replica cores
def test_a_replica_started_after_admin_calls_serves_the_same_adapters(checkpoints, adapters, offline):  # noqa: F811
    """r0 starts with `full`; the Admin service loads `pattern`, unloads `full`, loads then unloads `rslora`; r1,
    started afterwards from the same settings, serves `pattern` only, with the offline LLM's tokens, and applies a
    later change when it syncs."""
    from gptoss_cluster.cluster.replica import ReplicaCore, ReplicaSettings

    settings = ReplicaSettings(model=str(checkpoints["tinyb-hf"]), dtype="float32", served_model_name="tinyb",
                               engine={"num_blocks": 256, "max_model_len": 256, "max_num_seqs": 8}, max_loras=2,
                               lora_modules={"full": adapters["full"]})
    registry = AdapterRegistry()
    r0 = ReplicaCore(settings, replica_id="app#r0")
    st = ServerThread()
    address = st.start([r0], RouterSettings(host="127.0.0.1", port=0, health_interval_s=0.05))
    st.backend.adapter_registry = registry
    r1 = None
    try:
        with Client(address, timeout=120) as client:
            client.load_lora("pattern", adapters["pattern"])
            client.unload_lora("full")
            client.load_lora("rslora", adapters["rslora"])
            client.unload_lora("rslora")
            assert [a.name for a in r0.adapters()] == ["pattern"]
            changes = st.run(registry.changes())
            r1 = ReplicaCore(settings, replica_id="app#r1", adapter_changes=changes)  # full's directory is fine:
            assert [a.name for a in r1.adapters()] == ["pattern"]  # it stays unloaded all the same
            assert r1.adapter_version == changes.version
            st.backend.cores = [r1]  # r0 goes away: only r1 serves from now on
            st.run(r0.shutdown())
            time.sleep(0.3)  # a poll or more: the router sees r1's adapters
            for i, prompt in enumerate(E2E_PROMPTS):
                assert _greedy(client, prompt, "pattern") == offline["pattern"][i], i
            assert r1.requests_total == len(E2E_PROMPTS)
            for name in ("full", "rslora"):
                with pytest.raises(grpc.RpcError) as err:
                    _greedy(client, E2E_PROMPTS[0], name)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND, name
        # a later change reaches r1 by its sync; unchanged entries are left alone
        st.run(registry.record("rslora", adapters["rslora"]))
        assert r1.sync_adapters(st.run(registry.changes(r1.adapter_version))) == []
        assert sorted(a.name for a in r1.adapters()) == ["pattern", "rslora"]
        r1.engine.remove_lora("pattern")  # not the registry's doing: a sync without a change to it leaves it so
        st.run(registry.record("broken", adapters["full"] + "-missing"))
        problems = r1.sync_adapters(st.run(registry.changes(r1.adapter_version)))
        assert len(problems) == 1 and problems[0].startswith("broken"), problems  # logged and skipped
        assert sorted(a.name for a in r1.adapters()) == ["rslora"]
    finally:
        for core in (r0, r1):
            if core is not None:
                st.run(core.shutdown())
        st.stop()


# ================================================================================================ end to end
TOKEN = "lora-registry-token"
TOKEN_ENV = "GPTOSS_LORA_REGISTRY_TEST_TOKEN"


def test_serve_restarts_a_killed_replica_with_the_admin_adapters(checkpoints, adapters, offline):  # noqa: F811
    """`serve` on loopback with one ModelReplica (`full` at start); Admin: load `pattern`, unload `full`, load then
    unload `rslora`; the replica is killed and Serve starts another, which serves `pattern` only. The registry actor
    lives outside the replicas' placement groups, and closing the cluster removes it with the application."""
    import ray

    from gptoss_cluster.cluster.app import APP_NAME, AppConfig, LocalCluster
    from gptoss_cluster.cluster.lora_registry import REGISTRY_NAMESPACE, registry_name

    if ray.is_initialized():
        ray.shutdown()
    grpc_port = free_port()
    config = AppConfig(model=str(checkpoints["tinyb-hf"]), served_model_name="tinyb", dtype="float32", device="cpu",
                       num_replicas=1, grpc_port=grpc_port, grpc_host="127.0.0.1", http_port=0, metrics_port=0,
                       auth_token_env=TOKEN_ENV, health_interval_s=0.2, routing_stats_period_s=0.5,
                       graceful_shutdown_timeout_s=5, drain_timeout_s=5, max_loras=2,
                       lora_modules={"full": adapters["full"]},
                       engine={"num_blocks": 256, "max_model_len": 256, "max_num_seqs": 8})
    local = LocalCluster(config, ray_address="", dashboard_port=free_port(), num_cpus=4,
                         env_vars={TOKEN_ENV: TOKEN, "GPTOSS_NO_PROGRESS": "1"})
    try:
        local.start(ready_timeout_s=300)
        with Client(f"127.0.0.1:{grpc_port}", token=TOKEN, timeout=120) as client:
            client.load_lora("pattern", adapters["pattern"])
            client.unload_lora("full")
            client.load_lora("rslora", adapters["rslora"])
            client.unload_lora("rslora")
            (first,) = [r.replica_id for r in client.list_replicas()]
            (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == "serve" and "ModelReplica" in a["name"]]
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            deadline = time.monotonic() + 240
            while True:  # Serve starts a replacement; the router's poll finds it and turns ready again
                try:
                    replicas = [r.replica_id for r in client.list_replicas() if r.state == "RUNNING"]
                    ready = client.health(INFERENCE_SERVICE) == "SERVING"
                except grpc.RpcError:
                    replicas, ready = [], False
                if ready and replicas not in ([], [first]):
                    break
                assert time.monotonic() < deadline, "Serve did not restart the killed replica"
                time.sleep(0.5)
            registry = ray.get_actor(registry_name(APP_NAME), namespace=REGISTRY_NAMESPACE)
            assert [a.name for a in client.list_loras().adapters] == ["pattern"], ray.get(registry.changes.remote())
            for i, prompt in enumerate(E2E_PROMPTS):
                assert _retried(_greedy, client, prompt, "pattern") == offline["pattern"][i], i
            for unloaded in ("full", "rslora"):
                with pytest.raises(grpc.RpcError) as err:
                    _retried(_greedy, client, E2E_PROMPTS[0], unloaded)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND, unloaded
        # outside every placement group (a replica that created it must not take it along when Serve removes it)
        from ray.util.state import list_actors

        (state,) = list_actors(address=local.dashboard, filters=[("name", "=", registry_name(APP_NAME))])
        assert state.state == "ALIVE" and state.placement_group_id is None, state
        started_ray, local.started_ray = local.started_ray, False  # as if it had joined a running cluster
        local.close()  # deletes the application, and its registry with it
        local.started_ray = started_ray
        with pytest.raises(ValueError):
            ray.get_actor(registry_name(APP_NAME), namespace=REGISTRY_NAMESPACE)
    finally:
        local.close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
