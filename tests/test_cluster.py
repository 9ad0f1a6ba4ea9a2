"""The whole cluster on a local Ray node pinned to 127.0.0.1: Router + ModelReplica deployments (tiny model, two
shards per replica through the RayExecutor), deployed and scaled through the Ray dashboard's Serve REST API with
Ray's auth token; and `gptoss-cluster serve` / `chat` as a user runs them.

One Ray node serves the whole module (started on first use, stopped at the end); the CLI test runs first and starts
(and stops) its own node, as `make serve` does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gptoss_cluster.cluster.app import AppConfig, DashboardClient, DashboardError, app_config, ray_auth_token, scale
from gptoss_cluster.cluster.client import AsyncClient, Client
from gptoss_cluster.cluster.router.grpc_service import INFERENCE_SERVICE
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from gptoss_cluster.workers.harmony import get_tokenizer
from tests.tools import free_port

SHARDS = 2
CLI = [sys.executable, "-m", "gptoss_cluster.cluster.cli"]


def _wait(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (grpc.RpcError, DashboardError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# ================================================================================================ app config, CLI args
def test_build_app_arguments_follow_the_chart_schema(tmp_path):
    import json

    import jsonschema
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from gptoss_cluster.cluster.app import AppConfigError, parse_args, placement, serve_config, to_yaml

    schema = json.loads((Path(__file__).parents[1] / "helm/gptoss-cluster/files/serve-args.schema.json").read_text())
    config = parse_args({"model": "/models/gpt-oss-20b", "shards_per_replica": 2, "device": "cuda",
                         "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
                         "engine": {"max_num_seqs": 128}, "sampling_defaults": {"max_tokens": 4096}})
    assert config.name == "gpt-oss-20b"
    jsonschema.validate(config.chart_args(), schema)
    bundles, actor = placement(config, "cuda")
    assert bundles == [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}] and actor["num_gpus"] == 0
    bundles, actor = placement(parse_args({"model": "/m"}), "cpu")
    assert bundles == [{"CPU": 0.75}] and actor == {"num_cpus": 0.75, "num_gpus": 0.0}
    rendered = yaml.safe_load(to_yaml(serve_config([app_config(config)])))
    ServeDeploySchema.model_validate(rendered)
    app = rendered["applications"][0]
    assert app["import_path"] == "gptoss_cluster.cluster.app:build_app"
    assert [d["name"] for d in app["deployments"]] == ["Router", "ModelReplica"]
    assert app["deployments"][1]["placement_group_strategy"] == "STRICT_PACK"
    jsonschema.validate(app["args"], schema)
    for args, message in [
        ({"model": "/m", "replicas": 2}, "unknown argument(s) 'replicas'"),
        ({}, "'model' is required"),
        ({"model": "/m", "num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}, "not both"),
        ({"model": "/m", "shards_per_replica": 3}, "shards_per_replica: must be one of"),
        ({"model": "/m", "engine": {"block_sise": 16}}, "engine.block_sise: unknown key"),
        ({"model": "/m", "engine": {"max_num_seqs": 0}}, "engine: max_num_seqs must be a positive integer"),
        ({"model": "/m", "sampling_defaults": {"top_p": 2}}, "sampling_defaults: top_p"),
        ({"model": "/m", "autoscaling_config": {"min_replicas": 5, "max_replicas": 2}}, "min_replicas"),
        ({"model": "/m", "grpc_port": 70000}, "grpc_port"),
        ({"model": "/m", "default_reasoning_effort": "max"}, "default_reasoning_effort"),
        ({"model": "/m", "stream_interval": 0}, "stream_interval: must be an integer >= 1"),
        ({"model": "/m", "replica_transport": "zmq"}, "replica_transport: must be one of ('grpc', 'ray')"),
        ({"model": "/m", "routing_policy": "random"},
         "routing_policy: must be one of ('prefix_affinity', 'power_of_two', 'round_robin')"),
        ({"model": "/m", "dtype": "float16"}, "dtype: must be one of ('bfloat16', 'float32')"),
    ]:
        with pytest.raises(AppConfigError) as info:
            parse_args(args)
        assert message in str(info.value), (args, str(info.value))


def test_build_application_deployment_options():
    """Both deployments run their code on the replica's main loop (the Router also Serve's request router); neither
    writes Serve's per-call access log; the app's Serve config entry carries the same actor options (a config's
    options replace the code's)."""
    from gptoss_cluster.cluster.app import (
        REPLICA_SERVE_ENV,
        ROUTER_SERVE_ENV,
        app_config,
        build_application,
        parse_args,
    )

    config = parse_args({"model": "/m", "device": "cpu"})
    router = build_application(config)._bound_deployment  # Serve's Application has no public accessor
    replica = router.init_args[0]._bound_deployment
    assert (router.name, replica.name) == ("Router", "ModelReplica")
    assert router.ray_actor_options["runtime_env"] == {"env_vars": ROUTER_SERVE_ENV}
    assert replica.ray_actor_options["runtime_env"] == {"env_vars": REPLICA_SERVE_ENV}
    assert REPLICA_SERVE_ENV.items() <= ROUTER_SERVE_ENV.items()
    # Serve's gRPC transport takes what the router takes from its clients (its 4 MiB default would not)
    assert int(REPLICA_SERVE_ENV["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) > 2 * config.max_message_bytes
    assert router.logging_config["enable_access_log"] is False and replica.logging_config["enable_access_log"] is False
    entry = {d["name"]: d for d in app_config(config)["deployments"]}
    assert entry["Router"]["ray_actor_options"] == router.ray_actor_options
    assert entry["ModelReplica"]["ray_actor_options"] == replica.ray_actor_options
    # the ModelReplica's Serve request router runs the routing policy named in the arguments
    from gptoss_cluster.cluster.router.serve_routing import PolicyRequestRouter

    for name in ("prefix_affinity", "round_robin"):
        bound = build_application(parse_args({"model": "/m", "device": "cpu", "routing_policy": name}))
        options = bound._bound_deployment.init_args[0]._bound_deployment._deployment_config.request_router_config
        assert options.get_request_router_class() is PolicyRequestRouter
        assert options.request_router_kwargs == {"policy": name}


def test_cli_bad_arguments_exit_2_with_one_line(capsys):
    from gptoss_cluster.cluster.cli import main

    for argv in (["chat", "--address", "nowhere", "hi"], ["chat", "hi"], ["serve", "--replicas", "0"],
                 ["serve", "--model", "/no/such/dir"], ["serve", "--grpc-port", "99999"],
                 ["scale", "--replicas", "-1"], ["serve", "--stream-interval", "0"],
                 ["serve", "--replica-transport", "zmq"], ["serve", "--routing-policy", "random"],
                 ["bench", "--concurrency", "1"], ["bench", "--address", "h:1", "--concurrency", "0,4"],
                 ["bench", "--address", "h:1", "--request-rate", "-1"], ["generate", "--prompt", "x"],
                 ["generate", "--address", "127.0.0.1:1"], ["generate", "--address", "h:1", "--token-ids", "1,x"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gptoss-cluster: error:") and err.count("\n") == 1, (argv, err)
    assert main(["scale", "--replicas", "2", "--dashboard", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err


# ================================================================================================ the CLI
def test_cli_serve_then_chat_then_ctrl_c(tmp_path):
    """`make serve` runs `gptoss-cluster serve`: it brings a cluster up on loopback, `chat` gets an answer, and
    Ctrl-C (SIGINT) shuts everything down with exit code 0."""
    grpc_port, metrics_port, dashboard_port = free_port(), free_port(), free_port()
    env = dict(os.environ, GPTOSS_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("GPTOSS_AUTH_TOKEN", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        CLI + ["serve", "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(free_port()),
               "--metrics-port", str(metrics_port),
               "--dashboard-port", str(dashboard_port), "--num-blocks", "256", "--max-model-len", "1024"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{grpc_port}"
    try:
        with Client(address) as client:
            def serving():
                assert proc.poll() is None, f"serve exited early:\n{Path(log.name).read_text()[-3000:]}"
                try:
                    return client.health(INFERENCE_SERVICE, timeout=2) == "SERVING"
                except grpc.RpcError:
                    return False

            _wait(serving, 300, "gptoss-cluster serve to report SERVING", interval=0.5)
        # The banner is what a user waits for; the CLI prints it once its own readiness check has passed.
        _wait(lambda: f"chat --address {address}" in Path(log.name).read_text(), 120, "the serve banner",
              interval=0.5)
        assert (tmp_path / "cache" / "models" / "tiny" / "config.json").exists()
        chat = subprocess.run(CLI + ["chat", "--address", address, "Hello!", "--max-tokens", "8"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert "8 completion tokens" in chat.stderr or "[stop" in chat.stderr, chat.stderr
        import urllib.request

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'gptoss_requests_total{code="OK",method="Chat",protocol="grpc"}' in metrics
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=150) == 0, Path(log.name).read_text()[-3000:]
        output = Path(log.name).read_text()
        assert "stopping" in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


# ================================================================================================ a Ray cluster
@pytest.fixture(scope="module")
def cluster(checkpoints):
    import ray
    from ray import serve

    from gptoss_cluster.workers.engine.ray_executor import connect_ray

    dashboard_port, grpc_port = free_port(), free_port()
    os.environ["GPTOSS_NO_PROGRESS"] = "1"
    if ray.is_initialized():  # a previous module left its connection: this module needs its own node + dashboard
        ray.shutdown()
    connect_ray(None, num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    config = AppConfig(model=str(checkpoints["tiny-hf"]), served_model_name="tiny", dtype="float32", device="cpu",
                       num_replicas=1, shards_per_replica=SHARDS, max_ongoing_requests=128, grpc_port=grpc_port,
                       http_port=free_port(),
                       grpc_host="127.0.0.1", metrics_port=0, routing_stats_period_s=0.5, health_interval_s=0.2,
                       graceful_shutdown_timeout_s=30,
                       engine={"num_blocks": 512, "max_model_len": 1024, "max_num_seqs": 64})
    client = DashboardClient(dashboard)
    try:
        _wait(lambda: client.details() is not None, 120, "the dashboard's Serve API")
        client.deploy_app(app_config(config, env_vars={"GPTOSS_NO_PROGRESS": "1"}))
        address = f"127.0.0.1:{grpc_port}"
        with Client(address, timeout=60) as grpc_client:
            _wait(lambda: grpc_client.health(INFERENCE_SERVICE) == "SERVING", 240, "the first replica")
            yield {"dashboard": dashboard, "client": grpc_client, "address": address, "dashboard_client": client}
    finally:
        try:
            client.delete_app("gptoss")
        except DashboardError:
            pass
        serve.shutdown()
        ray.shutdown()


def _running(client: Client, n: int) -> list[pb.ReplicaInfo]:
    replicas = client.list_replicas()
    return replicas if len(replicas) == n and all(r.state == "RUNNING" for r in replicas) else []


def _serves(client: Client) -> bool:
    """The router answers a generation: it has seen a replica ready (its poll of the replicas can trail the replica
    list by an interval) and the request went through."""
    try:
        return sum(len(r.token_ids) for r in client.generate([1, 2, 3], max_tokens=1, timeout_seconds=30)) == 1
    except grpc.RpcError:
        return False


def _generate_many(address: str, prompts: list[list[int]], max_tokens: int, timeout: float = 120.0) -> list:
    async def one(client, prompt):
        ids, last = [], None
        async for r in client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0):
            ids.extend(r.token_ids)
            last = r
        return ids, last

    async def main():
        async with AsyncClient(address, timeout=timeout) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts), return_exceptions=True)

    return asyncio.run(main())


def test_dashboard_api_needs_rays_token(cluster):
    assert ray_auth_token()
    with pytest.raises(DashboardError) as info:
        DashboardClient(cluster["dashboard"], token="not-the-token").details()
    assert "HTTP 40" in str(info.value)
    details = cluster["dashboard_client"].details()
    deployed = details["applications"]["gptoss"]["deployed_app_config"]
    assert deployed["import_path"] == "gptoss_cluster.cluster.app:build_app"


def test_scale_up_through_the_dashboard_and_both_replicas_serve(cluster):
    client = cluster["client"]
    assert len(_running(client, 1)) == 1
    entry = scale(2, address=cluster["dashboard"], wait_s=240)
    assert entry["num_replicas"] == 2
    _wait(lambda: _running(client, 2), 60, "the router to see two replicas")
    before = {r.replica_id: r.requests_total for r in client.list_replicas()}
    results = _generate_many(cluster["address"], [[100 + i, 7, 8, 9 + i] for i in range(24)], max_tokens=4)
    assert all(not isinstance(r, BaseException) and len(r[0]) == 4 for r in results), results
    after = {r.replica_id: r.requests_total for r in client.list_replicas()}
    assert set(after) == set(before)
    assert all(after[k] > before[k] for k in after), (before, after)


def test_generate_and_chat_end_to_end(cluster):
    client = cluster["client"]
    out = list(client.generate([200006, 1428, 200008, 13225], max_tokens=9, ignore_eos=True))
    ids = [t for r in out for t in r.token_ids]
    assert len(ids) == 9 and out[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert "".join(r.text for r in out) == get_tokenizer().decode(ids)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = list(client.chat(messages, max_tokens=10, temperature=0, tools=[
        {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}]))
    assert out[-1].usage.prompt_tokens == len(client.tokenize(messages=messages, tools=[
        {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}]))
    assert out[-1].usage.completion_tokens == sum(len(r.token_ids) for r in out) <= 10
    info = client.model_info()
    assert (info.model, info.shards_per_replica, info.num_replicas) == ("tiny", SHARDS, 2)
    assert all(r.num_shards == SHARDS for r in client.list_replicas())


def _all_free(client: Client):
    replicas = client.list_replicas()
    return replicas if all(r.running_requests == 0 and r.kv_blocks_free == r.kv_blocks_total
                           for r in replicas) else []


def test_cancel_and_deadline_free_kv_blocks_on_the_replica(cluster):
    client = cluster["client"]
    _wait(lambda: _all_free(client), 30, "idle replicas")
    stream = client.generate([3] * 50, max_tokens=800, ignore_eos=True)
    got = 0
    for r in stream:
        got += len(r.token_ids)
        if got >= 2:
            break
    busy = client.list_replicas()
    assert any(r.kv_blocks_free < r.kv_blocks_total for r in busy)
    stream.cancel()
    _wait(lambda: _all_free(client), 30, "the cancelled request's KV blocks to be freed")
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate([4] * 50, max_tokens=800, ignore_eos=True, timeout_seconds=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait(lambda: _all_free(client), 30, "the expired request's KV blocks to be freed")


def test_200_concurrent_streams_no_errors_no_lost_or_duplicated_tokens(cluster):
    prompts = [[1000 + (i % 17), 5, 6 + (i % 5)] for i in range(200)]
    start = time.monotonic()
    results = _generate_many(cluster["address"], prompts, max_tokens=4, timeout=180)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    tok = get_tokenizer()
    for ids, last in results:
        assert len(ids) == 4
        assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 4
    assert len({tuple(ids) for ids, _ in results}) >= 1
    assert all(tok.decode(ids) is not None for ids, _ in results)
    print(f"200 streams x 4 tokens in {time.monotonic() - start:.1f} s")


def _shard_workers(dashboard: str) -> list:
    """This cluster's live ShardWorker actors (asked of this cluster's dashboard by address: other Ray instances may
    run on the same machine, and their processes are not ours to touch)."""
    import ray
    from ray.util.state import list_actors

    node = ray.get_runtime_context().get_node_id()
    actors = list_actors(address=dashboard, filters=[("class_name", "=", "ShardWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    assert all(a.node_id == node for a in actors), "actors of another Ray cluster"
    return actors


def _start_streams(open_stream: Callable[[int], Iterable[Any]], count: int = 8) -> tuple[list[threading.Thread], list]:
    """`count` threads, thread i reading stream `open_stream(i)` to the end; each appends its outcome to the returned
    list: ("OK", tokens streamed) or (gRPC status name, details)."""
    outcomes: list = []

    def consume(i: int) -> None:
        try:
            outcomes.append(("OK", sum(len(r.token_ids) for r in open_stream(i))))
        except grpc.RpcError as exc:
            outcomes.append((exc.code().name, exc.details()))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return threads, outcomes


def test_killing_a_shard_worker_fails_its_requests_and_serve_replaces_the_replica(cluster):
    client = cluster["client"]
    if len(client.list_replicas()) != 2:  # run on its own (-k): the scale-up test has not run
        scale(2, address=cluster["dashboard"], wait_s=240)
    _wait(lambda: _running(client, 2), 240, "two replicas")
    old_ids = {r.replica_id for r in client.list_replicas()}
    workers = _shard_workers(cluster["dashboard"])
    assert len(workers) == 2 * SHARDS
    threads, outcomes = _start_streams(lambda i: client.inference.Generate(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[50 + i, 9, 9]),
                           sampling=pb.SamplingParams(max_tokens=1000, ignore_eos=True)), timeout=150))
    _wait(lambda: sum(r.running_requests for r in client.list_replicas()) >= 6, 60, "all streams running")
    # Every replica loses a shard (which worker serves which replica is not visible from here, and the streams may
    # all sit on one replica): each running stream must fail cleanly, never hang
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    for t in threads:
        t.join(160)
    assert not any(t.is_alive() for t in threads), "a request hung"
    codes = [c for c, _ in outcomes]
    assert set(codes) <= {"OK", "UNAVAILABLE"} and "UNAVAILABLE" in codes, outcomes
    assert all(n == 1000 for c, n in outcomes if c == "OK")
    # Serve notices the failed health checks and replaces the replicas; the cluster serves again
    _wait(lambda: (lambda rs: len(rs) == 2 and not set(r.replica_id for r in rs) & old_ids and rs)(
        _running(client, 2)), 300, "Serve to replace the broken replicas", interval=1.0)
    _wait(lambda: _serves(client), 60, "the router to serve again")
    results = _generate_many(cluster["address"], [[7, 8, i] for i in range(8)], max_tokens=3)
    assert all(not isinstance(r, BaseException) and len(r[0]) == 3 for r in results), results


def test_scale_down_finishes_in_flight_requests(cluster):
    client = cluster["client"]
    _wait(lambda: _running(client, 2) and _serves(client), 240, "two replicas, and the router serving")
    # long enough that every replica is still busy when the scale-down lands, even on an idle machine
    threads, outcomes = _start_streams(lambda i: client.generate([300 + i, 1, 2], max_tokens=200, ignore_eos=True))
    _wait(lambda: all(r.running_requests > 0 for r in client.list_replicas()), 60, "both replicas busy",
          interval=0.05)
    scale(1, address=cluster["dashboard"])
    for t in threads:
        t.join(180)
    assert outcomes == [("OK", 200)] * 8, outcomes
    _wait(lambda: _running(client, 1), 120, "one replica left")
    states = cluster["dashboard_client"].replica_states()
    assert states.get("RUNNING") == 1
