"""benchmarks/serving.py runs end to end on its local target (router, gRPC floor and direct paths over a scripted
replica), so that a measuring session spends its time on figures, not on the script's bugs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serving.py"


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_serving_benchmark_local_run_reports_every_path(tmp_path):
    out = tmp_path / "figures.json"
    pin = ["--client-cpus", str(min(os.sched_getaffinity(0)))] if len(os.sched_getaffinity(0)) > 1 else []
    result = _run("--engine", "scripted", "--step-ms", "2", "--concurrency", "2", "--rounds", "2",
                  "--num-requests", "4", "--output-len", "5", "--warmup", "1", "--stream-interval", "2",
                  *pin, "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    level = figures["levels"]["2"]
    for path in ("direct", "grpc floor", "router"):
        assert level[path]["requests"] == 8 and level[path]["errors"] == 0, (path, level[path])
        # exactly --output-len tokens per request on every path (5 tokens x 8 requests over the wall time)
        assert abs(level[path]["output_tok_per_s"] * level[path]["wall_s"] - 40) < 1e-6, (path, level[path])
        assert 0 < level[path]["ttft_ms"]["p50"] <= level[path]["e2e_ms"]["p50"]
    assert set(level["added_ms"]["ttft_ms"]) == {"p50", "p90", "p99"}
    if pin:
        assert f"client on CPUs [{pin[1]}]" in figures["target"]
    assert "| router added TTFT @ 2 |" in result.stdout


def test_serving_benchmark_refuses_client_cpus_that_leave_the_servers_none():
    every = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    result = _run("--engine", "scripted", "--client-cpus", every, timeout=60)
    assert result.returncode == 2 and "--client-cpus" in result.stderr


def test_serving_benchmark_with_tracing_exports_every_router_span(tmp_path):
    """--trace: the router process traces (its OTEL_* variables point at the benchmark's OTLP sink), and every call's
    four spans arrive (warm-up included; the scripted replica makes none)."""
    out = tmp_path / "figures.json"
    result = _run("--engine", "scripted", "--step-ms", "2", "--concurrency", "2", "--rounds", "1",
                  "--num-requests", "4", "--output-len", "5", "--warmup", "1", "--trace", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["levels"]["2"]["router"]["requests"] == 4 and "tracing on" in figures["target"]
    assert figures["spans_received"] == (1 + 4) * 4
