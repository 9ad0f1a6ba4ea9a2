"""The OpenAI-compatible HTTP API through the official `openai` client (sync and async, whole and streamed), over
loopback.

The main flows run against a real local Ray cluster, the way `gptoss-cluster serve` runs it: one module-scoped node,
the Router deployment serving gRPC and HTTP on 127.0.0.1 with a bearer token, one ModelReplica of the tiny model.
What needs replicas that misbehave on cue (a full queue, none ready) and exact harmony sequences (tool-call shapes)
runs on the same GptossServer over scripted replicas in this process (cluster.router.testing).

Covers: chat completions (reasoning returned apart, usage, logprobs, the same answer whole / streamed / async),
structured outputs for every case of tests/structured_cases.py with reasoning budgets 0 and 32 sent concurrently,
the Responses API function-call round trip (whole and streamed, through the client's own stream accumulator),
completions, models, health, auth, errors in OpenAI's shape with the right statuses, and a client that goes away
mid-stream (or while waiting for a whole answer) freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import jsonschema
import openai
import pytest
from structured_cases import GRAMMARS, REGEXES, SCHEMAS, WEATHER_TOOL, full_match

from gptoss_cluster.cluster.client import Client
from gptoss_cluster.cluster.contract import ReplicaState
from gptoss_cluster.cluster.metrics import Metrics
from gptoss_cluster.cluster.router.settings import RouterSettings
from gptoss_cluster.cluster.router.testing import ScriptedReplica, ServerThread
from gptoss_cluster.workers.harmony import get_tokenizer
from tests.tools import free_port

TOKEN = "http-test-token"
TOKEN_ENV = "GPTOSS_HTTP_TEST_TOKEN"
MODEL = "tiny"
WEATHER_FN = {"type": "function", "name": WEATHER_TOOL["name"], "description": WEATHER_TOOL["description"],
              "parameters": WEATHER_TOOL["parameters"], "strict": True}
ANSWER = {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 20}},
          "required": ["summary"], "additionalProperties": False}


def _http(method: str, url: str, body: bytes | None = None, token: str | None = None) -> tuple[int, dict]:
    """A raw request (what the openai client would not send): (status, JSON body)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _encode(text: str) -> list[int]:
    return get_tokenizer().encode(text, allow_special_tokens=True)


def _wait(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# ================================================================================================ the Ray cluster
@pytest.fixture(scope="module")
def cluster(checkpoints):
    import ray

    from gptoss_cluster.cluster.app import AppConfig, LocalCluster

    if ray.is_initialized():  # a previous module's connection: this module starts its own node
        ray.shutdown()
    grpc_port, http_port = free_port(), free_port()
    config = AppConfig(model=str(checkpoints["tiny-hf"]), served_model_name=MODEL, dtype="float32", device="cpu",
                       num_replicas=1, shards_per_replica=1, max_ongoing_requests=128, grpc_port=grpc_port,
                       grpc_host="127.0.0.1", http_port=http_port, metrics_port=0, auth_token_env=TOKEN_ENV,
                       health_interval_s=0.2, routing_stats_period_s=0.5, graceful_shutdown_timeout_s=10,
                       engine={"num_blocks": 2048, "max_model_len": 2048, "max_num_seqs": 64})
    local = LocalCluster(config, ray_address="", dashboard_port=free_port(), num_cpus=4,
                         env_vars={TOKEN_ENV: TOKEN, "GPTOSS_NO_PROGRESS": "1"})
    try:
        local.start(ready_timeout_s=300)
        with Client(f"127.0.0.1:{grpc_port}", token=TOKEN, timeout=60) as grpc_client:
            yield {"base_url": f"http://127.0.0.1:{http_port}/v1", "url": f"http://127.0.0.1:{http_port}",
                   "grpc": grpc_client}
    finally:
        local.close()


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=cluster["base_url"], api_key=TOKEN, max_retries=0, timeout=180) as c:
        yield c


def _async_client(cluster, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cluster["base_url"], api_key=TOKEN, max_retries=0, timeout=300, **kw)


def _all_free(grpc_client: Client):
    replicas = grpc_client.list_replicas()
    return replicas if replicas and all(r.running_requests == 0 and r.waiting_requests == 0 and
                                        r.kv_blocks_free == r.kv_blocks_total for r in replicas) else []


# ------------------------------------------------------------------------------------------------ basics, auth
def test_models_health_and_auth(cluster, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert _http("GET", f"{cluster['url']}/health")[0] == 200  # open without the token
    with openai.OpenAI(base_url=cluster["base_url"], api_key="wrong", max_retries=0) as stranger, \
            pytest.raises(openai.AuthenticationError) as info:
        stranger.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401 and "invalid bearer token" in info.value.message
    status, body = _http("GET", f"{cluster['base_url']}/models")  # no token at all
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    assert "missing bearer token" in body["error"]["message"]


def test_chat_completion_whole_streamed_and_async_agree(cluster, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    kw = {"model": MODEL, "messages": messages, "max_tokens": 48, "temperature": 0}
    whole = client.chat.completions.create(**kw)
    choice, usage = whole.choices[0], whole.usage
    assert whole.object == "chat.completion" and whole.model == MODEL and choice.finish_reason in (
        "stop", "length", "tool_calls")
    assert usage.prompt_tokens == len(cluster["grpc"].tokenize(messages=messages))  # the same rendering as gRPC
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and 0 < usage.completion_tokens <= 48
    assert usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0
    message = choice.message.model_dump()
    assert message["reasoning"] == message["reasoning_content"]

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_dump().get("reasoning_content") or "") for c in chunks
                        if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == (choice.message.content or "") and reasoning == (message["reasoning_content"] or "")
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens

    async def run():
        async with _async_client(cluster) as aclient:
            answer = await aclient.chat.completions.create(**kw)
            streamed = [c async for c in await aclient.chat.completions.create(**kw, stream=True)]
            return answer, streamed

    answer, streamed = asyncio.run(run())
    assert answer.choices[0].message.content == choice.message.content
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == content


def test_chat_reasoning_budget_and_logprobs(client):
    none = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=24,
                                          extra_body={"max_reasoning_tokens": 0}, seed=1)
    assert none.choices[0].message.model_dump()["reasoning_content"] is None
    assert none.usage.completion_tokens_details.reasoning_tokens == 0
    probed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=24, logprobs=True, top_logprobs=2, seed=3,
                                            extra_body={"max_reasoning_tokens": 0, "min_tokens": 24,
                                                        "ignore_eos": True})
    content = probed.choices[0].logprobs.content
    assert content and all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 and lp.bytes is not None
                           for lp in content)


def test_completions_text_tokens_stream_and_logprobs(client):
    tok = get_tokenizer()
    whole = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(tok.encode("The capital of France is"))
    assert whole.usage.completion_tokens == 12
    streamed = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    ids = client.completions.create(model=MODEL, prompt=[200006, 1428, 200008, 13225], max_tokens=5, logprobs=2,
                                    extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 4
    lp = ids.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(len(t) <= 2 for t in lp.top_logprobs)


# ------------------------------------------------------------------------------------------------ structured outputs
def test_structured_outputs_concurrently(cluster):
    """Every schema, regex, grammar and the strict tool, each with reasoning budgets 0 and 32, all at once."""

    async def schema_case(c, i, schema, budget):
        r = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Give me example {i} as JSON."}], max_tokens=600,
            seed=100 + i, response_format={"type": "json_schema", "json_schema": {
                "name": f"case{i}", "schema": schema, "strict": True}},
            extra_body={"max_reasoning_tokens": budget})
        return r

    async def text_case(c, key, value, budget, seed):
        return await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Answer."}], max_tokens=300, seed=seed,
            extra_body={key: value, "max_reasoning_tokens": budget})

    async def tool_case(c, budget):
        return await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=300, seed=7,
            tools=[{"type": "function", "function": {**WEATHER_TOOL, "strict": True}}], tool_choice="required",
            extra_body={"max_reasoning_tokens": budget})

    async def run():
        async with _async_client(cluster) as c:
            jobs = []
            for budget in (0, 32):
                jobs += [("schema", schema, budget, schema_case(c, i, schema, budget))
                         for i, schema in enumerate(SCHEMAS)]
                jobs += [("regex", pattern, budget, text_case(c, "guided_regex", pattern, budget, 11))
                         for pattern in REGEXES]
                jobs += [("grammar", pattern, budget, text_case(c, "guided_grammar", grammar, budget, 13))
                         for grammar, pattern in GRAMMARS]
                jobs.append(("tool", WEATHER_TOOL["parameters"], budget, tool_case(c, budget)))
            results = await asyncio.gather(*(job[3] for job in jobs), return_exceptions=True)
            return [(kind, spec, budget, r) for (kind, spec, budget, _), r in zip(jobs, results, strict=True)]

    start = time.monotonic()
    results = asyncio.run(run())
    failures = []
    for kind, spec, budget, r in results:
        if isinstance(r, BaseException):
            failures.append((kind, spec, budget, repr(r)))
            continue
        choice = r.choices[0]
        message = choice.message.model_dump()
        reasoning = r.usage.completion_tokens_details.reasoning_tokens
        try:
            if budget == 0:
                assert message["reasoning_content"] is None and reasoning == 0
            else:  # the budget bounds the analysis body, which is what usage counts
                assert reasoning <= budget
            if kind == "tool":
                assert choice.finish_reason == "tool_calls"
                (call,) = choice.message.tool_calls
                assert call.function.name == "get_weather" and call.id
                jsonschema.validate(json.loads(call.function.arguments), spec)
            elif kind == "schema":
                assert choice.finish_reason == "stop"
                jsonschema.validate(json.loads(choice.message.content), spec)
            else:
                assert choice.finish_reason == "stop" and full_match(spec, choice.message.content)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append((kind, spec, budget, f"{type(exc).__name__}: {exc}", message, choice.finish_reason))
    assert not failures, failures[:3]
    print(f"{len(results)} structured requests in {time.monotonic() - start:.1f} s")


# ------------------------------------------------------------------------------------------------ Responses API
def test_responses_function_call_round_trip_whole(cluster, client):
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.responses.create(model=MODEL, input=question, tools=[WEATHER_FN], tool_choice="required",
                                    instructions="Use the tools.", max_output_tokens=300,
                                    extra_body={"max_reasoning_tokens": 16, "seed": 5})
    assert first.object == "response" and first.status == "completed" and first.id.startswith("resp_")
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    arguments = json.loads(calls[0].arguments)
    jsonschema.validate(arguments, WEATHER_TOOL["parameters"])
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    assert first.usage.output_tokens_details.reasoning_tokens <= 16
    for item in first.output:
        if item.type == "reasoning":
            assert item.content and item.content[0].type == "reasoning_text" and item.content[0].text

    # the round trip: the earlier output items, then the function's result
    history = question + first.output + [{"type": "function_call_output", "call_id": calls[0].call_id,
                                         "output": json.dumps({"temperature_c": 18, "sky": "clear"})}]
    second = client.responses.create(model=MODEL, input=history, tools=[WEATHER_FN], tool_choice="none",
                                     instructions="Use the tools.", max_output_tokens=300,
                                     text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER,
                                                      "strict": True}},
                                     extra_body={"max_reasoning_tokens": 16, "seed": 6})
    assert second.status == "completed"
    assert not [item for item in second.output if item.type == "function_call"]
    jsonschema.validate(json.loads(second.output_text), ANSWER)
    # the conversion rendered the same conversation a gRPC client would send
    reasoning = "".join(c.text for item in first.output if item.type == "reasoning" for c in item.content)
    expected = cluster["grpc"].tokenize(messages=[
        {"role": "system", "content": "Use the tools."}, question[0],
        {"role": "assistant", "reasoning": reasoning, "tool_calls": [
            {"id": calls[0].call_id, "function": {"name": "get_weather", "arguments": calls[0].arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].call_id, "name": "get_weather",
         "content": json.dumps({"temperature_c": 18, "sky": "clear"})}],
        tools=[{"name": WEATHER_TOOL["name"], "description": WEATHER_TOOL["description"],
                "parameters": WEATHER_TOOL["parameters"]}])
    assert second.usage.input_tokens == len(expected)


def test_builtin_browser_and_python_tools_come_back_as_calls_with_their_recipients(client):
    """harmony's own tool namespaces: `browser` / `python` (or the hosted-tool types they stand for); the client runs
    them, so their calls come back like function calls, named by recipient."""
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Look it up."}], tools=[{"type": "browser"}],
        tool_choice="required", max_tokens=60, extra_body={"max_reasoning_tokens": 0, "seed": 3})
    (call,) = chat.choices[0].message.tool_calls
    assert call.function.name in ("browser.search", "browser.open", "browser.find")
    response = client.responses.create(
        model=MODEL, input="Compute it.", tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
        tool_choice={"type": "function", "name": "python"}, max_output_tokens=40,
        extra_body={"max_reasoning_tokens": 0, "seed": 4})
    calls = [item for item in response.output if item.type == "function_call"]
    assert [c.name for c in calls] == ["python"]


def test_responses_function_call_round_trip_streamed(client):
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    events = list(client.responses.create(model=MODEL, input=question, tools=[WEATHER_FN], tool_choice="required",
                                          max_output_tokens=300, stream=True,
                                          extra_body={"max_reasoning_tokens": 8, "seed": 8}))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    done = [e.item for e in events if e.type == "response.output_item.done"]
    final = events[-1].response
    assert [item.id for item in done] == [item.id for item in final.output]
    (call,) = [item for item in final.output if item.type == "function_call"]
    streamed_args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert streamed_args == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])

    # the client's own accumulator (strict about item identities and ordering) over the second turn
    history = question + final.output + [{"type": "function_call_output", "call_id": call.call_id, "output": "8C"}]
    # tool_choice "none": the answer, never another call (with "auto" a random-weights model may call again)
    with client.responses.stream(model=MODEL, input=history, tools=[WEATHER_FN], tool_choice="none",
                                 max_output_tokens=300,
                                 text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER,
                                                  "strict": True}},
                                 extra_body={"max_reasoning_tokens": 0, "seed": 9}) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        answer = stream.get_final_response()
    assert answer.status == "completed" and answer.output_text == deltas
    jsonschema.validate(json.loads(answer.output_text), ANSWER)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("kwargs", "status", "message"), [
    ({"n": 2}, 400, "n must be 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "only text parts"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strang"}}}}, 400,
     "response_format.json_schema.schema_json"),
    ({"tools": [{"type": "function", "function": WEATHER_TOOL}], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, 400, "names no declared tool"),
    ({"max_tokens": 5000}, 400, "exceed the context"),
    ({"temperature": -1}, 400, "temperature"),
    ({"messages": "hi"}, 400, "messages"),
    ({"model": "gpt-4o"}, 404, "does not exist"),
], ids=["n", "role", "image", "schema", "tool_choice", "context", "temperature", "not-a-list", "model"])
def test_bad_requests_get_openai_errors(client, kwargs, status, message):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**body)
    assert info.value.status_code == status, info.value
    assert isinstance(info.value, openai.BadRequestError if status == 400 else openai.NotFoundError)
    assert message in info.value.message
    assert set(info.value.body) == {"message", "type", "param", "code"}


def test_malformed_bodies_and_unknown_routes_in_openai_shape(cluster):
    base = cluster["base_url"]
    bad_json = _http("POST", f"{base}/chat/completions", b"{not json", TOKEN)
    missing = _http("POST", f"{base}/responses", json.dumps({"model": MODEL}).encode(), TOKEN)
    route = _http("GET", f"{base}/embeddings", token=TOKEN)
    assert (bad_json[0], missing[0], route[0]) == (400, 400, 404)
    for _, body in (bad_json, missing, route):
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert missing[1]["error"]["param"] == "input"


# ------------------------------------------------------------------------------------------------ disconnects
def test_client_gone_mid_stream_or_while_waiting_frees_kv_blocks(cluster, client):
    grpc_client = cluster["grpc"]
    _wait(lambda: _all_free(grpc_client), 60, "idle replicas")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a story."}],
                                            max_tokens=1500, stream=True, extra_body={"ignore_eos": True,
                                                                                      "max_reasoning_tokens": 0})
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got >= 3:
            break
    busy = grpc_client.list_replicas()
    assert sum(r.running_requests for r in busy) == 1 and any(r.kv_blocks_free < r.kv_blocks_total for r in busy)
    stream.close()  # the client goes away mid-stream
    _wait(lambda: _all_free(grpc_client), 30, "the abandoned stream's KV blocks to be freed")

    with openai.OpenAI(base_url=cluster["base_url"], api_key=TOKEN, max_retries=0, timeout=1.5) as impatient, \
            pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="Once", max_tokens=1500, extra_body={"ignore_eos": True})
    _wait(lambda: _all_free(grpc_client), 30, "the abandoned request's KV blocks to be freed")
    # and the server keeps serving
    again = client.completions.create(model=MODEL, prompt="Once", max_tokens=3, extra_body={"ignore_eos": True})
    assert again.usage.completion_tokens == 3


def test_http_port_setting_from_args_and_cli(checkpoints, capsys):
    from pathlib import Path

    from gptoss_cluster.cluster.app import AppConfigError, parse_args, router_settings
    from gptoss_cluster.cluster.cli import _serve_config, build_parser, main

    schema = json.loads((Path(__file__).parents[1] / "helm/gptoss-cluster/files/serve-args.schema.json").read_text())
    config = parse_args({"model": "/m", "http_port": 8080})
    jsonschema.validate(config.chart_args(), schema)
    settings = router_settings(config)
    assert (settings["http_port"], settings["http_host"], parse_args({"model": "/m"}).http_port) == (8080, None, 8000)
    for args, message in [({"http_port": 70000}, "http_port: must be an integer"),
                          ({"http_port": 50051}, "http_port: must differ from grpc_port")]:
        with pytest.raises(AppConfigError, match=message):
            parse_args({"model": "/m", **args})
    cli = _serve_config(build_parser().parse_args(["serve", "--model", str(checkpoints["tiny-hf"]), "--http-port",
                                                   "0", "--host", "127.0.0.1"]))
    assert cli.http_port == 0 and router_settings(cli)["host"] == "127.0.0.1"
    assert router_settings(cli)["stream_interval"] == 1
    cli = _serve_config(build_parser().parse_args(["serve", "--model", str(checkpoints["tiny-hf"]),
                                                   "--stream-interval", "8"]))
    assert router_settings(cli)["stream_interval"] == 8
    assert main(["serve", "--http-port", "99999"]) == 2
    assert "--http-port" in capsys.readouterr().err


# ================================================================================================ scripted replicas
ANALYSIS_THEN_FINAL = ("<|channel|>analysis<|message|>The user greets.<|end|>"
                       "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>")
FUNCTION_CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
                 "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                 "<|message|>{\"city\": \"Paris\", \"unit\": \"c\"}<|call|>")


def _scripted(*replicas, metrics=None, wait_ready=True, **settings):
    st = ServerThread()
    st.start(list(replicas), RouterSettings(host="127.0.0.1", port=0, http_port=free_port(),
                                            health_interval_s=0.05, **settings), metrics, wait_ready=wait_ready)
    base = f"http://127.0.0.1:{st.server.http_port}"
    return st, base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)


def test_tool_call_shapes_chat_and_responses():
    st, _, c = _scripted(ScriptedReplica(_encode(FUNCTION_CALL)))
    tools = [{"type": "function", "function": WEATHER_TOOL}]
    try:
        whole = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Paris?"}],
                                          tools=tools, max_tokens=200)
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.model_dump()["reasoning_content"] == "Need the weather."
        (call,) = choice.message.tool_calls
        assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
            "function", "get_weather", {"city": "Paris", "unit": "c"})
        chunks = list(c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Paris?"}],
                                                tools=tools, max_tokens=200, stream=True))
        deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
        assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
        assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
        assert json.loads("".join(d.function.arguments for d in deltas)) == {"city": "Paris", "unit": "c"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        response = c.responses.create(model="scripted", input="Paris?", tools=[WEATHER_FN])
        assert [item.type for item in response.output] == ["reasoning", "function_call"]
        assert response.output[0].content[0].text == "Need the weather."
        assert response.output[1].call_id.startswith("call_") and response.output[1].name == "get_weather"
        assert json.loads(response.output[1].arguments) == {"city": "Paris", "unit": "c"}
    finally:
        st.stop()


def test_channels_and_metrics_are_recorded_with_protocol_http():
    metrics = Metrics()
    st, _, c = _scripted(ScriptedReplica(_encode(ANALYSIS_THEN_FINAL)), metrics=metrics)
    try:
        answer = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "Hello there!" and answer.choices[0].finish_reason == "stop"
        assert answer.choices[0].message.model_dump()["reasoning_content"] == "The user greets."
        with c.responses.stream(model="scripted", input="hi") as stream:
            kinds = [e.type for e in stream]
            final = stream.get_final_response()
        assert final.output_text == "Hello there!" and "response.reasoning_text.delta" in kinds
        c.completions.create(model="scripted", prompt="hi", max_tokens=2)
    finally:
        st.stop()
    text = metrics.render().decode()
    assert 'gptoss_requests_total{code="OK",method="Chat",protocol="http"} 2.0' in text
    assert 'gptoss_requests_total{code="OK",method="Generate",protocol="http"} 1.0' in text


def test_full_queue_is_429_with_retry_after_and_no_replica_is_503():
    busy = ScriptedReplica([5], step_s=0.05, max_ongoing_requests=1)
    st, base, c = _scripted(busy, max_queued_requests=0)
    try:
        stream = c.completions.create(model="scripted", prompt="x", max_tokens=200, stream=True)
        next(iter(stream))  # holds the only slot
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model="scripted", prompt="y", max_tokens=1)
        assert info.value.status_code == 429 and int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.body["code"] == "resource_exhausted"
        stream.close()
    finally:
        st.stop()

    st, base, c = _scripted(ScriptedReplica([5], state=ReplicaState.STARTING), wait_ready=False)
    try:
        time.sleep(0.3)
        assert _http("GET", f"{base}/health")[0] == 503
        with pytest.raises(openai.InternalServerError) as info:
            c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503 and "no model replica is ready" in info.value.message
    finally:
        st.stop()


def test_draining_router_answers_503():
    st, base, c = _scripted(ScriptedReplica([5]))
    try:
        assert _http("GET", f"{base}/health")[0] == 200
        assert st.run(st.server.drain(1)) is True
        assert _http("GET", f"{base}/health")[0] == 503
        with pytest.raises(openai.InternalServerError) as info:
            c.completions.create(model="scripted", prompt="x", max_tokens=1)
        assert info.value.status_code == 503 and "draining" in info.value.message
    finally:
        st.stop()


def test_http_port_taken_fails_the_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        st = ServerThread()
        try:
            with pytest.raises(OSError, match="cannot bind the HTTP server"):
                st.start([ScriptedReplica([5])], RouterSettings(host="127.0.0.1", port=0,
                                                                http_port=taken.getsockname()[1]))
        finally:
            st.stop()



# --------------------------------------------------------------------------------------------- text that is not Unicode
@pytest.fixture(scope="module")
def scripted_base():
    st, base, c = _scripted(ScriptedReplica(_encode(ANALYSIS_THEN_FINAL)))
    c.close()
    try:
        yield base
    finally:
        st.stop()


_CUT = "hi \ud800"  # a JavaScript string cut inside an emoji; json.dumps spells it as the escape "hi \\ud800"
_USER = [{"role": "user", "content": "x"}]


def _assert_openai_error(status: int, body: dict, param: str | None) -> dict:
    assert status == 400, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", body
    assert error["param"] == param, body
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("path", "body", "param"), [
    ("chat/completions", {"messages": [{"role": "user", "content": _CUT}]}, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": _CUT}]}]},
     "messages[0].content[0].text"),
    ("chat/completions", {"messages": _USER, "tools": [{"type": "function", "function": {"name": _CUT}}]},
     "tools[0].function.name"),
    ("chat/completions", {"messages": [*_USER, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": _CUT, "arguments": "{}"}}]}]},
     "messages[1].tool_calls[0].function.name"),
    ("chat/completions", {"messages": _USER, "stop": [_CUT]}, "stop[0]"),
    ("chat/completions", {"messages": _USER, "model": _CUT}, "model"),
    ("responses", {"input": _CUT}, "input"),
    ("responses", {"input": "x", "instructions": _CUT}, "instructions"),
    ("responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": _CUT}]}]},
     "input[0].content[0].text"),
    ("responses", {"input": [{"type": "function_call", "call_id": "c1", "name": _CUT, "arguments": "{}"}]},
     "input[0].name"),
    ("completions", {"prompt": _CUT}, "prompt"),
    ("completions", {"prompt": [_CUT]}, "prompt[0]"),
], ids=["chat-content", "chat-part", "chat-tool-name", "chat-call-name", "chat-stop", "chat-model",
        "responses-input", "responses-instructions", "responses-item", "responses-call-name", "prompt",
        "prompt-list"])
def test_lone_surrogates_are_400_naming_the_field(scripted_base, path, body, param, stream):
    raw = json.dumps({**body, "stream": stream})
    assert "\\ud800" in raw  # the escape, as JSON text: what such a client sends
    error = _assert_openai_error(*_http("POST", f"{scripted_base}/v1/{path}", raw.encode()), param)
    assert error["message"].startswith(f"{param} is not valid Unicode: it holds a lone surrogate U+D800"), error


def test_lone_surrogate_in_a_key_and_the_server_keeps_serving(scripted_base):
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {_CUT: {"type": "string"}}}}}
    status, body = _http("POST", f"{scripted_base}/v1/chat/completions",
                         json.dumps({"messages": _USER, "tools": [tool]}).encode())
    error = _assert_openai_error(status, body, "tools[0].function.parameters.properties")
    assert "has a key that is not valid Unicode" in error["message"]
    # pydantic refuses this one first (a number expected), quoting the key in the field path as U+FFFD: no 500
    status, body = _http("POST", f"{scripted_base}/v1/chat/completions",
                         json.dumps({"messages": _USER, "logit_bias": {_CUT: "x"}}).encode())
    assert status == 400 and body["error"]["param"].startswith("logit_bias.hi "), body
    # a surrogate pair (an emoji, escaped) is valid Unicode: it runs
    ok = json.dumps({"messages": [{"role": "user", "content": "hi \U0001F600"}], "max_tokens": 4})
    assert "\\ud83d\\ude00" in ok
    assert _http("POST", f"{scripted_base}/v1/chat/completions", ok.encode())[0] == 200


@pytest.mark.parametrize(("raw", "message", "param"), [
    (b'{"prompt": "\xff\xfe"}', "the body is not valid UTF-8 JSON", None),
    # UTF-8 bytes of a surrogate (CESU-8): Python's JSON decoder lets them through as a lone surrogate
    (b'{"prompt": "hi \xed\xa0\x80"}', "prompt is not valid Unicode", "prompt"),
    (b'{"prompt": "x",', "the body is not valid JSON: Expecting property name", None),
], ids=["not-utf8", "surrogate-bytes", "not-json"])
def test_bodies_that_are_not_utf8_json_are_400(scripted_base, raw, message, param):
    error = _assert_openai_error(*_http("POST", f"{scripted_base}/v1/completions", raw), param)
    assert error["message"].startswith(message), error


@pytest.mark.parametrize(("path", "body", "message", "param"), [
    ("chat/completions", {"messages": _USER, "logit_bias": {"5": 1}}, "logit_bias is not supported", "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias is not supported", "logit_bias"),
    ("chat/completions", {"messages": _USER, "tool_choice": "always"},
     "tool_choice must be one of auto, none, required or a function, got 'always'", "tool_choice"),
    ("chat/completions", {"messages": _USER, "reasoning_effort": "max"},
     "reasoning_effort must be one of none, minimal, low, medium, high, xhigh, got 'max'", "reasoning_effort"),
    ("chat/completions", {"messages": _USER, "response_format": {"type": "yaml"}},
     "response_format.type must be text, json_object or json_schema, got 'yaml'", "response_format.type"),
    ("chat/completions", {"messages": _USER, "max_completion_tokens": 10**12},
     "max_completion_tokens is out of range: 1000000000000 (a 32-bit integer)", "max_completion_tokens"),
    ("responses", {"input": "x", "reasoning": {"effort": "max"}},
     "reasoning.effort must be one of none, minimal, low, medium, high, xhigh, got 'max'", "reasoning.effort"),
    ("responses", {"input": "x", "max_output_tokens": 10**12},
     "max_output_tokens is out of range: 1000000000000 (a 32-bit integer)", "max_output_tokens"),
    ("completions", {"prompt": "x", "seed": 2**64}, f"seed is out of range: {2**64} (a 64-bit integer)", "seed"),
    ("completions", {"prompt": [1, 2**40]}, "prompt: Value out of range: 1099511627776", "prompt"),
], ids=["chat-logit_bias", "completions-logit_bias", "tool_choice", "reasoning_effort", "response_format",
        "max_completion_tokens", "reasoning.effort", "max_output_tokens", "seed", "token-id"])
def test_our_invalid_request_messages_are_verbatim_with_param(scripted_base, path, body, message, param):
    """No "a value is out of range:" prefix on the converter's own messages (it used to wrap every error raised
    while building the request, up to twice), and `param` names the field."""
    for stream in (False, True):
        raw = json.dumps({**body, "stream": stream}).encode()
        error = _assert_openai_error(*_http("POST", f"{scripted_base}/v1/{path}", raw), param)
        assert error["message"] == message, error
