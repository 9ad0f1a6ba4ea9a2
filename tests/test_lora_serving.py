"""LoRA adapters on the serving surface (issue 16): the CLI, the chart, the proto, the router (gRPC and the OpenAI HTTP
API), the Admin service and the metrics.

Most of it runs the real router (`GptossServer` over `LocalBackend`) on loopback in front of scripted replicas that
pretend to serve adapters (`cluster.router.testing.ScriptedReplica(adapters=...)`): which adapter a request reached a
replica with, and on which replica, is what the router decides, and is checked exactly. The end-to-end test at the
bottom runs `serve` for real (Ray on loopback, the tiny checkpoint, PEFT adapters built by tests/test_lora.py's helper)
and compares greedy completions over HTTP with the offline `LLM`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import openai
import pytest
import yaml

from gptoss_cluster.cluster import cli
from gptoss_cluster.cluster.app import AppConfigError, parse_args
from gptoss_cluster.cluster.client import Client
from gptoss_cluster.cluster.contract import lora_name_problem
from gptoss_cluster.cluster.metrics import Metrics
from gptoss_cluster.cluster.router.core import PREFIX_BLOCKS
from gptoss_cluster.cluster.router.settings import RouterSettings
from gptoss_cluster.cluster.router.testing import ScriptedReplica, ServerThread
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from gptoss_cluster.workers.block_hash import lora_salt, prefix_hashes
from tests.tools import find_tool, free_port

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "gptoss-cluster"
BASE = "scripted"  # the scripted replicas' served model name


# ================================================================================================ names, CLI, config
@pytest.mark.parametrize("name, ok", [("sql", True), ("org/sql-v2.1", True), ("a:b_c", True), ("", False),
                                      ("-x", False), ("has space", False), ("x" * 129, False), ("é", False)])
def test_adapter_names(name, ok):
    assert (lora_name_problem(name) is None) == ok


def test_cli_lora_modules_both_forms_and_the_engine_limits(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    args = cli.build_parser().parse_args(
        ["serve", "--lora-modules", f"sql={a}", json.dumps({"name": "org/chat", "path": str(b)}),
         "--lora-modules", f"third={a}", "--max-loras", "2", "--max-lora-rank", "64"])
    config = cli._serve_config(args)
    assert config.lora_modules == {"sql": str(a), "org/chat": str(b), "third": str(a)}
    assert (config.max_loras, config.max_lora_rank) == (2, 64)
    assert parse_args(config.chart_args()).lora_modules == config.lora_modules  # the Serve args carry them
    from gptoss_cluster.cluster.app import replica_settings

    settings = replica_settings(config, "cpu")
    assert settings["lora_modules"] == config.lora_modules and settings["max_loras"] == 2
    assert settings["max_lora_rank"] == 64
    assert cli.main(["serve", "--lora-modules", f"sql={a}", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["applications"][0]["args"]["lora_modules"] == {"sql": str(a)}


@pytest.mark.parametrize("argv, message", [
    (["--lora-modules", "sql"], "expected NAME=PATH or a JSON object"),
    (["--lora-modules", "-bad=/tmp"], "expected at least one argument"),  # argparse reads it as an option
    (["--lora-modules", "bad name=/tmp"], "must start with a letter or digit"),
    (["--lora-modules", "sql="], "the path is empty"),
    (["--lora-modules", '{"name": "sql"}'], 'expected {"name": ..., "path": ...}'),
    (["--lora-modules", '{"name": "sql", "path": "/tmp", "rank": 8}'], "unknown key(s) ['rank']"),
    (["--lora-modules", '{"name": '], "not valid JSON"),
    (["--lora-modules", "sql=/tmp", "sql=/tmp"], "the adapter name 'sql' is given twice"),
    (["--lora-modules", "sql=/no/such/dir"], "--lora-modules sql=/no/such/dir: not a directory"),
    (["--lora-modules", "gptoss-tiny=/tmp"], "an adapter cannot take the served model's name"),
    (["--max-loras", "0"], "must be >= 1"),
    (["--max-lora-rank", "x"], "not an integer"),
])
def test_cli_bad_lora_arguments_exit_2_with_a_message(argv, message, capsys):
    assert cli.main(["serve", *argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptoss-cluster: error:") and message in err, err


@pytest.mark.parametrize("args, message", [
    ({"lora_modules": {"bad name": "/a"}}, "lora_modules.bad name: the adapter name"),
    ({"lora_modules": {"m": "/a"}}, "lora_modules.m: an adapter cannot take the served model's name"),
    ({"lora_modules": {"a": ""}}, "lora_modules.a: must be a non-empty path"),
    ({"lora_modules": ["a=/b"]}, "lora_modules: must be a mapping"),
    ({"max_loras": 0}, "max_loras: must be an integer >= 1"),
    ({"max_lora_rank": True}, "max_lora_rank: must be an integer >= 1"),
])
def test_build_app_arguments_refuse_bad_lora_settings(args, message):
    with pytest.raises(AppConfigError, match="^" + message.replace("(", r"\(")):
        parse_args({"model": "/models/m", **args})


# ================================================================================================ the chart
def _chart_args(*sets: str) -> dict:
    helm = find_tool("helm")
    if not helm:
        pytest.skip("helm unavailable")
    out = subprocess.run([helm, "template", "demo", str(CHART), *sets], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (rayservice,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "RayService"]
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    return app["args"]


def test_chart_lora_values_flow_into_the_serve_arguments():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "files" / "serve-args.schema.json").read_text())
    args = _chart_args("--set", "lora.modules[0].name=sql,lora.modules[0].path=/models/adapters/sql",
                       "--set", "lora.modules[1].name=org/chat,lora.modules[1].path=/models/adapters/chat",
                       "--set", "lora.maxLoras=8,lora.maxLoraRank=32")
    jsonschema.validate(args, schema)
    config = parse_args(args)
    assert config.lora_modules == {"sql": "/models/adapters/sql", "org/chat": "/models/adapters/chat"}
    assert (config.max_loras, config.max_lora_rank) == (8, 32)
    default = _chart_args()
    assert "lora_modules" not in default and (default["max_loras"], default["max_lora_rank"]) == (4, 16)
    jsonschema.validate(default, schema)


@pytest.mark.parametrize("sets, message", [
    ("lora.modules[0].name=sql,lora.modules[0].path=/a,lora.modules[1].name=sql,lora.modules[1].path=/b",
     "the adapter name sql is listed twice"),
    ("lora.modules[0].name=-sql,lora.modules[0].path=/a", "does not match pattern"),
    ("lora.modules[0].name=sql", "missing property 'path'"),
    ("lora.maxLoras=0", "minimum"),
])
def test_chart_refuses_bad_lora_values(sets, message):
    helm = find_tool("helm")
    if not helm:
        pytest.skip("helm unavailable")
    out = subprocess.run([helm, "template", "demo", str(CHART), "--set", sets], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and message in out.stderr, out.stderr


# ================================================================================================ the proto
def test_proto_adapter_fields_and_admin_messages():
    generate = pb.GenerateRequest.DESCRIPTOR.fields_by_name["adapter"]
    chat = pb.ChatRequest.DESCRIPTOR.fields_by_name["adapter"]
    assert (generate.number, chat.number) == (7, 12)  # new numbers: old clients' messages mean what they meant
    assert generate.has_presence and chat.has_presence  # optional: unset is the base model
    assert not pb.GenerateRequest().HasField("adapter")
    assert [f.name for f in pb.ModelInfo.DESCRIPTOR.fields][-1] == "adapters"
    assert [f.name for f in pb.LoraAdapter.DESCRIPTOR.fields] == ["name", "path", "rank", "parent"]
    admin = pb.DESCRIPTOR.services_by_name["Admin"].methods_by_name
    assert admin["LoadLoraAdapter"].input_type.name == "LoadLoraAdapterRequest"
    assert admin["UnloadLoraAdapter"].output_type.name == "LoraAdapterResponse"
    assert admin["ListLoraAdapters"].output_type.name == "ListLoraAdaptersResponse"


# ================================================================================================ the router
def _script(request) -> list[int]:
    """Tokens that tell which adapter a request ran with (the replica's view of it)."""
    return [100 + sum(map(ord, request.lora or ""))] * 4


@pytest.fixture
def routed(tmp_path):
    """A router over two scripted replicas: `sql` on both, `only-b` on the second one."""
    a = ScriptedReplica(_script, replica_id="replica-a", adapters={"sql": str(tmp_path)}, model=BASE)
    b = ScriptedReplica(_script, replica_id="replica-b", adapters={"sql": str(tmp_path), "only-b": str(tmp_path)},
                        model=BASE)
    st = ServerThread()
    address = st.start([a, b], RouterSettings(host="127.0.0.1", port=0, http_port=free_port(),
                                              health_interval_s=0.05))
    try:
        with Client(address, timeout=30) as client:
            yield {"st": st, "client": client, "replicas": (a, b), "http": f"http://127.0.0.1:{st.server.http_port}",
                   "path": str(tmp_path), "address": address}
    finally:
        st.stop()


def _generate(client: Client, prompt, **options) -> list[int]:
    return [t for d in client.generate(prompt, max_tokens=4, **options) for t in d.token_ids]


def test_generate_and_chat_reach_the_replica_with_their_adapter(routed):
    client, (a, b) = routed["client"], routed["replicas"]
    assert _generate(client, [1, 2, 3], adapter="sql") == _script(type("R", (), {"lora": "sql"})())
    for name in (None, "", BASE):  # unset, empty or the served model's name: the base model
        assert _generate(client, [1, 2, 3], adapter=name) == [100] * 4
    last = (a.started + b.started)[-1]
    assert last.lora is None
    list(client.chat("hi", max_tokens=2, adapter="sql"))
    assert {r.lora for r in a.started + b.started} == {None, "sql"}
    chat_request = max(a.started + b.started, key=lambda r: r.eos_token_ids is not None)
    assert chat_request.lora == "sql" and chat_request.eos_token_ids is not None


def test_requests_for_an_adapter_go_only_to_replicas_serving_it(routed):
    client, (a, b) = routed["client"], routed["replicas"]
    for i in range(8):  # distinct prompts: nothing but the exclusion keeps them off replica a
        assert _generate(client, [i + 1] * 20, adapter="only-b")
    assert [r.lora for r in a.started] == [] and [r.lora for r in b.started] == ["only-b"] * 8
    assert all(r.exclude_replicas == ("replica-a",) for r in b.started)


def test_prefix_hashes_are_salted_with_the_adapter(routed):
    client, (a, b) = routed["client"], routed["replicas"]
    prompt = list(range(1, 70))  # 4 full blocks of 16
    _generate(client, prompt)
    _generate(client, prompt, adapter="sql")
    base, sql = sorted(a.started + b.started, key=lambda r: r.lora is not None)
    assert base.prefix_hashes == tuple(prefix_hashes(prompt, 16, PREFIX_BLOCKS)) and len(base.prefix_hashes) == 4
    assert sql.prefix_hashes == tuple(prefix_hashes(prompt, 16, PREFIX_BLOCKS, salt=lora_salt("sql")))
    assert not set(sql.prefix_hashes) & set(base.prefix_hashes)


@pytest.mark.parametrize("adapter, code, message", [
    ("nope", grpc.StatusCode.NOT_FOUND, "the LoRA adapter 'nope' is not loaded; loaded: only-b, sql"),
    ("bad name", grpc.StatusCode.INVALID_ARGUMENT, "adapter: the adapter name 'bad name' must start"),
])
def test_unknown_or_malformed_adapters_are_refused(routed, adapter, code, message):
    client, (a, b) = routed["client"], routed["replicas"]
    for call in (lambda: _generate(client, [1, 2], adapter=adapter),
                 lambda: list(client.chat("hi", adapter=adapter))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code and info.value.details().startswith(message), info.value.details()
    assert not a.started and not b.started


def _stale(routed) -> None:
    """The router stops polling: its view of the adapters stays what it is now."""
    routed["st"].run(routed["st"].server.core.stop())


def test_a_replica_that_lost_the_adapter_answers_not_found(routed):
    client, (a, b) = routed["client"], routed["replicas"]
    _stale(routed)
    del b.loras["only-b"]  # unloaded behind the router's back
    with pytest.raises(grpc.RpcError) as info:
        _generate(client, [5, 6], adapter="only-b")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no LoRA adapter named 'only-b'" in \
        info.value.details()
    assert [r.lora for r in b.started] == [] and not a.started  # refused on b, never sent to a


def test_admin_loads_lists_and_unloads_on_every_replica(routed, tmp_path):
    client, (a, b) = routed["client"], routed["replicas"]
    adapter_dir = tmp_path / "new"
    adapter_dir.mkdir()
    loaded = client.load_lora("fresh", str(adapter_dir))
    assert loaded.adapter.name == "fresh" and loaded.adapter.parent == BASE and loaded.adapter.path == str(adapter_dir)
    assert sorted((r.replica_id, r.ok) for r in loaded.replicas) == [("replica-a", True), ("replica-b", True)]
    assert "fresh" in a.loras and "fresh" in b.loras
    assert _generate(client, [1, 2], adapter="fresh")  # usable at once, before the next poll
    listing = client.list_loras()
    assert [x.name for x in listing.adapters] == ["fresh", "only-b", "sql"]
    assert {r.replica_id: sorted(x.name for x in r.adapters) for r in listing.replicas} == {
        "replica-a": ["fresh", "sql"], "replica-b": ["fresh", "only-b", "sql"]}
    assert {x.parent for x in listing.adapters} == {BASE}
    info = client.model_info()
    assert sorted(x.name for x in info.adapters) == ["fresh", "only-b", "sql"]

    # partly done: the call succeeds and says which replica refused
    partly = client.unload_lora("only-b")
    assert {(r.replica_id, r.ok, r.error_code) for r in partly.replicas} == {
        ("replica-a", False, "NOT_FOUND"), ("replica-b", True, "")}
    gone = client.unload_lora("fresh")
    assert all(r.ok for r in gone.replicas)
    for name in ("fresh", "only-b"):
        with pytest.raises(grpc.RpcError) as err:
            _generate(client, [1, 2], adapter=name)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("call, code, message", [
    (lambda c, d: c.load_lora("sql", d), grpc.StatusCode.INVALID_ARGUMENT, "a LoRA adapter named 'sql' is already"),
    (lambda c, d: c.load_lora("x", "/no/such/dir"), grpc.StatusCode.INVALID_ARGUMENT, "/no/such/dir: not a directory"),
    (lambda c, d: c.load_lora("bad name", d), grpc.StatusCode.INVALID_ARGUMENT, "name: the adapter name 'bad name'"),
    (lambda c, d: c.load_lora(BASE, d), grpc.StatusCode.INVALID_ARGUMENT, f"name: {BASE!r} is the served model's"),
    (lambda c, d: c.load_lora("x", ""), grpc.StatusCode.INVALID_ARGUMENT, "path is empty"),
    (lambda c, d: c.unload_lora("nope"), grpc.StatusCode.NOT_FOUND, "no adapter 'nope'"),
])
def test_admin_refusals_by_every_replica_fail_the_call(routed, call, code, message):
    with pytest.raises(grpc.RpcError) as info:
        call(routed["client"], routed["path"])
    assert info.value.code() == code and message in info.value.details(), info.value.details()


def test_cli_lora_commands_and_adapter_option(routed, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GPTOSS_AUTH_TOKEN", raising=False)
    address, (a, b) = routed["address"], routed["replicas"]
    assert cli.main(["lora", "load", "cli-made", str(tmp_path), "--address", address]) == 0
    assert capsys.readouterr().out.splitlines() == ["replica-a: ok", "replica-b: ok"]
    assert cli.main(["lora", "list", "--address", address]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == f"replica-a: sql (rank 8, {tmp_path}), cli-made (rank 8, {tmp_path})"
    assert listed[1].startswith("replica-b: sql (rank 8, ") and "only-b (rank 8" in listed[1]
    assert cli.main(["generate", "--address", address, "--token-ids", "1,2", "--adapter", "cli-made"]) == 0
    assert [r.lora for r in a.started + b.started] == ["cli-made"]
    capsys.readouterr()
    assert cli.main(["lora", "unload", "only-b", "--address", address]) == 1  # replica-a has no only-b: exit 1
    assert capsys.readouterr().out.splitlines() == [
        "replica-a: NOT_FOUND: no adapter 'only-b'", "replica-b: ok"]
    assert cli.main(["lora", "unload", "nope", "--address", address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli.main(["lora", "load", "bad name", "/x", "--address", address]) == 2
    assert cli.main(["lora", "list"]) == 2 and "needs --address" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "x", "--adapter", "a"]) == 2


def test_admin_needs_the_token(tmp_path):
    token = "lora-token"
    st = ServerThread()
    address = st.start([ScriptedReplica(model=BASE)], RouterSettings(host="127.0.0.1", port=0, auth_token=token,
                                                                     health_interval_s=0.05))
    try:
        with Client(address, token="wrong", timeout=10) as stranger, pytest.raises(grpc.RpcError) as info:
            stranger.load_lora("x", str(tmp_path))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(address, token=token, timeout=10) as client:
            assert client.load_lora("x", str(tmp_path)).replicas[0].ok
    finally:
        st.stop()


# ------------------------------------------------------------------------------------------------ the HTTP API
def test_openai_models_list_base_and_adapters(routed):
    with openai.OpenAI(base_url=f"{routed['http']}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        models = {m.id: m for m in client.models.list().data}
        assert list(models) == [BASE, "only-b", "sql"]
        assert models["sql"].parent == BASE and models["sql"].root == routed["path"]
        assert models[BASE].parent is None
        assert client.models.retrieve("sql").parent == BASE and client.models.retrieve(BASE).id == BASE
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve("nope")
        assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_openai_model_selects_the_adapter_and_unknown_is_404(routed):
    (a, b) = routed["replicas"]
    with openai.OpenAI(base_url=f"{routed['http']}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        done = client.completions.create(model="sql", prompt=[1, 2, 3], max_tokens=4, temperature=0)
        assert done.model == "sql"
        chat = client.chat.completions.create(model="only-b", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2)
        assert chat.model == "only-b"
        client.completions.create(model=BASE, prompt=[1, 2, 3], max_tokens=2)
        client.responses.create(model="sql", input="hi", max_output_tokens=2)
        assert sorted(str(r.lora) for r in a.started + b.started) == ["None", "only-b", "sql", "sql"]
        for create in (lambda: client.completions.create(model="nope", prompt="hi", max_tokens=2),
                       lambda: client.chat.completions.create(model="nope", messages=[{"role": "user",
                                                                                      "content": "hi"}]),
                       lambda: client.responses.create(model="nope", input="hi")):
            with pytest.raises(openai.NotFoundError) as info:
                create()
            assert info.value.body["code"] == "model_not_found" and "'nope' does not exist" in info.value.message
            assert "LoRA adapters only-b, sql" in info.value.message


def test_openai_adapter_lost_on_the_replica_is_404_model_not_found(routed):
    _stale(routed)
    routed["replicas"][1].loras.pop("only-b")  # the router still lists it
    with openai.OpenAI(base_url=f"{routed['http']}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model="only-b", prompt=[1, 2], max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


# ================================================================================================ metrics
def test_per_adapter_metrics_parse_back(monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    m = Metrics()
    m.record_engine_stats({"lora_requests": {"sql": 2, "chat": 1}, "lora_generation_tokens": {"sql": 30, "chat": 5},
                           "lora_resident": 2}, replica="r0")
    m.record_engine_stats({"lora_requests": {"sql": 5, "chat": 1, "new": 1},
                           "lora_generation_tokens": {"sql": 70, "chat": 5, "new": 9}, "lora_resident": 3},
                          replica="r0")
    m.record_engine_stats({"lora_requests": {"sql": 1}, "lora_generation_tokens": {"sql": 4}, "lora_resident": 1},
                          replica="r1")
    m.record_engine_stats({"lora_requests": {"sql": 1}, "lora_generation_tokens": {"sql": 6}}, replica="r1")
    samples = {(s.name, s.labels.get("replica"), s.labels.get("lora_adapter")): s.value
               for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    assert samples[("gptoss_lora_requests_total", "r0", "sql")] == 5
    assert samples[("gptoss_lora_requests_total", "r0", "chat")] == 1
    assert samples[("gptoss_lora_requests_total", "r0", "new")] == 1
    assert samples[("gptoss_lora_generation_tokens_total", "r0", "sql")] == 70
    assert samples[("gptoss_lora_generation_tokens_total", "r0", "new")] == 9
    assert samples[("gptoss_lora_requests_total", "r1", "sql")] == 1
    assert samples[("gptoss_lora_generation_tokens_total", "r1", "sql")] == 6
    assert samples[("gptoss_lora_resident_adapters", "r0", None)] == 3
    assert samples[("gptoss_lora_resident_adapters", "r1", None)] == 1



# ================================================================================================ end to end
E2E_PROMPTS = ([3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26], [2718, 28, 1828, 459, 45, 2353, 602, 87, 4713, 526])
E2E_TOKENS = 8
TOKEN = "lora-e2e-token"
TOKEN_ENV = "GPTOSS_LORA_TEST_TOKEN"


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    """Three PEFT adapters on tinyb-hf (tests/test_lora.py's helper and specs): two served from the start, one loaded
    through the Admin service."""
    pytest.importorskip("peft")
    from tests.test_lora import ADAPTERS, make_adapter

    root = tmp_path_factory.mktemp("serving-adapters")
    return {name: make_adapter(checkpoints["tinyb-hf"], root / name, logits=False, **ADAPTERS[name]).source.path
            for name in ("full", "rslora", "pattern")}


@pytest.fixture(scope="module")
def offline(checkpoints, adapters):
    """Greedy tokens of the offline LLM for every prompt with every adapter (None: the base model)."""
    from gptoss_cluster.workers.llm import LLM
    from gptoss_cluster.workers.sampling import SamplingParams

    llm = LLM(checkpoints["tinyb-hf"], dtype="float32", progress=False, lora_modules=adapters)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=E2E_TOKENS, ignore_eos=True)
        return {name: [out.token_ids for out in llm.generate(list(E2E_PROMPTS), params, lora=name)]
                for name in (None, *adapters)}
    finally:
        llm.shutdown()


@pytest.fixture(scope="module", params=[1, 2], ids=["G1", "G2"])
def served(request, checkpoints, adapters):
    """`serve` on loopback (Ray, the Router and one ModelReplica of tinyb-hf on G = 1 or 2 shards: heads and experts
    split, each shard holding its slices of the adapters) with the adapters full and rslora."""
    import ray

    from gptoss_cluster.cluster.app import AppConfig, LocalCluster

    if ray.is_initialized():
        ray.shutdown()
    grpc_port, http_port = free_port(), free_port()
    config = AppConfig(model=str(checkpoints["tinyb-hf"]), served_model_name="tinyb", dtype="float32", device="cpu",
                       num_replicas=1, shards_per_replica=request.param, grpc_port=grpc_port, grpc_host="127.0.0.1",
                       http_port=http_port,
                       metrics_port=0, auth_token_env=TOKEN_ENV, health_interval_s=0.2, routing_stats_period_s=0.5,
                       graceful_shutdown_timeout_s=10, max_loras=2, max_lora_rank=16,
                       lora_modules={"full": adapters["full"], "rslora": adapters["rslora"]},
                       engine={"num_blocks": 512, "max_model_len": 512, "max_num_seqs": 16})
    local = LocalCluster(config, ray_address="", dashboard_port=free_port(), num_cpus=4,
                         env_vars={TOKEN_ENV: TOKEN, "GPTOSS_NO_PROGRESS": "1"})
    try:
        local.start(ready_timeout_s=300)
        with Client(f"127.0.0.1:{grpc_port}", token=TOKEN, timeout=120) as grpc_client, \
                openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=TOKEN, max_retries=0,
                              timeout=120) as http_client:
            yield {"grpc": grpc_client, "openai": http_client, "base_url": f"http://127.0.0.1:{http_port}/v1"}
    finally:
        local.close()


def test_served_adapters_equal_the_offline_llm(served, offline, adapters):
    from gptoss_cluster.workers.harmony import get_tokenizer

    tok = get_tokenizer()
    http, grpc_client = served["openai"], served["grpc"]
    models = {m.id: m for m in http.models.list().data}
    assert sorted(models) == ["full", "rslora", "tinyb"] and models["full"].parent == "tinyb"
    assert models["rslora"].root == adapters["rslora"] and models["tinyb"].parent is None
    assert any(offline["full"][i] != offline[None][i] for i in range(len(E2E_PROMPTS))), \
        "the adapter changes nothing: the comparison below could not fail"
    for name in (None, "full", "rslora", None):  # the base model once more after the adapters: unaffected
        for i, prompt in enumerate(E2E_PROMPTS):
            expected = offline[name][i]
            ids = [t for d in grpc_client.generate(prompt, adapter=name, max_tokens=E2E_TOKENS, temperature=0,
                                                   ignore_eos=True) for t in d.token_ids]
            assert ids == expected, (name, i)
            done = http.completions.create(model=name or "tinyb", prompt=prompt, max_tokens=E2E_TOKENS,
                                           temperature=0, extra_body={"ignore_eos": True})
            assert done.model == (name or "tinyb")
            assert done.choices[0].text == tok.decode(expected) and done.usage.completion_tokens == E2E_TOKENS
    with pytest.raises(openai.NotFoundError) as info:
        http.completions.create(model="pattern", prompt=E2E_PROMPTS[0], max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(grpc.RpcError) as err:
        list(grpc_client.generate(E2E_PROMPTS[0], adapter="pattern", max_tokens=2))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_admin_load_then_use_then_unload(served, offline, adapters):
    from gptoss_cluster.workers.harmony import get_tokenizer

    http, grpc_client = served["openai"], served["grpc"]
    with pytest.raises(grpc.RpcError) as refused:  # a directory that is no PEFT adapter: refused by name
        grpc_client.load_lora("broken", str(Path(adapters["pattern"]).parent))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    loaded = grpc_client.load_lora("pattern", adapters["pattern"])
    assert loaded.adapter.name == "pattern" and loaded.adapter.parent == "tinyb" and loaded.adapter.rank == 6
    assert len(loaded.replicas) == 1 and loaded.replicas[0].ok
    assert [a.name for a in grpc_client.list_loras().adapters] == ["full", "pattern", "rslora"]

    # every adapter and the base at once: three adapters for max_loras = 2 slots, so one waits for a slot
    async def all_at_once() -> list:
        async with openai.AsyncOpenAI(base_url=served["base_url"], api_key=TOKEN, max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*(
                client.completions.create(model=name or "tinyb", prompt=prompt, max_tokens=E2E_TOKENS,
                                          temperature=0, extra_body={"ignore_eos": True})
                for name in (None, "full", "rslora", "pattern") for prompt in E2E_PROMPTS))

    answers = iter(asyncio.run(all_at_once()))
    for name in (None, "full", "rslora", "pattern"):
        for i in range(len(E2E_PROMPTS)):
            assert next(answers).choices[0].text == get_tokenizer().decode(offline[name][i]), (name, i)
    assert grpc_client.unload_lora("pattern").replicas[0].ok
    with pytest.raises(openai.NotFoundError):
        http.completions.create(model="pattern", prompt=E2E_PROMPTS[0], max_tokens=2)
    assert sorted(m.id for m in http.models.list().data) == ["full", "rslora", "tinyb"]



def test_in_process_replicas_route_by_adapter_and_count_it_in_the_metrics(checkpoints, adapters, offline,
                                                                          monkeypatch, tmp_path):
    """Two real replica cores behind one router, in this process: `full` registered on r0 only, `rslora` loaded
    through the Admin service on both; then the per-adapter counters of r0's engine, through the metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    from gptoss_cluster.cluster.replica import ReplicaCore, ReplicaSettings

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    engine = {"num_blocks": 256, "max_model_len": 256, "max_num_seqs": 8}
    common = dict(model=str(checkpoints["tinyb-hf"]), dtype="float32", served_model_name="tinyb", engine=engine,
                  max_loras=2)
    r0 = ReplicaCore(ReplicaSettings(**common, lora_modules={"full": adapters["full"]}), replica_id="app#r0")
    r1 = ReplicaCore(ReplicaSettings(**common), replica_id="app#r1")
    st = ServerThread()
    address = st.start([r0, r1], RouterSettings(host="127.0.0.1", port=0, health_interval_s=0.05))
    try:
        with Client(address, timeout=120) as client:
            for i, prompt in enumerate(E2E_PROMPTS * 2):
                ids = [t for d in client.generate(prompt, adapter="full", max_tokens=E2E_TOKENS, temperature=0,
                                                  ignore_eos=True) for t in d.token_ids]
                assert ids == offline["full"][i % len(E2E_PROMPTS)]
            assert r0.requests_total == 2 * len(E2E_PROMPTS) and r1.requests_total == 0  # only r0 serves `full`
            with pytest.raises(grpc.RpcError) as refused:
                client.load_lora("broken", str(checkpoints["tinyb-hf"]))  # a checkpoint, not an adapter
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "adapter_config.json" in refused.value.details(), refused.value.details()
            partly = client.load_lora("full", adapters["full"])  # r0 has it already, r1 takes it: partly done
            assert sorted((r.replica_id, r.ok, r.error_code) for r in partly.replicas) == [
                ("app#r0", False, "INVALID_ARGUMENT"), ("app#r1", True, "")]
            assert "already registered" in partly.replicas[0].error + partly.replicas[1].error
            loaded = client.load_lora("rslora", adapters["rslora"])
            assert sorted((r.replica_id, r.ok) for r in loaded.replicas) == [("app#r0", True), ("app#r1", True)]
            assert loaded.adapter.rank == 8
            for i, prompt in enumerate(E2E_PROMPTS):
                ids = [t for d in client.generate(prompt, adapter="rslora", max_tokens=E2E_TOKENS, temperature=0,
                                                  ignore_eos=True) for t in d.token_ids]
                assert ids == offline["rslora"][i]
            # an adapter whose files vanish after it was registered: its request fails with the reason, INVALID_ARGUMENT
            # (not a replica failure: the replicas stay healthy and serve the next request)
            shutil.copytree(adapters["full"], tmp_path / "vanishing")
            client.load_lora("vanishing", str(tmp_path / "vanishing"))
            shutil.rmtree(tmp_path / "vanishing")
            with pytest.raises(grpc.RpcError) as failed:
                list(client.generate(E2E_PROMPTS[0], adapter="vanishing", max_tokens=E2E_TOKENS, temperature=0))
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'vanishing' failed to load" in failed.value.details(), failed.value.details()
            assert r0.health_error is None and r1.health_error is None
            ids = [t for d in client.generate(E2E_PROMPTS[0], adapter="rslora", max_tokens=E2E_TOKENS,
                                              temperature=0, ignore_eos=True) for t in d.token_ids]
            assert ids == offline["rslora"][0]
        metrics = Metrics()
        metrics.record_engine_stats(r0.engine.stats(), replica="r0")
        samples = {(s.name, s.labels.get("lora_adapter")): s.value
                   for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples
                   if s.labels.get("replica") == "r0"}
        assert samples[("gptoss_lora_requests_total", "full")] == 2 * len(E2E_PROMPTS)
        assert samples[("gptoss_lora_generation_tokens_total", "full")] == 2 * len(E2E_PROMPTS) * E2E_TOKENS
        assert 1 <= samples[("gptoss_lora_resident_adapters", None)] <= 2
    finally:
        for core in (r0, r1):
            st.run(core.shutdown())
        st.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
