"""The chart's serveConfigV2, deployed for real: `helm template` renders the RayService, its `serveConfigV2` is adapted
only where this machine differs from a Kubernetes pod (`adapt_for_this_machine` lists each change and why) and PUT to
`/api/serve/applications/` of a local Ray node's dashboard, exactly as the KubeRay operator does. Then a gRPC Chat
gets an answer, health says SERVING, and after a known set of requests ONE scrape of the node's metrics endpoint (the
chart's exporter sidecar command over the application's PROMETHEUS_MULTIPROC_DIR) holds every metric family of the
observability issue, with values that add up to what the client saw.

Everything stays on 127.0.0.1. The Ray node gets what the chart's pods give Ray: the router group's custom resource
`gptoss_router` and the API token as GPTOSS_AUTH_TOKEN (the chart's Secret). helm comes from scripts/fetch-tools.sh;
without it the module skips, saying why.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from gptoss_cluster.cluster.app import DashboardClient, DashboardError, parse_args, placement
from gptoss_cluster.cluster.client import Client
from gptoss_cluster.cluster.router.grpc_service import INFERENCE_SERVICE
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from tests.tools import find_tool, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "gptoss-cluster"
# The chart's defaults (what `helm install` without -f deploys: gpt-oss-20b on one GPU) and its CPU demo (the tiny
# model, two CPU shards per replica: ShardWorker actors, expert-parallel `rank` labels).
VALUES_FILES = ("default-values.yaml", "cpu-tiny-values.yaml")
API_TOKEN = "chart-deploy-test-token"
KV_BLOCKS = 256  # 4096 tokens of KV: plenty for the tiny model and these requests, no preemption expected
READY_TIMEOUT_S = 150.0


# ================================================================================================ helpers

def _wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (grpc.RpcError, DashboardError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def render_chart(helm: str, values: str) -> dict[str, Any]:
    """The RayService of `helm template` with a ci values file (as CI renders it)."""
    out = subprocess.run([helm, "template", "demo", str(CHART), "--namespace", "llm", "-f",
                          str(CHART / "ci" / values)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    (rayservice,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "RayService"]
    return rayservice


def adapt_for_this_machine(serve_config: dict[str, Any], *, model: Path, grpc_port: int, http_port: int,
                           metrics_dir: Path, api_http_port: int) -> tuple[dict[str, Any], list[str]]:
    """A copy of the chart's serveConfigV2 that can run on this machine, and what was changed. Only what cannot
    exist here changes; every other field (deployments, Router resources, engine and sampling settings, dtype,
    served name, auth, metrics_port 0) is deployed as the chart rendered it."""
    config = copy.deepcopy(serve_config)
    changes: list[str] = []

    def override(where: dict[str, Any], key: str, value: Any, why: str, path: str) -> None:
        if where.get(key) != value:
            changes.append(f"{path}: {where.get(key)!r} -> {value!r} ({why})")
            where[key] = value

    override(config["http_options"], "host", "127.0.0.1", "traffic stays on loopback", "http_options.host")
    override(config["http_options"], "port", http_port, "8000 may be taken on a shared machine", "http_options.port")
    (app,) = config["applications"]
    args = app["args"]
    override(args, "model", str(model), "the pods mount the weights or make them in an init container; here the "
             "tiny checkpoint of the session fixture, HF layout", "args.model")
    override(args, "device", "cpu", "no GPU here; build_app then asks CPU-only placement bundles", "args.device")
    override(args, "grpc_port", grpc_port, "50051 may be taken on a shared machine", "args.grpc_port")
    if "http_port" in json.loads((CHART / "files" / "serve-args.schema.json").read_text())["properties"]:
        override(args, "http_port", api_http_port, "the Routers' OpenAI HTTP port (default 8000) may be taken on a "
                 "shared machine", "args.http_port")
    engine = args.setdefault("engine", {})
    override(engine, "num_blocks", KV_BLOCKS, "kv_memory_fraction is of free device memory: on CPU it would take "
             "that share of this shared machine's RAM", "args.engine.num_blocks")
    env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
    override(env, "GPTOSS_GRPC_HOST", "127.0.0.1", "the Router binds 0.0.0.0 unless the chart's serve.grpcHost says "
             "otherwise", "runtime_env.env_vars.GPTOSS_GRPC_HOST")
    override(env, "PROMETHEUS_MULTIPROC_DIR", str(metrics_dir), "the pod's emptyDir; here a folder of this test only",
             "runtime_env.env_vars.PROMETHEUS_MULTIPROC_DIR")
    # GPU resources: the chart asks for none in the Serve config itself (build_app derives them from args.device,
    # overridden above); drop any that a future chart version adds, saying so.
    for deployment in app.get("deployments", []):
        options = deployment.get("ray_actor_options") or {}
        if options.get("num_gpus"):
            override(options, "num_gpus", 0, "no GPU here", f"deployments[{deployment['name']}].num_gpus")
        for i, bundle in enumerate(deployment.get("placement_group_bundles") or []):
            if bundle.pop("GPU", None):
                changes.append(f"deployments[{deployment['name']}].placement_group_bundles[{i}].GPU: dropped")
    # Size: both values files ask one replica (of 1 or 2 shards) behind one router, small enough to keep.
    assert args.get("num_replicas") == 1 and args["shards_per_replica"] <= 2 and args["router_replicas"] == 1
    return config, changes


def exporter_command(rayservice: dict[str, Any], *, port: int, metrics_dir: Path) -> list[str]:
    """The metrics-exporter sidecar of the chart's router pod, with this machine's port, folder and loopback host."""
    pods = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (router,) = [g for g in pods if g["groupName"] == "router"]
    (sidecar,) = [c for c in router["template"]["spec"]["containers"] if c["name"] == "metrics-exporter"]
    assert sidecar["command"][:1] == ["python"]
    args = [a for a in sidecar["args"] if not a.startswith(("--port=", "--dir="))]
    return [sys.executable, *sidecar["command"][1:], *args, f"--port={port}", f"--dir={metrics_dir}",
            "--host=127.0.0.1"]


def scrape(port: int) -> dict[str, Any]:
    """{family name: Metric} of one scrape of http://127.0.0.1:port/metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families: dict[str, Any], name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` (e.g. gptoss_requests_total) whose labels include `labels`."""
    return [(s.labels, s.value) for f in families.values() for s in f.samples
            if s.name == name and labels.items() <= s.labels.items()]


def total(families: dict[str, Any], name: str, **labels: str) -> float:
    return sum(v for _, v in samples(families, name, **labels))


# ================================================================================================ the deployment
@pytest.fixture(scope="module")
def ray_node() -> Iterator[dict[str, Any]]:
    """A Ray node on 127.0.0.1 with its dashboard, given what the chart's router pods give Ray: one `gptoss_router`
    resource (rayStartParams; the Router deployment asks for it) and GPTOSS_AUTH_TOKEN (the chart's Secret; Ray's
    workers inherit the node's environment). Shared by both values files, one application at a time."""
    import ray
    from ray import serve

    from gptoss_cluster.workers.engine.ray_executor import connect_ray

    helm = find_tool("helm")
    if not helm:
        pytest.skip("helm unavailable: scripts/fetch-tools.sh helm could not fetch it (needs PyPI and Linux x86-64)")
    dashboard_port, http_port = free_port(), free_port()
    saved_token = os.environ.get("GPTOSS_AUTH_TOKEN")
    os.environ["GPTOSS_AUTH_TOKEN"] = API_TOKEN
    if ray.is_initialized():  # another module's connection: this one needs its own node and dashboard
        ray.shutdown()
    try:
        connect_ray(None, num_cpus=4, resources={"gptoss_router": 1}, include_dashboard=True,
                    dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
        dashboard = DashboardClient(f"http://127.0.0.1:{dashboard_port}")
        _wait(lambda: dashboard.details() is not None, 120, "the dashboard's Serve API")
        # Serve keeps the HTTP options of its first config: one port for both applications
        yield {"helm": helm, "dashboard": dashboard, "http_port": http_port}
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if saved_token is None:
            os.environ.pop("GPTOSS_AUTH_TOKEN", None)
        else:
            os.environ["GPTOSS_AUTH_TOKEN"] = saved_token


@pytest.fixture(scope="module", params=VALUES_FILES)
def deployed(request: pytest.FixtureRequest, ray_node: dict[str, Any], checkpoints: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The chart's application for one values file, deployed through the dashboard and serving; the chart's metrics
    exporter sidecar runs beside it. Removed again (a PUT without it) at the end."""
    rayservice = render_chart(ray_node["helm"], request.param)
    chart_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    metrics_dir = tmp_path_factory.mktemp("metrics")
    grpc_port, metrics_port, api_http_port = free_port(), free_port(), free_port()
    config, changes = adapt_for_this_machine(chart_config, model=checkpoints["tiny-hf"], grpc_port=grpc_port,
                                             http_port=ray_node["http_port"], metrics_dir=metrics_dir,
                                             api_http_port=api_http_port)
    (app,) = config["applications"]
    print(f"serveConfigV2 of {request.param}, adapted:\n  " + "\n  ".join(changes))
    dashboard, address = ray_node["dashboard"], f"127.0.0.1:{grpc_port}"
    log = open(metrics_dir.parent / f"{metrics_dir.name}-exporter.log", "w")  # closed in the finally below
    exporter = subprocess.Popen(exporter_command(rayservice, port=metrics_port, metrics_dir=metrics_dir), cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        start = time.monotonic()
        dashboard.put(config)  # what KubeRay does with spec.serveConfigV2
        with Client(address, token=API_TOKEN, timeout=60) as client:
            def serving() -> bool:
                status = (dashboard.details().get("applications") or {}).get(app["name"], {}).get("status")
                assert status not in ("DEPLOY_FAILED", "UNHEALTHY"), dashboard.details()["applications"]
                try:
                    return client.health(INFERENCE_SERVICE, timeout=2) == "SERVING"
                except grpc.RpcError:
                    return False

            _wait(serving, READY_TIMEOUT_S, "the chart's application to serve", interval=1.0)
            print(f"deployed and serving in {time.monotonic() - start:.1f} s")
            _wait(lambda: scrape(metrics_port) is not None, 30, "the metrics exporter")
            # ledger: every request the tests send, as the client saw it (the scrape test checks the metrics on it)
            yield {"client": client, "address": address, "dashboard": dashboard, "app": app, "config": config,
                   "chart_config": chart_config, "metrics_port": metrics_port, "ledger": []}
    finally:
        try:
            current = dashboard.declarative_config()
            current["applications"] = [a for a in current["applications"] if a.get("name") != app["name"]]
            dashboard.put(current)
            _wait(lambda: app["name"] not in (dashboard.details().get("applications") or {}), 60,
                  "the application to be deleted")
        except (DashboardError, AssertionError) as exc:
            print(f"teardown: {exc}")
        exporter.terminate()
        try:
            exporter.wait(10)
        except subprocess.TimeoutExpired:
            exporter.kill()
            exporter.wait(10)
        log.close()


def _chat(deployed: dict[str, Any], messages: list[dict[str, str]], **options: Any) -> list[pb.ChatResponse]:
    """One streamed Chat; the ledger gets what the client received."""
    out = list(deployed["client"].chat(messages, **options))
    deployed["ledger"].append({"method": "Chat", "code": "OK", "tokens": sum(len(r.token_ids) for r in out),
                               "prompt_tokens": out[-1].usage.prompt_tokens,
                               "first_tokens": next((len(r.token_ids) for r in out if r.token_ids), 0)})
    return out


def _generate(deployed: dict[str, Any], prompt: list[int], max_tokens: int) -> list[pb.GenerateResponse]:
    out = list(deployed["client"].generate(prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0))
    deployed["ledger"].append({"method": "Generate", "code": "OK", "tokens": sum(len(r.token_ids) for r in out),
                               "prompt_tokens": len(prompt),
                               "first_tokens": next((len(r.token_ids) for r in out if r.token_ids), 0)})
    return out


# ================================================================================================ tests
def test_the_charts_serve_config_deploys_and_answers_chat(deployed: dict[str, Any]) -> None:
    client, dashboard, app = deployed["client"], deployed["dashboard"], deployed["app"]
    details = dashboard.details()
    status = details["applications"][app["name"]]
    assert status["status"] == "RUNNING", status
    applied = status["deployed_app_config"]
    assert (applied["import_path"], applied["args"]) == (app["import_path"], app["args"])
    assert {d["name"]: d["status"] for d in status["deployments"].values()} == \
        {"Router": "HEALTHY", "ModelReplica": "HEALTHY"}
    # what the chart left alone is what runs: the Router pinned by the router pods' custom resource, its name
    chart_args = deployed["chart_config"]["applications"][0]["args"]
    router = next(d for d in applied["deployments"] if d["name"] == "Router")
    assert router["ray_actor_options"]["resources"] == {"gptoss_router": 1}
    # build_app's placement: one shard = one bundle for the replica (the model runs inside it); G shards = the
    # replica's bundle + one per ShardWorker; CPU only here (README "What else the chart relies on")
    import ray

    shards = chart_args["shards_per_replica"]
    (group,) = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    bundles = [group["bundles"][i] for i in sorted(group["bundles"])]
    assert bundles == placement(parse_args(applied["args"]), "cpu")[0] and group["strategy"] == "STRICT_PACK"
    assert len(bundles) == (1 if shards == 1 else shards + 1) and not any("GPU" in b for b in bundles), bundles

    assert client.health("") == "SERVING" and client.health(INFERENCE_SERVICE) == "SERVING"
    out = _chat(deployed, [{"role": "user", "content": "What is 2+2?"}], max_tokens=8, temperature=0)
    assert out[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert 0 < out[-1].usage.completion_tokens == sum(len(r.token_ids) for r in out) <= 8
    info = client.model_info()
    assert (info.model, info.shards_per_replica, info.num_replicas) == \
        (chart_args["served_model_name"], chart_args["shards_per_replica"], 1)
    # the chart turns auth on: without the token the API refuses, health stays open
    with Client(deployed["address"], token="wrong-token", timeout=30) as other:
        with pytest.raises(grpc.RpcError) as refused:
            other.model_info()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert other.health(INFERENCE_SERVICE) == "SERVING"


def test_one_scrape_holds_every_metric_family_consistent_with_the_requests(deployed: dict[str, Any]) -> None:
    client, ledger = deployed["client"], deployed["ledger"]
    info = client.model_info()
    # Known traffic, one request at a time (so prefix-cache hits are certain): chats sharing the harmony system
    # prompt, generates sharing a 40-token prompt, and one request the router refuses.
    for question in ("What is 2+2?", "Name a color.", "What is 2+2?"):
        _chat(deployed, [{"role": "user", "content": question}], max_tokens=6, temperature=0)
    shared = [1000 + (i * 37) % 5000 for i in range(40)]
    for max_tokens in (5, 7):
        _generate(deployed, shared, max_tokens)
    with pytest.raises(grpc.RpcError) as refused:
        list(client.chat([], max_tokens=4))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    failed = {"method": "Chat", "code": "INVALID_ARGUMENT"}

    last_steps = [-1.0]

    def settled() -> bool:
        """The router recorded every request, and the replica reported an idle engine twice in a row (its stats
        reports come about every second)."""
        families = scrape(deployed["metrics_port"])
        steps = total(families, "gptoss_engine_steps_total")
        done = (total(families, "gptoss_requests_total") == len(ledger) + 1 and steps == last_steps[0]
                and total(families, "gptoss_running_requests") == total(families, "gptoss_waiting_requests") == 0)
        last_steps[0] = steps
        return done

    _wait(settled, 60, "the metrics to settle", interval=1.5)
    families = scrape(deployed["metrics_port"])  # THE scrape: everything below reads this one

    # ---- every family the issue asks for, with its type
    expected = {
        "gptoss_time_to_first_token_seconds": "histogram", "gptoss_inter_token_latency_seconds": "histogram",
        "gptoss_request_duration_seconds": "histogram", "gptoss_request_queue_time_seconds": "histogram",
        "gptoss_prompt_tokens": "counter", "gptoss_generation_tokens": "counter", "gptoss_requests": "counter",
        "gptoss_running_requests": "gauge", "gptoss_waiting_requests": "gauge", "gptoss_kv_cache_usage_ratio": "gauge",
        "gptoss_prefix_cache_query_tokens": "counter", "gptoss_prefix_cache_hit_tokens": "counter",
        "gptoss_preemptions": "counter", "gptoss_engine_batch_size_requests": "histogram",
        "gptoss_engine_step_duration_seconds": "histogram", "gptoss_engine_step_seconds": "counter",
        "gptoss_expert_routed_tokens": "counter", "gptoss_expert_load_imbalance_ratio": "gauge",
        "gptoss_replicas": "gauge",
    }
    missing = {n: t for n, t in expected.items() if n not in families or families[n].type != t}
    assert not missing, f"missing or mistyped families: {missing}; scrape has {sorted(families)}"
    assert all(families[n].samples for n in expected), [n for n in expected if not families[n].samples]

    # ---- per request (router): counts and token sums are what the client saw
    ok = [r for r in ledger if r["code"] == "OK"]
    for method in ("Chat", "Generate"):
        mine = [r for r in ok if r["method"] == method]
        labels = {"method": method, "protocol": "grpc"}
        assert total(families, "gptoss_requests_total", code="OK", **labels) == len(mine)
        assert total(families, "gptoss_time_to_first_token_seconds_count", **labels) == len(mine)
        assert total(families, "gptoss_request_queue_time_seconds_count", **labels) == len(mine)
        refused_here = 1 if method == failed["method"] else 0
        assert total(families, "gptoss_request_duration_seconds_count", **labels) == len(mine) + refused_here
        assert total(families, "gptoss_generation_tokens_total", **labels) == sum(r["tokens"] for r in mine)
        assert total(families, "gptoss_prompt_tokens_total", **labels) == sum(r["prompt_tokens"] for r in mine)
        # one inter-token gap per token after the first delivery (a delivery may carry several tokens)
        itl = total(families, "gptoss_inter_token_latency_seconds_count", **labels)
        assert 0 < itl <= sum(r["tokens"] - 1 for r in mine)
        if method == "Generate":
            assert itl == sum(r["tokens"] - r["first_tokens"] for r in mine)
        ttft = total(families, "gptoss_time_to_first_token_seconds_sum", **labels)
        assert 0 < ttft < total(families, "gptoss_request_duration_seconds_sum", **labels)
    assert total(families, "gptoss_requests_total", **failed) == 1
    codes = {(lab["method"], lab["code"]) for lab, v in samples(families, "gptoss_requests_total") if v}
    assert codes == {("Chat", "OK"), ("Generate", "OK"), ("Chat", "INVALID_ARGUMENT")}

    # ---- per replica: one replica label on every engine series; idle now; prefix cache used
    replica_families = ("gptoss_running_requests", "gptoss_waiting_requests", "gptoss_kv_cache_usage_ratio",
                        "gptoss_prefix_cache_query_tokens_total", "gptoss_prefix_cache_hit_tokens_total",
                        "gptoss_preemptions_total", "gptoss_engine_steps_total", "gptoss_engine_step_seconds_total",
                        "gptoss_engine_batch_size_requests_count", "gptoss_engine_step_duration_seconds_count")
    labels_seen = {n: {lab.get("replica") for lab, _ in samples(families, n)} for n in replica_families}
    (replica,) = labels_seen["gptoss_engine_steps_total"]
    assert replica and all(seen == {replica} for seen in labels_seen.values()), labels_seen
    assert [r.replica_id.rsplit("#", 1)[-1] for r in client.list_replicas()] == [replica]
    assert total(families, "gptoss_running_requests") == total(families, "gptoss_waiting_requests") == 0
    assert 0 <= total(families, "gptoss_kv_cache_usage_ratio") <= 1
    hits, queries = (total(families, f"gptoss_prefix_cache_{k}_tokens_total") for k in ("hit", "query"))
    assert 0 < hits <= queries
    assert total(families, "gptoss_preemptions_total") == 0  # the KV pool is ample for these requests
    steps = total(families, "gptoss_engine_steps_total")
    assert steps >= max(r["tokens"] for r in ok)  # a request gets one token per step
    assert 1 <= total(families, "gptoss_engine_batch_size_requests_count") <= steps
    assert total(families, "gptoss_engine_step_duration_seconds_sum") > 0
    assert total(families, "gptoss_engine_step_seconds_total") > 0

    # ---- MoE: every (layer, expert) series, labelled by replica and rank; per layer the expert counts add up to
    # the tokens the model computed x top-k. Computed tokens = prompt tokens computed (prefix hits excluded) + one
    # decode forward per generated token after a request's first (that one comes out of the prefill step).
    routed = samples(families, "gptoss_expert_routed_tokens_total")
    assert {tuple(sorted(lab)) for lab, _ in routed} == {("expert", "layer", "rank", "replica")}
    assert {(lab["layer"], lab["expert"]) for lab, _ in routed} == \
        {(str(la), str(e)) for la in range(info.num_layers) for e in range(info.num_experts)}
    per_rank = info.num_experts // info.shards_per_replica
    assert all(lab["rank"] == str(int(lab["expert"]) // per_rank) and lab["replica"] == replica for lab, _ in routed)
    forwarded = (total(families, "gptoss_engine_prefill_tokens_total")
                 + total(families, "gptoss_engine_decode_tokens_total") - len(ok))
    assert forwarded > 0
    for layer in range(info.num_layers):
        per_layer = sum(v for lab, v in routed if lab["layer"] == str(layer))
        assert per_layer == forwarded * info.experts_per_token, (layer, per_layer, forwarded)
    imbalance = samples(families, "gptoss_expert_load_imbalance_ratio", replica=replica)
    assert sorted(int(lab["layer"]) for lab, _ in imbalance) == list(range(info.num_layers))
    assert all(1.0 <= v <= info.num_experts for _, v in imbalance), imbalance

    # ---- the cluster: replicas by state
    states = {lab["state"]: v for lab, v in samples(families, "gptoss_replicas")}
    assert states["running"] == 1 and sum(states.values()) == 1, states
