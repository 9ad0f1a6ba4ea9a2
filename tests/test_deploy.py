"""deploy/: the container images' recipes and build context, the Prometheus alert rules (promtool check + unit tests)
and the Grafana dashboard (every query parses, and asks only for metrics cluster/metrics.py exposes, with their
labels). promtool comes from scripts/fetch-tools.sh (Debian's prometheus package); without it those tests skip."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from gptoss_cluster.cluster.metrics import Metrics
from tests.tools import find_tool

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "gptoss-cluster.json"
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
# Labels Prometheus adds at scrape time (target labels, the operator's relabelings, ours: component).
TARGET_LABELS = {"namespace", "pod", "container", "service", "endpoint", "instance", "job", "component"}


# ================================================================================================== Dockerfiles
def instructions(path: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and continuation lines joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, '/'-separated) out of the build context (Docker's rules: a
    pattern matches the path or a parent directory, `**` any depth, later `!` lines re-include)."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_with_the_install_script(name: str) -> None:
    steps = instructions(DEPLOY / name)
    bases = [args for op, args in steps if op == "FROM"]
    assert len(bases) == 1
    if name == "Dockerfile":
        assert re.search(r"(nvidia/cuda|rayproject/ray:.*(gpu|cu\d+))", bases[0]), bases[0]
    else:
        assert re.search(r"(python:3\.11|rayproject/ray:.*cpu)", bases[0]), bases[0]
    runs = [args for op, args in steps if op == "RUN"]
    assert any("scripts/install.sh" in r for r in runs), "the image must install through scripts/install.sh"
    for run in runs:  # no second way of installing the project
        assert not re.search(r"pip3? install|python3? -m pip install|uv pip|conda install", run), run
        assert not re.search(r"huggingface-cli|hf download|wget .*safetensors|curl .*safetensors", run), \
            "weights are mounted, never baked into the image"
    copies = [args for op, args in steps if op in ("COPY", "ADD")]
    sources = [src for c in copies for src in [w for w in c.split() if not w.startswith("--")][:-1]]
    assert "scripts/install.sh" in sources and "pyproject.toml" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignore_excludes(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
        assert not re.search(r"checkpoint|\.safetensors|models?/", source), f"COPY {source}: weights stay out"
    assert any(op == "VOLUME" and "/models" in args for op, args in steps)
    exposed = " ".join(args for op, args in steps if op == "EXPOSE").split()
    assert {"50051", "9400", "8265"} <= set(exposed)


def test_dockerignore_keeps_local_and_heavy_files_out() -> None:
    for path in (".venv", ".venv/bin/python", "checkpoints", "checkpoints/tiny/model.safetensors", ".cache",
                 ".cache/tools/helm", ".git", ".git/HEAD", "workers/__pycache__/model.cpython-311.pyc",
                 "some/dir/weights.safetensors"):
        assert dockerignore_excludes(path), path
    for path in ("pyproject.toml", "scripts/install.sh", "cluster/metrics.py", "workers/model.py", "README.md"):
        assert not dockerignore_excludes(path), path


def test_install_script_is_the_one_ci_uses() -> None:
    assert "scripts/install.sh" in (ROOT / "Makefile").read_text()


# ================================================================================================== promtool
@pytest.fixture(scope="module")
def promtool() -> str:
    path = find_tool("promtool")
    if not path:
        pytest.skip("promtool unavailable: scripts/fetch-tools.sh promtool could not fetch it (needs apt-get and "
                    "dpkg with Debian's package lists)")
    return path


def run_promtool(promtool: str, *args: str, stdin: str | None = None, cwd: Path = ROOT) -> str:
    result = subprocess.run([promtool, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_rules_pass_promtool_check(promtool: str) -> None:
    assert "SUCCESS" in run_promtool(promtool, "check", "rules", str(RULES))


def test_rules_fire_as_their_unit_tests_expect(promtool: str) -> None:
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", "rules_test.yaml", cwd=RULES.parent)


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((RULES.parent / "rules_test.yaml").read_text())["tests"]
    fired = {t["alertname"] for test in tests for t in test.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == fired, f"alerts without a firing test: {sorted(alerts - fired)}"
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# ================================================================================================== dashboard
def dashboard_queries() -> list[tuple[str, str]]:
    """[(where, PromQL)] of every panel target and template variable."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['id']} '{panel['title']}' {target['refId']}", target["expr"]))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert match, var["query"]
            out.append((f"variable {var['name']}", match.group(1)))
    return out


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with what they expand to (intervals, and 'All' = .* in label matchers)."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?|\[\[\w+\]\]", ".*", expr)


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """[(metric name, label names in its matcher)] of every selector in a PromQL expression (ours all start with
    gptoss_, so function names and keywords cannot be mistaken for metrics)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    out = []
    for match in re.finditer(r"\b(gptoss_\w+|up)\b\s*(\{[^}]*\})?", expr):
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", match.group(2) or ""))
        out.append((match.group(1), labels))
    return out


@functools.cache
def exposition() -> dict[str, set[str]]:
    """{sample name: label names} of every sample cluster/metrics.py can expose (from the definitions)."""
    metrics = Metrics()
    out = {}
    for family in metrics.registry.collect():
        labelnames = set(getattr(metrics, _attr_of(metrics, family.name))._labelnames)
        for name in metrics.sample_names():
            if name == family.name or name.removeprefix(family.name) in ("_total", "_bucket", "_sum", "_count"):
                out[name] = labelnames | ({"le"} if name.endswith("_bucket") else set())
    return out


def _attr_of(metrics: Metrics, family: str) -> str:
    for attr, value in vars(metrics).items():
        if getattr(value, "_name", None) == family:
            return attr
    raise KeyError(family)


def test_dashboard_is_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "gptoss-cluster" and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "replica"} <= variables
    for where, expr in dashboard_queries():
        used = set(re.findall(r"\$\{?(\w+)\}?", expr)) - {"__rate_interval", "__interval", "__range"}
        assert used <= variables, f"{where}: undefined variables {used - variables}"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["gridPos"]["w"] <= 24 and panel["targets"], panel["title"]
    kinds = {p["type"] for p in board["panels"]}
    assert {"timeseries", "heatmap", "stat"} <= kinds
    exprs = " ".join(e for _, e in dashboard_queries())
    for needle in ("histogram_quantile", "gptoss_expert_routed_tokens_total", "gptoss_kv_cache_usage_ratio",
                   "gptoss_replicas", "gptoss_router_queued_requests", "gptoss_waiting_requests"):
        assert needle in exprs, needle


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """promtool has no 'parse this expression' command; each query becomes a recording rule, and `check rules`
    parses it with Prometheus' own parser."""
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)} for i, (_, expr) in enumerate(queries)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    out = run_promtool(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {len(queries)} rules found" in out, out


def test_an_invalid_query_is_caught(promtool: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (le (rate(gptoss_requests_total[5m]))"}]}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_queries_ask_only_for_exposed_metrics_and_labels(source: str) -> None:
    if source == "dashboard":
        queries = dashboard_queries()
    else:
        queries = [(r["alert"], r["expr"]) for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    exposed = exposition()
    used: set[str] = set()
    for where, expr in queries:
        for metric, labels in selectors(grafana_to_promql(expr)):
            if metric == "up":
                continue
            assert metric in exposed, f"{source} {where}: {metric} is not exposed by cluster/metrics.py"
            unknown = labels - exposed[metric] - TARGET_LABELS
            assert not unknown, f"{source} {where}: {metric} has no label(s) {unknown}"
            used.add(metric)
    if source == "dashboard":  # the dashboard shows every family
        families = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in used}
        assert set(Metrics().families) - families == set()


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.9, sum by (le) (rate(gptoss_time_to_first_token_seconds_bucket{method=~"a|b", '
            'namespace=~"$namespace"}[$__rate_interval]))) / on() group_left sum(gptoss_replicas)')
    assert selectors(grafana_to_promql(expr)) == [
        ("gptoss_time_to_first_token_seconds_bucket", {"method", "namespace"}), ("gptoss_replicas", set())]


def test_exposition_passes_promtool_lint(promtool: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    metrics.observe_request(method="Chat", code="OK", ttft_s=0.1, e2e_s=1.0, queue_s=0.0, inter_token_s=[0.01],
                            prompt_tokens=3, generation_tokens=2)
    metrics.record_engine_stats({"num_running": 1, "num_waiting": 0, "kv_usage": 0.1, "num_steps": 1,
                                 "last_step_time_s": 0.01, "expert_counts": [[1, 2]]}, replica="r")
    metrics.set_replica_states({"running": 1}, target=1)
    metrics.set_router_queue(router="a", queued=0, capacity=4)
    text = metrics.render().decode()
    # promtool lints names and help (counters end in _total, units are base units, ...): no complaints at all.
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr
