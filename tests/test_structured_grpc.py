"""Structured outputs, tool_choice and the reasoning budget through the gRPC API (issue 8).

Unit tests of the router's mapping (ChatRequest -> workers.constraint.Constraint, the Python client's OpenAI-style
arguments, the CLI's flags) need no cluster. The rest runs on one local Ray cluster on loopback (Router + one
ModelReplica of the tiny model, one shard), deployed once for the module: every chat request of the acceptance
table is sent at once (the replica batches them) and each test checks its own answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import jsonschema
import pytest

from gptoss_cluster.cluster.client import (
    AsyncClient,
    Client,
    chat_request,
    response_format_message,
    tool_choice_message,
)
from gptoss_cluster.cluster.contract import ErrorCode
from gptoss_cluster.cluster.router.errors import RouterError
from gptoss_cluster.cluster.router.requests import Validator, constraint_from_chat
from gptoss_cluster.cluster.router.testing import ScriptedReplica
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from gptoss_cluster.workers.constraint import BUILTIN_RECIPIENTS, Constraint
from gptoss_cluster.workers.harmony import END_ID, get_tokenizer
from tests.structured_cases import GRAMMARS, REGEXES, SCHEMAS, TIME_TOOL, WEATHER_TOOL, full_match
from tests.tools import free_port

MODEL = ScriptedReplica(vocab_size=201088, context_length=4096).model_info()
STRICT_WEATHER = {**WEATHER_TOOL, "strict": True}
STRICT_TIME = {**TIME_TOOL, "strict": True}
BROWSER = list(BUILTIN_RECIPIENTS["browser"])
BUDGETS = (0, 32)
MAX_TOKENS = 400


def _chat(**options: Any) -> pb.ChatRequest:
    return chat_request("Answer, please.", **options)


def _constraint(request: pb.ChatRequest) -> dict[str, Any] | None:
    """The request's constraint in its plain-data form (None: unconstrained)."""
    c = constraint_from_chat(request)
    return None if c is None else c.to_dict()


# ======================================================================================= the mapping (no cluster)
def test_plain_requests_stay_unconstrained():
    validator = Validator(MODEL)
    for options in ({}, {"tools": [WEATHER_TOOL]}, {"tools": [WEATHER_TOOL], "tool_choice": "auto"},
                    {"builtin_tools": ["browser", "python"]}, {"response_format": {"type": "text"}}):
        prep = validator.chat(_chat(**options))
        assert prep.constraint is None, options
        assert prep.replica_request(None).constraint is None


def test_constraint_mapping():
    schema = SCHEMAS[0]
    c = _constraint(_chat(response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": schema, "strict": True}}, max_reasoning_tokens=0))
    assert c is not None and c["max_reasoning_tokens"] == 0 and c["tool_choice"] == "auto" and c["tools"] == []
    assert c["response_format"]["type"] == "json_schema" and json.loads(c["response_format"]["value"]) == schema
    # compact, property order kept (xgrammar writes properties in schema order)
    assert c["response_format"]["value"] == json.dumps(schema, separators=(",", ":"))
    assert _constraint(_chat(response_format={"type": "json_object"}))["response_format"] == {
        "type": "json_object", "value": ""}
    assert _constraint(_chat(response_format={"type": "regex", "regex": "[a-z]+"}))["response_format"] == {
        "type": "regex", "value": "[a-z]+"}
    assert _constraint(_chat(response_format={"type": "grammar", "grammar": GRAMMARS[0][0]}))[
        "response_format"] == {"type": "grammar", "value": GRAMMARS[0][0]}

    # a strict tool alone turns the constraint on: its arguments follow its schema; non-strict tools take any object
    c = _constraint(_chat(tools=[STRICT_WEATHER, TIME_TOOL], builtin_tools=["browser", "python"]))
    assert c is not None and c["response_format"] is None and c["tool_choice"] == "auto"
    assert c["max_reasoning_tokens"] is None
    assert [t["recipient"] for t in c["tools"]] == ["functions.get_weather", "functions.get_time", *BROWSER, "python"]
    assert json.loads(c["tools"][0]["schema"]) == WEATHER_TOOL["parameters"]
    assert all(t["schema"] is None for t in c["tools"][1:])

    both = {"tools": [WEATHER_TOOL, TIME_TOOL], "builtin_tools": ["browser", "python"]}
    for choice, recipient in [("get_weather", "functions.get_weather"), ("functions.get_time", "functions.get_time"),
                              ({"type": "function", "function": {"name": "get_time"}}, "functions.get_time"),
                              ("browser.find", "browser.find"), ("python", "python"), ("none", "none"),
                              ("required", "required")]:
        assert _constraint(_chat(tool_choice=choice, **both))["tool_choice"] == recipient, choice
    # the Constraint itself travels to the replica, which compiles it
    c = constraint_from_chat(_chat(tool_choice="get_weather", max_reasoning_tokens=5, **both))
    assert Constraint.from_dict(c.to_dict()) == c
    prep = Validator(MODEL).chat(_chat(tool_choice="get_weather", max_reasoning_tokens=5, **both))
    assert prep.constraint == c and prep.replica_request(1.0).constraint == c


def test_constraint_fields_never_change_the_prompt():
    validator = Validator(MODEL)
    plain = validator.chat(_chat(tools=[WEATHER_TOOL], builtin_tools=["browser"]))
    shaped = validator.chat(_chat(tools=[STRICT_WEATHER], builtin_tools=["browser"], tool_choice="required",
                                  max_reasoning_tokens=3, response_format={"type": "json_object"}))
    assert shaped.prompt_token_ids == plain.prompt_token_ids
    tokenized = validator.tokenize(pb.TokenizeRequest(chat=pb.ChatMessages(messages=_chat().messages)))
    assert tokenized == validator.chat(_chat(max_reasoning_tokens=0)).prompt_token_ids


def _raw(**fields: Any) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")], **fields)


def _schema_format(text: str) -> pb.ResponseFormat:
    return pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name="s", schema_json=text))


WEATHER_PB = pb.FunctionTool(name="get_weather", parameters_json=json.dumps(WEATHER_TOOL["parameters"]), strict=True)
INVALID = [
    (_raw(response_format=_schema_format("{not json")), "response_format.json_schema.schema_json is not valid JSON"),
    (_raw(response_format=_schema_format("")), "response_format.json_schema.schema_json is empty"),
    (_raw(response_format=_schema_format("[1]")), "response_format.json_schema.schema_json must be a JSON Schema"),
    (_raw(response_format=_schema_format('{"type": "strng"}')), "response_format.json_schema.schema_json.type"),
    (_raw(response_format=_schema_format('{"type": "object", "minProperties": -1}')),
     "response_format.json_schema.schema_json is not a valid JSON Schema"),
    (_raw(response_format=pb.ResponseFormat(regex="")), "response_format.regex is empty"),
    (_raw(response_format=pb.ResponseFormat(grammar="  ")), "response_format.grammar is empty"),
    (_raw(response_format=pb.ResponseFormat(json_object=False)), "response_format.json_object must be true"),
    (_raw(tools=[WEATHER_PB], tool_choice=pb.ToolChoice(name="get_stock")),
     "tool_choice.name 'get_stock' names no declared tool (declared: get_weather)"),
    (_raw(builtin_tools=["python"], tool_choice=pb.ToolChoice(name="browser.search")),
     "tool_choice.name 'browser.search' names no declared tool (declared: python)"),
    (_raw(tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)),
     "tool_choice.mode REQUIRED needs at least one tool"),
    (_raw(tool_choice=pb.ToolChoice(mode=7)), "tool_choice.mode: unknown value 7"),
    (_raw(max_reasoning_tokens=-1), "max_reasoning_tokens must be >= 0, got -1"),
    (_raw(builtin_tools=["shell"], max_reasoning_tokens=1), "builtin_tools"),
    (_raw(tools=[pb.FunctionTool(name="f", parameters_json='{"type": "object", "required": "a"}', strict=True)]),
     "tools[0].parameters_json.required"),
]


@pytest.mark.parametrize(("request_", "message"), INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_constraints_name_the_field(request_, message):
    with pytest.raises(RouterError) as info:
        Validator(MODEL).chat(request_)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert message in info.value.message, info.value.message


def test_client_converts_openai_shapes():
    rf = response_format_message({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "boolean"},
                                                                         "strict": True, "description": "d"}})
    assert rf == pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name="n", schema_json='{"type": "boolean"}',
                                                                   strict=True, description="d"))
    assert response_format_message({"type": "json_object"}) == pb.ResponseFormat(json_object=True)
    assert response_format_message({"type": "regex", "regex": "a+"}) == pb.ResponseFormat(regex="a+")
    assert response_format_message({"type": "grammar", "grammar": "g"}) == pb.ResponseFormat(grammar="g")
    assert response_format_message({"type": "text"}) is None
    for bad in ({"type": "xml"}, {"type": "json_schema", "json_schema": {}}, {"type": "regex"}):
        with pytest.raises(ValueError):
            response_format_message(bad)
    assert tool_choice_message("required") == pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)
    assert tool_choice_message("none") == pb.ToolChoice(mode=pb.ToolChoice.MODE_NONE)
    assert tool_choice_message("get_weather") == pb.ToolChoice(name="get_weather")
    assert tool_choice_message({"type": "function", "function": {"name": "f"}}) == pb.ToolChoice(name="f")
    with pytest.raises(ValueError):
        tool_choice_message({"type": "function", "function": {}})
    req = chat_request("hi", max_reasoning_tokens=0, builtin_tools="browser", tool_choice="browser.search")
    assert req.HasField("max_reasoning_tokens") and req.max_reasoning_tokens == 0
    assert list(req.builtin_tools) == ["browser"] and req.tool_choice.name == "browser.search"
    assert not chat_request("hi").HasField("response_format") and not chat_request("hi").HasField("tool_choice")


def test_cli_structured_flags_bad_values_exit_2(tmp_path, capsys):
    from gptoss_cluster.cluster.cli import main

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{nope")
    address = ["--address", "127.0.0.1:1"]
    for argv in (["chat", *address, "--max-reasoning-tokens", "-1", "hi"],
                 ["chat", *address, "--max-reasoning-tokens", "x", "hi"],
                 ["chat", *address, "--json-schema", str(tmp_path / "missing.json"), "hi"],
                 ["chat", *address, "--json-schema", str(bad_json), "hi"],
                 ["chat", *address, "--regex", "", "hi"],
                 ["chat", *address, "--regex", "a", "--json-schema", str(bad_json), "hi"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gptoss-cluster: error:") and err.count("\n") == 1, (argv, err)


# ================================================================================================ over gRPC

@pytest.fixture(scope="module")
def cluster(checkpoints):
    """Router + one ModelReplica (tiny model, one shard) on a local Ray node, deployed through the dashboard."""
    import ray

    from gptoss_cluster.cluster.app import AppConfig, LocalCluster

    os.environ["GPTOSS_NO_PROGRESS"] = "1"
    if ray.is_initialized():  # a previous module left its connection: this module needs its own node + dashboard
        ray.shutdown()
    grpc_port = free_port()
    config = AppConfig(model=str(checkpoints["tiny-hf"]), served_model_name="tiny", dtype="float32", device="cpu",
                       num_replicas=1, shards_per_replica=1, max_ongoing_requests=128, grpc_port=grpc_port,
                       grpc_host="127.0.0.1", http_port=free_port(), metrics_port=0, health_interval_s=0.2,
                       engine={"num_blocks": 2048, "max_model_len": 1024, "max_num_seqs": 96})
    local = LocalCluster(config, dashboard_port=free_port(), num_cpus=8, env_vars={"GPTOSS_NO_PROGRESS": "1"})
    try:
        local.start(ready_timeout_s=300)
        yield f"127.0.0.1:{grpc_port}"
    finally:
        local.close()


@dataclass
class Answer:
    """One Chat call's stream, or the error it ended with."""

    responses: list[pb.ChatResponse] = field(default_factory=list)
    error: grpc.RpcError | None = None

    def raise_error(self) -> Answer:
        if self.error is not None:
            raise AssertionError(f"{self.error.code().name}: {self.error.details()}")
        return self

    @property
    def ids(self) -> list[int]:
        return [t for r in self.responses for t in r.token_ids]

    def text(self, channel: int) -> str:
        return "".join(r.text for r in self.responses if r.channel == channel and not r.HasField("tool_call"))

    @property
    def calls(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for r in self.responses:
            if r.HasField("tool_call"):
                if r.tool_call.index == len(out):
                    out.append({"name": r.tool_call.name, "arguments": ""})
                out[r.tool_call.index]["arguments"] += r.tool_call.arguments_delta
        return out

    @property
    def last(self) -> pb.ChatResponse:
        return self.responses[-1]

    def describe(self) -> str:
        return repr(get_tokenizer().decode(self.ids))[:600]


def _analysis_body_tokens(ids: list[int]) -> int:
    """Tokens of analysis-message bodies (between <|channel|>analysis<|message|> and <|end|>)."""
    header = get_tokenizer().encode("<|channel|>analysis<|message|>", allow_special_tokens=True)
    total, i = 0, 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            end = ids.index(END_ID, i) if END_ID in ids[i:] else len(ids)
            total += end - (i + len(header))
            i = end
        i += 1
    return total


SCHEMA_PROMPT = "Reply with JSON only."
REQUESTS: dict[str, dict[str, Any]] = {}
for _i, _schema in enumerate(SCHEMAS):
    for _budget in BUDGETS:
        REQUESTS[f"schema{_i}-budget{_budget}"] = dict(
            messages=SCHEMA_PROMPT, max_reasoning_tokens=_budget, temperature=1.0, seed=100 * _budget + _i,
            max_tokens=MAX_TOKENS, response_format={"type": "json_schema", "json_schema": {
                "name": f"case{_i}", "schema": _schema, "strict": True}})
for _i, _regex in enumerate(REGEXES):
    REQUESTS[f"regex{_i}"] = dict(messages="A short code.", response_format={"type": "regex", "regex": _regex},
                                  max_reasoning_tokens=8 * _i, temperature=1.0, seed=_i, max_tokens=200)
for _i, (_grammar, _) in enumerate(GRAMMARS):
    REQUESTS[f"grammar{_i}"] = dict(messages="Answer.", response_format={"type": "grammar", "grammar": _grammar},
                                    max_reasoning_tokens=4 * _i, temperature=1.0, seed=_i, max_tokens=200)
_TOOLS = {"messages": "What is the weather in Paris, and the time there?", "temperature": 1.0,
          "max_tokens": MAX_TOKENS}
REQUESTS.update({
    "required": dict(_TOOLS, tools=[STRICT_WEATHER], tool_choice="required", max_reasoning_tokens=8, seed=1),
    "required-two": dict(_TOOLS, tools=[STRICT_WEATHER, STRICT_TIME], tool_choice="required",
                         max_reasoning_tokens=0, seed=2),
    "named": dict(_TOOLS, tools=[STRICT_WEATHER, STRICT_TIME], tool_choice="get_time", max_reasoning_tokens=16,
                  seed=3),
    "named-object": dict(_TOOLS, tools=[STRICT_WEATHER, STRICT_TIME], max_reasoning_tokens=0, seed=4,
                         tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    "none-json": dict(_TOOLS, tools=[STRICT_WEATHER, STRICT_TIME], tool_choice="none", max_reasoning_tokens=8,
                      seed=5, response_format={"type": "json_schema", "json_schema": {"name": "c",
                                                                                      "schema": SCHEMAS[3]}}),
    "none-text": dict(_TOOLS, tools=[STRICT_WEATHER], tool_choice="none", max_reasoning_tokens=0, seed=6,
                      max_tokens=24),
    # built-in tools' arguments are any JSON object (browser) or free code (python): only the name is checked
    "browser": dict(_TOOLS, builtin_tools=["browser"], tool_choice="required", max_reasoning_tokens=4, seed=7,
                    max_tokens=64),
    "python": dict(_TOOLS, builtin_tools=["python"], tool_choice="python", max_reasoning_tokens=4, seed=8,
                   max_tokens=32),
})
BAD_REQUESTS: dict[str, tuple[dict[str, Any], str]] = {
    "bad schema JSON": (dict(response_format={"type": "json_schema", "json_schema": {"schema": "{not json"}}),
                        "response_format.json_schema.schema_json is not valid JSON"),
    "unknown type": (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "strng"}}}),
                     "response_format.json_schema.schema_json.type must be one of"),
    # passes the router's checks; the replica's xgrammar compile refuses it
    "dangling $ref": (dict(response_format={"type": "json_schema", "json_schema": {
        "schema": {"$ref": "#/$defs/missing"}}}), "response_format: unsupported or invalid json_schema"),
    "invalid regex": (dict(response_format={"type": "regex", "regex": "[a-"}),
                      "response_format: unsupported or invalid regex"),
    "invalid grammar": (dict(response_format={"type": "grammar", "grammar": 'start ::= "a"'}),
                        "response_format: unsupported or invalid grammar"),
    "unknown tool": (dict(tools=[STRICT_WEATHER], tool_choice="get_stock"),
                     "tool_choice.name 'get_stock' names no declared tool"),
    "required without tools": (dict(tool_choice="required"), "tool_choice.mode REQUIRED needs at least one tool"),
    "negative budget": (dict(max_reasoning_tokens=-1), "max_reasoning_tokens must be >= 0"),
}


@pytest.fixture(scope="module")
def answers(cluster) -> dict[str, Answer]:
    """Every request of REQUESTS and BAD_REQUESTS, sent concurrently; name -> its answer."""

    async def one(client: AsyncClient, options: dict[str, Any]) -> Answer:
        options = dict(options)
        answer = Answer()
        try:
            async for response in client.chat(options.pop("messages", "Hi."), **options):
                answer.responses.append(response)
        except grpc.RpcError as exc:
            answer.error = exc
        return answer

    async def main() -> dict[str, Answer]:
        named = {**REQUESTS, **{name: options for name, (options, _) in BAD_REQUESTS.items()}}
        async with AsyncClient(cluster, timeout=600) as client:
            done = await asyncio.gather(*(one(client, options) for options in named.values()))
        return dict(zip(named, done, strict=True))

    start = time.monotonic()
    out = asyncio.run(main())
    print(f"{len(out)} chat requests in {time.monotonic() - start:.1f} s")
    return out


@pytest.mark.parametrize("budget", BUDGETS)
def test_json_schemas_with_a_reasoning_budget(answers, budget):
    with_analysis, at_budget = 0, 0
    for i, schema in enumerate(SCHEMAS):
        a = answers[f"schema{i}-budget{budget}"].raise_error()
        final = a.text(pb.CHANNEL_FINAL)
        try:
            jsonschema.validate(json.loads(final), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            raise AssertionError(f"schema {i}, budget {budget}: {exc}\n{a.describe()}") from None
        assert a.last.finish_reason == pb.FINISH_REASON_STOP, (i, a.describe())
        assert not a.calls and not a.text(pb.CHANNEL_UNSPECIFIED) and not a.text(pb.CHANNEL_COMMENTARY)
        assert a.last.usage.completion_tokens == len(a.ids)
        body = _analysis_body_tokens(a.ids)
        assert body <= budget, (i, body, a.describe())
        if budget == 0:
            assert a.ids[:3] == get_tokenizer().encode("<|channel|>final<|message|>", allow_special_tokens=True)
            assert not a.text(pb.CHANNEL_ANALYSIS) and a.last.usage.reasoning_tokens == 0, (i, a.describe())
        elif body:
            with_analysis += 1
            at_budget += body == budget
            analysis = [r for r in a.responses if r.channel == pb.CHANNEL_ANALYSIS]
            assert analysis and all(not r.HasField("tool_call") for r in analysis)
            # usage counts the analysis body, exactly what the budget bounds
            assert a.last.usage.reasoning_tokens == body, (i, a.last.usage, body)
        else:
            assert a.last.usage.reasoning_tokens == 0
    if budget:
        assert with_analysis >= 5, "the model was free to reason: several answers should have some analysis"
        assert at_budget >= 1, "some analysis should run into the budget (closed there, then the answer follows)"


def test_regexes_and_grammars(answers):
    cases = [(f"regex{i}", regex) for i, regex in enumerate(REGEXES)] + \
            [(f"grammar{i}", pattern) for i, (_, pattern) in enumerate(GRAMMARS)]
    for name, pattern in cases:
        a = answers[name].raise_error()
        assert a.last.finish_reason == pb.FINISH_REASON_STOP, (name, a.describe())
        assert full_match(pattern, a.text(pb.CHANNEL_FINAL)), (name, a.describe())
        assert not a.calls


@pytest.mark.parametrize(("name", "tool", "schema"), [
    ("required", "get_weather", WEATHER_TOOL["parameters"]),
    ("named", "get_time", TIME_TOOL["parameters"]),
    ("named-object", "get_weather", WEATHER_TOOL["parameters"]),
    ("required-two", None, None),
])
def test_required_or_named_tool_is_always_called(answers, name, tool, schema):
    a = answers[name].raise_error()
    assert a.last.finish_reason == pb.FINISH_REASON_TOOL_CALL, a.describe()
    assert len(a.calls) == 1 and not a.text(pb.CHANNEL_FINAL), a.describe()
    call = a.calls[0]
    if tool is None:  # REQUIRED with two tools: either one, following its own schema
        tool = call["name"]
        schema = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}[tool]["parameters"]
    assert call["name"] == tool, a.describe()
    jsonschema.validate(json.loads(call["arguments"]), schema)
    assert all(r.channel == pb.CHANNEL_COMMENTARY for r in a.responses if r.HasField("tool_call"))


def test_tool_choice_none_answers_instead(answers):
    a = answers["none-json"].raise_error()
    assert not a.calls and a.last.finish_reason == pb.FINISH_REASON_STOP, a.describe()
    jsonschema.validate(json.loads(a.text(pb.CHANNEL_FINAL)), SCHEMAS[3])
    a = answers["none-text"].raise_error()
    assert not a.calls and a.last.finish_reason != pb.FINISH_REASON_TOOL_CALL, a.describe()
    assert a.text(pb.CHANNEL_FINAL) and not a.text(pb.CHANNEL_ANALYSIS), a.describe()


def test_builtin_tools_are_called_by_their_recipients(answers):
    a = answers["browser"].raise_error()
    assert a.calls and a.calls[0]["name"] in BROWSER, a.describe()
    a = answers["python"].raise_error()
    assert a.calls and a.calls[0]["name"] == "python", a.describe()


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_invalid_requests_get_invalid_argument(answers, name):
    error = answers[name].error
    assert error is not None, answers[name].describe()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert BAD_REQUESTS[name][1] in error.details(), error.details()


def test_server_keeps_serving_after_invalid_requests(answers, cluster):
    with Client(cluster, timeout=120) as client:
        for options, _ in BAD_REQUESTS.values():
            with pytest.raises(grpc.RpcError) as info:
                list(client.chat("Hi.", **options))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        out = list(client.chat("Hi.", response_format={"type": "regex", "regex": REGEXES[1]},
                               max_reasoning_tokens=0, max_tokens=50, seed=3))
    assert out[-1].finish_reason == pb.FINISH_REASON_STOP
    assert full_match(REGEXES[1], "".join(r.text for r in out if r.channel == pb.CHANNEL_FINAL))


def test_cli_chat_with_a_json_schema(cluster, tmp_path, capsys):
    from gptoss_cluster.cluster.cli import main

    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMAS[0]))
    assert main(["chat", "--address", cluster, "--json-schema", str(schema_file), "--max-reasoning-tokens", "0",
                 "--max-tokens", "200", "--seed", "1", "Who are you?"]) == 0
    captured = capsys.readouterr()
    jsonschema.validate(json.loads(captured.out), SCHEMAS[0])
    assert "(0 reasoning)" in captured.err
    assert main(["chat", "--address", cluster, "--regex", REGEXES[0], "--max-reasoning-tokens", "0",
                 "--max-tokens", "50", "Code?"]) == 0
    assert re.fullmatch(REGEXES[0], capsys.readouterr().out.strip())
