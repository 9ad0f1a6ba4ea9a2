"""cluster/metrics.py: every metric recorded, scraped over HTTP and parsed back; multiprocess aggregation per node."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gptoss_cluster.cluster.metrics import (
    MULTIPROC_ENV,
    REPLICA_STATES,
    Metrics,
    render_node_metrics,
    start_metrics_server,
)

ROOT = Path(__file__).resolve().parents[1]

# What the issue asks for, by family name (counters without `_total`): the test fails if one goes missing.
REQUIRED = {
    "gptoss_time_to_first_token_seconds": "histogram",
    "gptoss_inter_token_latency_seconds": "histogram",
    "gptoss_request_duration_seconds": "histogram",
    "gptoss_request_queue_time_seconds": "histogram",
    "gptoss_prompt_tokens": "counter",
    "gptoss_generation_tokens": "counter",
    "gptoss_requests": "counter",
    "gptoss_running_requests": "gauge",
    "gptoss_waiting_requests": "gauge",
    "gptoss_kv_cache_usage_ratio": "gauge",
    "gptoss_prefix_cache_query_tokens": "counter",
    "gptoss_prefix_cache_hit_tokens": "counter",
    "gptoss_preemptions": "counter",
    "gptoss_engine_batch_size_requests": "histogram",
    "gptoss_engine_step_duration_seconds": "histogram",
    "gptoss_expert_routed_tokens": "counter",
    "gptoss_expert_load_imbalance_ratio": "gauge",
    "gptoss_replicas": "gauge",
}
UNITS = ("_seconds", "_tokens", "_ratio", "_requests")


def scrape(port: int) -> dict[str, dict]:
    """{family name: {'type': ..., 'samples': [(name, labels, value)]}} from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {f.name: {"type": f.type, "samples": [(s.name, s.labels, s.value) for s in f.samples]}
            for f in text_string_to_metric_families(text)}


def value(families: dict, sample: str, **labels: str) -> float:
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    family = next(f for name, f in families.items() if any(sample == name + s for s in suffixes))
    matches = [v for n, lab, v in family["samples"] if n == sample and all(lab.get(k) == x for k, x in labels.items())]
    assert matches, f"no sample {sample}{labels}"
    return sum(matches)


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> Metrics:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    return Metrics()


def record_synthetic(m: Metrics) -> dict:
    """A known workload: 5 requests, 2 replicas reporting twice, expert routing of 40 tokens × top-4."""
    requests = [  # method, code, ttft, e2e, queue, gaps, prompt, generated
        ("Chat", "OK", 0.12, 2.0, 0.01, [0.02] * 9, 100, 10),
        ("Chat", "OK", 0.35, 4.0, 0.20, [0.03] * 19, 300, 20),
        ("Generate", "OK", 0.05, 0.5, 0.00, [0.01] * 4, 20, 5),
        ("Generate", "RESOURCE_EXHAUSTED", None, 0.001, None, None, 0, 0),
        ("chat.completions", 200, 0.5, 1.0, 0.3, [0.05] * 2, 50, 3),
    ]
    for method, code, ttft, e2e, queue, gaps, prompt, gen in requests:
        m.observe_request(method=method, code=code, protocol="http" if isinstance(code, int) else "grpc",
                          ttft_s=ttft, e2e_s=e2e, queue_s=queue, inter_token_s=gaps, prompt_tokens=prompt,
                          generation_tokens=gen)
    layers, experts, top_k, tokens = 3, 8, 4, 40
    counts = [[0] * experts for _ in range(layers)]
    for layer in range(layers):
        for t in range(tokens):
            for k in range(top_k):  # skewed: expert 0 is hot in every layer
                counts[layer][0 if k == 0 else (t + k + layer) % (experts - 1) + 1] += 1
    for replica, scale in (("r0", 1), ("r1", 2)):
        base = {"num_running": 4 * scale, "num_waiting": scale, "kv_usage": 0.25 * scale, "num_steps": 10,
                "prefix_cache_queries": 1000, "prefix_cache_hits": 400, "num_preemptions": 1,
                "num_prefill_tokens": 600, "num_decode_tokens": 38, "last_step_time_s": 0.02, "last_step_tokens": 12,
                "time_schedule_s": 0.01, "time_execute_s": 0.15, "time_sample_s": 0.02, "time_output_s": 0.02,
                "expert_counts": [[c * scale for c in row] for row in counts],
                "lora_requests": {"sql": scale}, "lora_generation_tokens": {"sql": 7 * scale}, "lora_resident": 1}
        m.record_engine_stats(base, replica=replica, shards=2)
        later = dict(base, num_steps=25, prefix_cache_queries=1500, prefix_cache_hits=700, num_preemptions=3,
                     num_running=2 * scale, kv_usage=0.2 * scale,
                     expert_counts=[[2 * c * scale for c in row] for row in counts],  # cumulative: doubled
                     lora_requests={"sql": 2 * scale}, lora_generation_tokens={"sql": 14 * scale})
        m.record_engine_stats(later, replica=replica, shards=2)
    m.set_replica_states({"RUNNING": 2, "starting": 1}, target=3)
    m.set_router_queue(router="router-0", queued=7, capacity=64)
    return {"requests": requests, "counts": counts, "tokens": tokens, "top_k": top_k}


def test_every_metric_exposed_named_and_consistent(metrics: Metrics) -> None:
    data = record_synthetic(metrics)
    server = start_metrics_server(0, "127.0.0.1", metrics=metrics)
    try:
        families = scrape(server.port)
    finally:
        server.close()

    # Names: defined once, gptoss_ prefix, a unit in every non-count name, every required family present.
    for name, typ in REQUIRED.items():
        assert metrics.families.get(name) == typ, name
    for name, typ in metrics.families.items():
        assert name.startswith("gptoss_"), name
        assert typ == "counter" or name.endswith(UNITS) or name in ("gptoss_replicas", "gptoss_replicas_target",
                                                                    "gptoss_lora_resident_adapters")
        assert name in families and families[name]["type"] == typ, f"{name} not exposed as a {typ}"
        assert families[name]["samples"], f"{name} has no samples"
    exposed = {s for f in families.values() for s, _, _ in f["samples"]}
    assert metrics.sample_names() <= exposed

    # Per request: counts match what was observed.
    requests = data["requests"]
    with_ttft = [r for r in requests if r[2] is not None]
    assert value(families, "gptoss_time_to_first_token_seconds_count") == len(with_ttft)
    assert value(families, "gptoss_time_to_first_token_seconds_sum") == pytest.approx(sum(r[2] for r in with_ttft))
    assert value(families, "gptoss_time_to_first_token_seconds_bucket", le="0.1") == 1  # only the 0.05 s one
    assert value(families, "gptoss_time_to_first_token_seconds_bucket", le="+Inf") == len(with_ttft)
    assert value(families, "gptoss_inter_token_latency_seconds_count") == sum(len(r[5] or []) for r in requests)
    assert value(families, "gptoss_request_duration_seconds_count") == len(requests)
    assert value(families, "gptoss_request_queue_time_seconds_count") == len([r for r in requests if r[4] is not None])
    assert value(families, "gptoss_prompt_tokens_total") == sum(r[6] for r in requests)
    assert value(families, "gptoss_generation_tokens_total", method="Chat") == 30
    assert value(families, "gptoss_requests_total") == len(requests)
    assert value(families, "gptoss_requests_total", method="Generate", code="RESOURCE_EXHAUSTED",
                 protocol="grpc") == 1
    assert value(families, "gptoss_requests_total", code="200", protocol="http") == 1

    # Per replica: gauges hold the latest snapshot, counters the cumulative totals.
    assert value(families, "gptoss_running_requests", replica="r1") == 4
    assert value(families, "gptoss_waiting_requests", replica="r0") == 1
    assert value(families, "gptoss_kv_cache_usage_ratio", replica="r1") == pytest.approx(0.4)
    assert value(families, "gptoss_prefix_cache_query_tokens_total", replica="r0") == 1500
    assert value(families, "gptoss_prefix_cache_hit_tokens_total", replica="r0") == 700
    assert value(families, "gptoss_preemptions_total") == 6
    assert value(families, "gptoss_engine_steps_total", replica="r1") == 25
    assert value(families, "gptoss_engine_step_seconds_total", replica="r1") == pytest.approx(0.2)
    assert value(families, "gptoss_engine_batch_size_requests_count", replica="r0") == 2
    assert value(families, "gptoss_engine_step_duration_seconds_count") == 4

    # MoE: per layer, the experts' counts sum to routed tokens × top-k (× 2 for the cumulative second report).
    tokens, top_k, counts = data["tokens"], data["top_k"], data["counts"]
    for layer in range(len(counts)):
        assert value(families, "gptoss_expert_routed_tokens_total", replica="r0", layer=str(layer)) == \
            2 * tokens * top_k
    assert value(families, "gptoss_expert_routed_tokens_total", replica="r1", layer="0", expert="0") == 2 * 2 * tokens
    ranks = {lab["expert"]: lab["rank"] for _, lab, _ in families["gptoss_expert_routed_tokens"]["samples"]}
    assert ranks["3"] == "0" and ranks["4"] == "1"  # 8 experts over 2 shards
    mean = tokens * top_k / len(counts[0])
    assert value(families, "gptoss_expert_load_imbalance_ratio", replica="r0", layer="1") == \
        pytest.approx(max(counts[1]) / mean)

    # Cluster.
    assert value(families, "gptoss_replicas", state="running") == 2
    assert {lab["state"] for _, lab, _ in families["gptoss_replicas"]["samples"]} == set(REPLICA_STATES)
    assert value(families, "gptoss_replicas_target") == 3
    assert value(families, "gptoss_router_queued_requests", router="router-0") == 7


def test_request_timer_measures_on_its_clock(metrics: Metrics) -> None:
    now = [100.0]
    timer = metrics.request_timer("Generate", "grpc", clock=lambda: now[0])
    now[0] = 100.5
    timer.dispatched()
    now[0] = 101.0
    timer.tokens(1)  # first token: TTFT 1.0
    now[0] = 101.4
    timer.tokens(4)  # 4 tokens after 0.4 s: 4 gaps of 0.1
    now[0] = 102.0
    timer.finish("OK", prompt_tokens=7, engine_queue_s=0.25)
    timer.finish("OK")  # recorded once
    text = metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    get = lambda fam, name: sum(s.value for s in families[fam].samples if s.name == name)
    assert get("gptoss_time_to_first_token_seconds", "gptoss_time_to_first_token_seconds_sum") == pytest.approx(1.0)
    assert get("gptoss_inter_token_latency_seconds", "gptoss_inter_token_latency_seconds_count") == 4
    assert get("gptoss_inter_token_latency_seconds", "gptoss_inter_token_latency_seconds_sum") == pytest.approx(0.4)
    assert get("gptoss_request_queue_time_seconds", "gptoss_request_queue_time_seconds_sum") == pytest.approx(0.75)
    assert get("gptoss_request_duration_seconds", "gptoss_request_duration_seconds_sum") == pytest.approx(2.0)
    assert get("gptoss_generation_tokens", "gptoss_generation_tokens_total") == 5
    assert get("gptoss_requests", "gptoss_requests_total") == 1


def test_engine_stats_dataclass_and_restart(metrics: Metrics) -> None:
    torch = pytest.importorskip("torch")
    from gptoss_cluster.workers.engine.engine import EngineStats

    zero = {f.name: (None if f.name == "expert_counts" else 0) for f in dataclasses.fields(EngineStats)}
    first = EngineStats(**dict(zero, num_steps=5, num_preemptions=2, num_running=3, kv_usage=0.5,
                               expert_counts=torch.tensor([[3, 1], [2, 2]])))
    metrics.record_engine_stats(first, replica="a")
    # The engine restarted: its cumulative counters start over, and the new values count in full.
    second = EngineStats(**dict(zero, num_steps=2, num_preemptions=1, expert_counts=torch.tensor([[1, 0], [0, 1]])))
    metrics.record_engine_stats(second, replica="a")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    total = lambda fam, **lab: sum(s.value for s in families[fam].samples
                                   if s.name.endswith("_total") and all(s.labels[k] == v for k, v in lab.items()))
    assert total("gptoss_engine_steps") == 7
    assert total("gptoss_preemptions") == 3
    assert total("gptoss_expert_routed_tokens", layer="0") == 5
    assert total("gptoss_expert_routed_tokens", layer="1") == 5


def test_bad_input_is_refused(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="protocol"):
        metrics.observe_request(method="Chat", code="OK", protocol="websocket")
    with pytest.raises(ValueError, match="divisor"):
        metrics.record_expert_counts([[1, 2, 3]], replica="a", shards=2)
    with pytest.raises(ValueError, match="matrix"):
        metrics.record_expert_counts([[1, 2], [3]], replica="a")


RECORDER = textwrap.dedent("""
    import sys
    from gptoss_cluster.cluster.metrics import Metrics
    m = Metrics.for_process()
    role = sys.argv[1]
    if role == "router":
        for i in range(3):
            m.observe_request(method="Chat", code="OK", ttft_s=0.1 * (i + 1), e2e_s=1.0, queue_s=0.0,
                              inter_token_s=[0.01, 0.02], prompt_tokens=10, generation_tokens=3)
        m.set_router_queue(router="router-0", queued=2, capacity=8)
    else:
        m.observe_request(method="Chat", code="INTERNAL", ttft_s=0.5, e2e_s=0.6)
        m.record_engine_stats({"num_running": 5, "num_waiting": 0, "kv_usage": 0.75, "num_steps": 3,
                               "expert_counts": [[4, 0], [2, 2]]}, replica=role)
    print("recorded", flush=True)
    sys.stdin.read()  # stay alive until the parent closes our stdin
""")


def _spawn(role: str, directory: Path) -> subprocess.Popen:
    env = dict(os.environ, **{MULTIPROC_ENV: str(directory)})
    proc = subprocess.Popen([sys.executable, "-c", RECORDER, role], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "recorded"
    return proc


def test_multiprocess_processes_merge_into_one_node_scrape(tmp_path: Path) -> None:
    router, replica = _spawn("router", tmp_path), _spawn("replica-7", tmp_path)
    server = start_metrics_server(0, "127.0.0.1", multiproc_dir=str(tmp_path))
    try:
        families = scrape(server.port)
        # Counters and histograms add up across processes; gauges appear once per label set, without a pid label.
        assert value(families, "gptoss_requests_total") == 4
        assert value(families, "gptoss_requests_total", code="INTERNAL") == 1
        assert value(families, "gptoss_time_to_first_token_seconds_count") == 4
        assert value(families, "gptoss_time_to_first_token_seconds_sum") == pytest.approx(0.1 + 0.2 + 0.3 + 0.5)
        assert value(families, "gptoss_inter_token_latency_seconds_count") == 6
        assert value(families, "gptoss_prompt_tokens_total") == 30
        running = families["gptoss_running_requests"]["samples"]
        assert running == [("gptoss_running_requests", {"replica": "replica-7"}, 5.0)]
        assert value(families, "gptoss_router_queue_capacity_requests", router="router-0") == 8
        assert value(families, "gptoss_expert_routed_tokens_total", layer="1") == 4
        assert not any(name for name in families if not name.startswith("gptoss_"))

        # The replica process exits: its gauges go (the scrape reaps dead pids), its counters stay in the sums.
        replica.stdin.close()
        replica.wait(timeout=10)
        families = scrape(server.port)
        assert "replica-7" not in str(families.get("gptoss_running_requests", {}).get("samples"))
        assert value(families, "gptoss_requests_total") == 4
        assert value(families, "gptoss_router_queued_requests", router="router-0") == 2
    finally:
        server.close()
        for proc in (router, replica):
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait(timeout=10)
    text = render_node_metrics(str(tmp_path)).decode()  # the same view without HTTP
    assert 'gptoss_requests_total{code="OK",method="Chat",protocol="grpc"} 3.0' in text


def test_exporter_command_serves_the_directory(tmp_path: Path) -> None:
    _spawn("router", tmp_path).communicate("")  # leave counters behind
    env = dict(os.environ)
    env.pop(MULTIPROC_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "gptoss_cluster.cluster.metrics", "--port", "0",
                             "--host", "127.0.0.1", "--dir", str(tmp_path)],
                            cwd=ROOT, env=env, text=True, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        assert value(scrape(port), "gptoss_requests_total") == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_exporter_without_directory_exits_2() -> None:
    env = dict(os.environ)
    env.pop(MULTIPROC_ENV, None)
    result = subprocess.run([sys.executable, "-m", "gptoss_cluster.cluster.metrics"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "PROMETHEUS_MULTIPROC_DIR" in result.stderr


def test_multiprocess_env_set_too_late_is_refused(tmp_path: Path) -> None:
    code = (f"import os, prometheus_client; os.environ[{MULTIPROC_ENV!r}] = {str(tmp_path)!r}\n"
            "from gptoss_cluster.cluster.metrics import Metrics, MetricsConfigError\n"
            "try:\n    Metrics()\nexcept MetricsConfigError as e:\n    print(e)\n")
    env = dict(os.environ)
    env.pop(MULTIPROC_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert "runtime_env" in out.stdout, out.stdout + out.stderr


def test_request_series_match_plain_prometheus_calls(metrics: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    """observe_request / set_router_queue reuse ready labelled children (labels() once per label set) and record
    the inter-token gaps bucket by bucket: the exposition is what one labels() + observe/inc per value gives."""
    from prometheus_client import CollectorRegistry

    plain = Metrics(registry=CollectorRegistry())
    gaps = [0.0005, 0.001, 0.0011, 0.02, 0.02, 0.3, 2.6, 99.0, -0.5, float("nan"), float("inf")]
    requests = [("Generate", "OK", "grpc", gaps), ("Generate", "OK", "grpc", gaps[:3]),
                ("Chat", "CANCELLED", "grpc", []), ("chat.completions", 200, "http", None),
                ("Generate", "DEADLINE_EXCEEDED", "grpc", gaps[4:])]
    calls = []
    for family in (metrics.requests, metrics.inter_token_latency, metrics.time_to_first_token, metrics.router_queued):
        original = family.labels
        monkeypatch.setattr(family, "labels",
                            lambda *a, _o=original, _f=family._name, **k: calls.append((_f, a)) or _o(*a, **k))
    for i, (method, code, protocol, itl) in enumerate(requests):
        kw = dict(ttft_s=0.05 * i if i != 2 else None, e2e_s=0.5 + i, queue_s=0.01 * i, prompt_tokens=10 * i,
                  generation_tokens=i)
        metrics.observe_request(method=method, code=code, protocol=protocol, inter_token_s=itl, **kw)
        plain.requests.labels(method, str(getattr(code, "name", code)), protocol).inc()
        plain.request_queue_time.labels(method, protocol).observe(max(0.0, kw["queue_s"]))
        if kw["ttft_s"] is not None:
            plain.time_to_first_token.labels(method, protocol).observe(kw["ttft_s"])
        if itl is not None:
            child = plain.inter_token_latency.labels(method, protocol)
            for gap in itl:
                child.observe(max(0.0, gap))
        plain.request_duration.labels(method, protocol).observe(kw["e2e_s"])
        if kw["prompt_tokens"]:
            plain.prompt_tokens.labels(method, protocol).inc(kw["prompt_tokens"])
        if kw["generation_tokens"]:
            plain.generation_tokens.labels(method, protocol).inc(kw["generation_tokens"])
    for queued in (3, 0, 5):
        metrics.set_router_queue(router="router-0", queued=queued, capacity=64)
        plain.router_queued.labels("router-0").set(queued)
        plain.router_queue_capacity.labels("router-0").set(64)

    def samples(m: Metrics) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(m.render().decode()) if not f.name.endswith("_created")
                for s in f.samples if not s.name.endswith("_created")}

    got, want = samples(metrics), samples(plain)
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert got[key] == pytest.approx(v, nan_ok=True), key
    # one labels() per label set ever used: 4 (method, code, protocol), 2 ITL and 2 TTFT (method, protocol), 1 router
    assert len(calls) == len(set(calls)) == 4 + 2 + 2 + 1
