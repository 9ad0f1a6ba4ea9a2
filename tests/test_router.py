"""The gRPC router over real gRPC on loopback, without Ray: the tiny model in-process (ReplicaCore) and scripted
replicas (exact harmony token sequences), through the same GptossServer the Router deployment runs.

Covers: Generate / Chat streaming, harmony channel deltas and tool calls, Tokenize against openai-harmony,
validation errors, cancellation and deadlines freeing KV blocks, health (readiness, draining), reflection, auth,
message size limits, metrics, and the retry on another replica before the first token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from openai_harmony import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

from gptoss_cluster.cluster.client import Client
from gptoss_cluster.cluster.contract import (
    Accepted,
    Delta,
    ErrorCode,
    ReplicaRequest,
    ReplicaState,
    Usage,
)
from gptoss_cluster.cluster.metrics import Metrics
from gptoss_cluster.cluster.replica import ReplicaCore, ReplicaSettings
from gptoss_cluster.cluster.router.errors import RouterError
from gptoss_cluster.cluster.router.grpc_service import INFERENCE_SERVICE
from gptoss_cluster.cluster.router.settings import RouterSettings
from gptoss_cluster.cluster.router.testing import ScriptedReplica, ServerThread
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from gptoss_cluster.workers.harmony import get_encoding, get_tokenizer
from gptoss_cluster.workers.sampling import SamplingParams

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CONTEXT = 1024


def _encode(text: str) -> list[int]:
    return get_tokenizer().encode(text, allow_special_tokens=True)


ANALYSIS_THEN_FINAL = ("<|channel|>analysis<|message|>The user greets.<|end|>"
                       "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>")
FUNCTION_CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
                 "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                 "<|message|>{\"city\": \"Paris\"}<|call|>")
BROWSER_CALL = "<|channel|>analysis to=browser.search code<|message|>{\"query\": \"gpt-oss\"}<|call|>"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(checkpoints):
    """Two in-process replicas of the tiny model behind one router (real engine, real KV cache)."""
    settings = ReplicaSettings(model=str(checkpoints["tiny-hf"]), dtype="float32",
                               engine={"num_blocks": 256, "max_model_len": CONTEXT, "max_num_seqs": 32})
    from gptoss_cluster.workers.engine import LocalExecutor

    first = ReplicaCore(settings, replica_id="app#ModelReplica#r0")
    # the second replica shares the weights but has its own KV pools and engine
    second = ReplicaCore(settings, replica_id="app#ModelReplica#r1",
                         executor=LocalExecutor(first.executor.model, True), model_config=first.model_config)
    metrics = Metrics()
    st = ServerThread()
    address = st.start([first, second], RouterSettings(host="127.0.0.1", port=0, health_interval_s=0.1,
                                                       metrics_port=0), metrics)
    yield {"address": address, "st": st, "cores": [first, second], "metrics": metrics}
    for core in (first, second):
        st.run(core.shutdown())
    st.stop()


@pytest.fixture(scope="module")
def client(tiny):
    with Client(tiny["address"], timeout=60) as c:
        yield c


def _scripted_server(*replicas, **settings):
    st = ServerThread()
    address = st.start(list(replicas), RouterSettings(host="127.0.0.1", port=0, health_interval_s=0.05,
                                                      **settings))
    return st, address


def _collect(stream):
    out = list(stream)
    ids = [t for r in out for t in r.token_ids]
    return out, ids


def _wait_free(client, timeout=15.0):
    """Until every replica holds no request and all KV blocks are free again (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replicas = client.list_replicas()
        if all(r.running_requests == 0 and r.waiting_requests == 0 and r.kv_blocks_free == r.kv_blocks_total
               for r in replicas):
            return replicas
        time.sleep(0.05)
    raise AssertionError(f"KV blocks not freed: {client.list_replicas()}")


# ------------------------------------------------------------------------------------------------ Generate
def test_generate_token_ids_streams_exactly_max_tokens(client):
    out, ids = _collect(client.generate([200006, 1428, 200008, 13225], max_tokens=13, ignore_eos=True,
                                        temperature=0))
    assert len(ids) == 13
    assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert out[-1].usage.prompt_tokens == 4 and out[-1].usage.completion_tokens == 13
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in out[:-1])
    assert "".join(r.text for r in out) == get_tokenizer().decode(ids)
    assert len({r.request_id for r in out}) == 1 and out[0].request_id


def test_generate_text_greedy_is_deterministic_and_stop_strings_cut(client):
    _, first = _collect(client.generate("The capital of France is", max_tokens=24, temperature=0, ignore_eos=True))
    _, again = _collect(client.generate("The capital of France is", max_tokens=24, temperature=0, ignore_eos=True))
    assert first == again
    text = get_tokenizer().decode(first)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip()
    out, _ = _collect(client.generate("The capital of France is", max_tokens=24, temperature=0, ignore_eos=True,
                                      stop=[stop]))
    streamed = "".join(r.text for r in out)
    assert streamed == text[:text.index(stop)]
    assert out[-1].finish_reason == pb.FINISH_REASON_STOP



def test_router_and_offline_engine_stop_at_the_same_place(tiny, client):
    """Stop strings have one implementation (workers.stop_strings): the router applies it to a served request, the
    offline engine (which holds a tokenizer) to its own; with the same stop strings and min_tokens both texts end at
    the same character, and a stop string that appears before min_tokens tokens does not count in either."""
    from gptoss_cluster.workers.engine import Engine, EngineConfig

    tok = get_tokenizer()
    prompt = tok.encode("The capital of France is")
    free, ids = _collect(client.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True))
    text = tok.decode(ids)
    engine = Engine.from_model(tiny["cores"][0].executor.model, EngineConfig(num_blocks=64, max_model_len=CONTEXT),
                               tokenizer=tok)
    early = tok.decode(ids[:2])[-2:]  # a stop string inside the first two tokens' text
    late = text[len(text) // 2:len(text) // 2 + 3]
    assert text.count(early) == 1
    for stop, min_tokens in ((late, 0), (early, 0), (early, 6)):
        served, _ = _collect(client.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                                             min_tokens=min_tokens))
        offline = engine.generate([(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                           stop=(stop,), min_tokens=min_tokens))])[0]
        assert "".join(r.text for r in served) == offline.text, (stop, min_tokens)
        stopped = offline.finish_reason == "stop"
        assert (served[-1].finish_reason == pb.FINISH_REASON_STOP) == stopped
        assert stopped == (min_tokens == 0) and offline.stop_reason == (stop if stopped else None)
    assert len(offline.text) > text.index(early)  # min_tokens let the early occurrence pass (no later one)


def test_generate_logprobs_and_seed(client):
    out, ids = _collect(client.generate([1, 2, 3], max_tokens=5, ignore_eos=True, logprobs=3, seed=7,
                                        temperature=0.8))
    lps = [lp for r in out for lp in r.logprobs]
    assert [lp.token_id for lp in lps] == ids
    assert all(len(lp.top) == 3 and lp.logprob <= 0 for lp in lps)
    _, again = _collect(client.generate([1, 2, 3], max_tokens=5, ignore_eos=True, seed=7, temperature=0.8))
    assert again == ids


# ------------------------------------------------------------------------------------------------ Chat
def test_chat_logprobs_ride_on_each_delta(client):
    out, ids = _collect(client.chat("hi", max_tokens=12, logprobs=2, temperature=0.7, seed=3))
    assert ids and all(len(r.logprobs) == len(r.token_ids) for r in out)
    lps = [lp for r in out for lp in r.logprobs]
    assert [lp.token_id for lp in lps] == ids and all(len(lp.top) == 2 and lp.logprob <= 0 for lp in lps)
    plain, _ = _collect(client.chat("hi", max_tokens=4))
    assert not any(r.logprobs for r in plain)  # only when asked for


def test_chat_on_the_tiny_model_ends_with_usage(client):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    out, ids = _collect(client.chat(messages, max_tokens=12, temperature=0))
    final = out[-1]
    assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP, pb.FINISH_REASON_TOOL_CALL)
    assert final.usage.prompt_tokens == len(client.tokenize(messages=messages))
    assert final.usage.completion_tokens == len(ids) <= 12


def test_chat_channel_deltas_and_reasoning_usage():
    script = _encode(ANALYSIS_THEN_FINAL)
    st, address = _scripted_server(ScriptedReplica(script))
    try:
        with Client(address, timeout=30) as c:
            out, ids = _collect(c.chat("hi", max_tokens=100))
    finally:
        st.stop()
    assert ids == script  # every token exactly once, in order
    text = {ch: "".join(r.text for r in out if r.channel == ch) for ch in (pb.CHANNEL_ANALYSIS, pb.CHANNEL_FINAL)}
    assert text == {pb.CHANNEL_ANALYSIS: "The user greets.", pb.CHANNEL_FINAL: "Hello there!"}
    channels = [r.channel for r in out if r.text]
    assert channels == sorted(channels)  # analysis deltas, then final deltas
    final = out[-1]
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert final.usage.reasoning_tokens == len(_encode("The user greets."))  # the body, as the budget counts
    assert final.usage.completion_tokens == len(script)


@pytest.mark.parametrize(("script", "name", "channel", "arguments"), [
    (FUNCTION_CALL, "get_weather", pb.CHANNEL_COMMENTARY, {"city": "Paris"}),
    (BROWSER_CALL, "browser.search", pb.CHANNEL_ANALYSIS, {"query": "gpt-oss"}),
])
def test_chat_tool_call(script, name, channel, arguments):
    tokens = _encode(script)
    replica = ScriptedReplica(tokens)
    st, address = _scripted_server(replica)
    try:
        with Client(address, timeout=30) as c:
            out, ids = _collect(c.chat("Weather in Paris?", tools=[{"name": "get_weather", "description": "Weather",
                                                                    "parameters": WEATHER}],
                                       builtin_tools=["browser"], max_tokens=200))
    finally:
        st.stop()
    assert ids == tokens
    calls = [r for r in out if r.HasField("tool_call")]
    assert calls and calls[0].tool_call.name == name and calls[0].tool_call.id.startswith("call_")
    assert all(r.tool_call.index == 0 and r.channel == channel for r in calls)
    assert all(not r.tool_call.name for r in calls[1:])
    assert json.loads("".join(r.tool_call.arguments_delta for r in calls)) == arguments
    assert out[-1].finish_reason == pb.FINISH_REASON_TOOL_CALL
    # chat requests stop on harmony's <|return|> and <|call|>
    assert sorted(replica.started[0].eos_token_ids) == [200002, 200012]


@pytest.mark.parametrize("interval", [1, 4])
def test_stream_interval_sends_the_first_token_alone_then_deltas_of_that_many(interval):
    """RouterSettings.stream_interval (vLLM's --stream-interval): the first token at once, then at least `interval`
    tokens per message, the last message whatever is left; nothing lost or reordered, text and chat channels
    intact."""
    script = _encode(ANALYSIS_THEN_FINAL)
    replica = ScriptedReplica(script, step_s=0.002)  # one token per replica item
    st, address = _scripted_server(replica, stream_interval=interval)
    try:
        with Client(address, timeout=30) as c:
            generated, generated_ids = _collect(c.generate([1, 2, 3], max_tokens=10, ignore_eos=True))
            chat, chat_ids = _collect(c.chat("hi", max_tokens=100))
    finally:
        st.stop()
    assert generated_ids == (script * 2)[:10]
    assert [len(r.token_ids) for r in generated] == ([1] * 10 if interval == 1 else [1, 4, 4, 1])
    assert "".join(r.text for r in generated) == get_tokenizer().decode((script * 2)[:10])
    assert generated[-1].finish_reason == pb.FINISH_REASON_LENGTH and generated[-1].usage.completion_tokens == 10
    assert chat_ids == script
    text = {ch: "".join(r.text for r in chat if r.channel == ch) for ch in (pb.CHANNEL_ANALYSIS, pb.CHANNEL_FINAL)}
    assert text == {pb.CHANNEL_ANALYSIS: "The user greets.", pb.CHANNEL_FINAL: "Hello there!"}
    assert chat[-1].finish_reason == pb.FINISH_REASON_STOP and chat[-1].usage.completion_tokens == len(script)
    messages_with_tokens = sum(1 for r in chat if r.token_ids)
    expected = len(script) if interval == 1 else 1 + -(-(len(script) - 1) // interval)
    assert messages_with_tokens <= expected + 2  # a delta crossing a channel boundary is split at it


def test_cli_bench_against_a_router_prints_every_level(tmp_path, capsys):
    """`gptoss-cluster bench`: each level's requests all stream their tokens; the table and the JSON agree."""
    from gptoss_cluster.cluster.cli import main

    replica = ScriptedReplica(step_s=0.001)
    st, address = _scripted_server(replica)
    try:
        out = tmp_path / "bench.json"
        code = main(["bench", "--address", address, "--concurrency", "1,4", "--num-requests", "6", "--input-len", "5",
                     "--output-len", "3", "--json", str(out)])
        printed = capsys.readouterr().out
    finally:
        st.stop()
    assert code == 0, printed
    rows = [line.split("|")[1:-1] for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].strip() for row in rows] == ["concurrency", "1", "4"]
    assert all(int(row[1]) == 6 and int(row[2]) == 0 for row in rows[1:])  # requests, errors
    levels = json.loads(out.read_text())["levels"]
    assert {k: (v["requests"], v["errors"]) for k, v in levels.items()} == {"1": (6, 0), "4": (6, 0)}
    assert len(replica.started) == 12 and all(len(r.prompt_token_ids) == 5 for r in replica.started)
    assert all(r.sampling.max_tokens == 3 for r in replica.started)


def test_cli_bench_without_a_router_fails_in_seconds(capsys, monkeypatch):
    from gptoss_cluster.cluster import bench
    from gptoss_cluster.cluster.cli import main
    from tests.tools import free_port

    monkeypatch.setattr(bench, "CONNECT_TIMEOUT_S", 2.0)
    start = time.monotonic()
    assert main(["bench", "--address", f"127.0.0.1:{free_port()}", "--concurrency", "1"]) == 1
    assert time.monotonic() - start < 2.0 + 5
    assert "no router answers" in capsys.readouterr().err


def test_chat_garbled_output_degrades_to_plain_text():
    tokens = [200005, 200005, 200008] + get_tokenizer().encode(" plain words")
    st, address = _scripted_server(ScriptedReplica(tokens))
    try:
        with Client(address, timeout=30) as c:
            out, ids = _collect(c.chat("hi", max_tokens=len(tokens)))
    finally:
        st.stop()
    assert ids == tokens
    assert "".join(r.text for r in out) == " plain words"
    assert {r.channel for r in out} == {pb.CHANNEL_UNSPECIFIED}


# ------------------------------------------------------------------------------------------------ Tokenize / info
def test_tokenize_chat_equals_openai_harmony(client):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Weather in Paris?"}]
    ids = client.tokenize(messages=messages, tools=[{"name": "get_weather", "description": "Gets the weather",
                                                     "parameters": WEATHER}], reasoning_effort="high")
    developer = DeveloperContent.new().with_instructions("Be terse.").with_function_tools(
        [ToolDescription.new("get_weather", "Gets the weather", WEATHER)])
    conversation = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.HIGH)),
        Message.from_role_and_content(Role.DEVELOPER, developer),
        Message.from_role_and_content(Role.USER, "Weather in Paris?"),
    ])
    assert ids == get_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)
    plain = client.tokenize(messages=[{"role": "user", "content": "hi"}])
    reference = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.MEDIUM)),
        Message.from_role_and_content(Role.USER, "hi")])
    assert plain == get_encoding().render_conversation_for_completion(reference, Role.ASSISTANT)
    assert client.tokenize(text="Hello world") == get_tokenizer().encode("Hello world")


def test_model_info(client):
    info = client.model_info()
    assert (info.vocab_size, info.context_length, info.num_layers, info.num_experts) == (201088, CONTEXT, 4, 8)
    assert info.num_replicas == 2 and info.kv_block_size == 16 and info.shards_per_replica == 1


# ------------------------------------------------------------------------------------------------ bad requests
def _bad_generate(**kw):
    return pb.GenerateRequest(**kw)


BAD = [
    ("Chat", pb.ChatRequest(), grpc.StatusCode.INVALID_ARGUMENT, "messages is empty"),
    ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="robot", content="x")]), grpc.StatusCode.INVALID_ARGUMENT,
     "messages[0]: unknown role 'robot'"),
    ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")],
                            tools=[pb.FunctionTool(name="f", parameters_json="{not json")]),
     grpc.StatusCode.INVALID_ARGUMENT, "tools[0].parameters_json is not valid JSON"),
    ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")],
                            tools=[pb.FunctionTool(name="f", parameters_json='{"type": "strang"}')]),
     grpc.StatusCode.INVALID_ARGUMENT, "tools[0].parameters_json.type"),
    ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")],
                            tools=[pb.FunctionTool(name="f", parameters_json='{"required": "city"}')]),
     grpc.StatusCode.INVALID_ARGUMENT, "tools[0].parameters_json.required"),
    ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")],
                            tools=[pb.FunctionTool(name="bad name!")]),
     grpc.StatusCode.INVALID_ARGUMENT, "tools[0].name"),
    ("Generate", _bad_generate(), grpc.StatusCode.INVALID_ARGUMENT, "prompt: set text or token_ids"),
    ("Generate", _bad_generate(text=""), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
    ("Generate", _bad_generate(token_ids=pb.TokenIds(ids=[5, 201088])), grpc.StatusCode.INVALID_ARGUMENT,
     "token_ids.ids[1]: token id 201088 is outside the vocabulary"),
    ("Generate", _bad_generate(token_ids=pb.TokenIds(ids=[-3])), grpc.StatusCode.INVALID_ARGUMENT,
     "token_ids.ids[0]: token id -3"),
    ("Generate", _bad_generate(token_ids=pb.TokenIds(ids=[1] * CONTEXT)), grpc.StatusCode.INVALID_ARGUMENT,
     f"the prompt has {CONTEXT} tokens; the context holds {CONTEXT}"),
    ("Generate", _bad_generate(token_ids=pb.TokenIds(ids=[1] * 10), sampling=pb.SamplingParams(max_tokens=CONTEXT)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens: the prompt (10 tokens) + max_tokens (1024) exceed"),
    ("Generate", _bad_generate(text="x", sampling=pb.SamplingParams(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ("Generate", _bad_generate(text="x", sampling=pb.SamplingParams(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.top_p"),
    ("Generate", _bad_generate(text="x", sampling=pb.SamplingParams(max_tokens=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    ("Generate", _bad_generate(text="x", sampling=pb.SamplingParams(logprobs=50)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.logprobs"),
    ("Generate", _bad_generate(text="x", sampling=pb.SamplingParams(presence_penalty=3)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.presence_penalty"),
    ("Generate", _bad_generate(text="x", sampling=pb.SamplingParams(stop_token_ids=[999999])),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop_token_ids[0]"),
    ("Generate", _bad_generate(text="x", timeout_seconds=-1), grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
    ("Generate", _bad_generate(text="x", request_id="x" * 500), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    ("Tokenize", pb.TokenizeRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input: set text or chat"),
]


@pytest.mark.parametrize(("method", "request_", "code", "message"), BAD, ids=[b[3][:40] for b in BAD])
def test_malformed_requests_get_a_clear_status(client, method, request_, code, message):
    call = getattr(client.inference, method)
    with pytest.raises(grpc.RpcError) as info:
        result = call(request_, timeout=30)
        if method in ("Generate", "Chat"):
            list(result)
    assert info.value.code() == code
    assert message in info.value.details()


def test_oversized_message_and_server_keeps_serving(client):
    with pytest.raises(grpc.RpcError) as info:
        client.tokenize(text="x" * (9 * 1024 * 1024))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _, ids = _collect(client.generate([1, 2, 3], max_tokens=2, ignore_eos=True))
    assert len(ids) == 2


# ------------------------------------------------------------------------------------------------ cancel / deadline
def test_cancel_mid_stream_frees_kv_blocks(client):
    stream = client.generate([1, 2, 3, 4] * 20, max_tokens=600, ignore_eos=True)
    got = 0
    for response in stream:
        got += len(response.token_ids)
        if got >= 3:
            break
    busy = client.list_replicas()
    assert sum(r.running_requests for r in busy) == 1
    assert any(r.kv_blocks_free < r.kv_blocks_total for r in busy)
    stream.cancel()
    _wait_free(client)


@pytest.mark.parametrize("how", ["timeout_seconds", "grpc_deadline"])
def test_deadline_exceeded_frees_kv_blocks(client, how):
    kw = {"timeout_seconds": 0.4} if how == "timeout_seconds" else {}
    call = client.inference.Generate(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7] * 40), sampling=pb.SamplingParams(max_tokens=900,
                                                                                           ignore_eos=True), **kw),
        timeout=0.4 if how == "grpc_deadline" else 30)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    _wait_free(client)


# ------------------------------------------------------------------------------------------------ health, reflection
def test_health_and_reflection(tiny):
    with grpc.insecure_channel(tiny["address"]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", INFERENCE_SERVICE):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"gptoss.v1.Inference", "gptoss.v1.Admin", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_inference_health_follows_replica_readiness():
    replica = ScriptedReplica([1, 2, 3], state=ReplicaState.STARTING)
    st = ServerThread()
    address = st.start([replica], RouterSettings(host="127.0.0.1", port=0, health_interval_s=0.05),
                       wait_ready=False)
    try:
        with Client(address, timeout=10) as c:
            time.sleep(0.3)
            assert c.health("") == "SERVING"
            assert c.health(INFERENCE_SERVICE) == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                list(c.generate([1], max_tokens=1))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            replica.state = ReplicaState.RUNNING
            deadline = time.monotonic() + 5
            while c.health(INFERENCE_SERVICE) != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.health(INFERENCE_SERVICE) == "SERVING"
            replica.state = ReplicaState.UNHEALTHY
            deadline = time.monotonic() + 5
            while c.health(INFERENCE_SERVICE) != "NOT_SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.health(INFERENCE_SERVICE) == "NOT_SERVING"
    finally:
        st.stop()


def test_drain_flips_health_first_and_lets_running_streams_finish():
    replica = ScriptedReplica([11, 12, 13], step_s=0.05)
    st, address = _scripted_server(replica)
    try:
        with Client(address, timeout=30) as c:
            stream = c.generate([1, 2], max_tokens=20, ignore_eos=True)
            first = next(stream)
            drained: dict[str, object] = {}
            thread = threading.Thread(target=lambda: drained.setdefault("ok", st.run(st.server.drain(10))))
            thread.start()
            deadline = time.monotonic() + 5
            while not st.server.core.draining and time.monotonic() < deadline:
                time.sleep(0.01)
            assert c.health("") == "NOT_SERVING" and c.health(INFERENCE_SERVICE) == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                list(c.generate([1], max_tokens=1))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details()
            rest = list(stream)  # the running stream still finishes
            thread.join(15)
            assert drained["ok"] is True
            assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 20
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        st.stop()


# ------------------------------------------------------------------------------------------------ auth, limits
def test_bearer_token_auth(monkeypatch):
    monkeypatch.setenv("GPTOSS_TEST_TOKEN", "s3cret")
    st, address = _scripted_server(ScriptedReplica([5]), auth_token_env="GPTOSS_TEST_TOKEN")
    monkeypatch.delenv("GPTOSS_AUTH_TOKEN", raising=False)
    try:
        for token, ok in ((None, False), ("wrong", False), ("s3cret", True)):
            with Client(address, token=token, timeout=10) as c:
                assert c.health("") == "SERVING"  # health is always open
                if ok:
                    assert c.model_info().model == "scripted"
                    assert len(_collect(c.generate([1], max_tokens=2))[1]) == 2
                    continue
                for call in (c.model_info, c.list_replicas, lambda: list(c.generate([1], max_tokens=1)),
                             lambda: c.tokenize(text="x")):
                    with pytest.raises(grpc.RpcError) as info:
                        call()
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "bearer token" in info.value.details()
    finally:
        st.stop()


def test_small_message_limit_answers_resource_exhausted():
    st, address = _scripted_server(ScriptedReplica([5]), max_message_bytes=4096)
    try:
        with Client(address, timeout=10) as c:
            with pytest.raises(grpc.RpcError) as info:
                list(c.chat("x" * 10_000, max_tokens=1))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(_collect(c.generate([1], max_tokens=1))[1]) == 1
    finally:
        st.stop()


# ------------------------------------------------------------------------------------------------ retry, metrics
def test_replica_failing_before_first_token_is_retried_on_another():
    a, b = ScriptedReplica([5], replica_id="r-a"), ScriptedReplica([6], replica_id="r-b")
    st, address = _scripted_server(a, b)
    try:
        with Client(address, timeout=10) as c:
            st.backend.failing.update({"r-a", "r-b"})
            # both fail once: the first choice fails, the retry goes to the other, which fails too -> UNAVAILABLE
            with pytest.raises(grpc.RpcError) as info:
                list(c.generate([1], max_tokens=2))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not st.backend.failing
            retried = 0
            for _ in range(6):  # whichever replica is picked first, the request succeeds on r-b
                st.backend.failing.add("r-a")
                _, ids = _collect(c.generate([1], max_tokens=3))
                assert ids == [6, 6, 6]
                retried += "r-a" not in st.backend.failing
            assert retried >= 1 and a.requests_total == 0
    finally:
        st.stop()


def test_request_metrics_are_recorded(tiny, client):
    _collect(client.generate([1, 2], max_tokens=3, ignore_eos=True))
    text = tiny["metrics"].render().decode()
    assert 'gptoss_requests_total{code="OK",method="Generate",protocol="grpc"}' in text
    assert "gptoss_time_to_first_token_seconds_bucket" in text
    assert 'gptoss_replicas{state="running"} 2.0' in text


def test_metrics_port_serves_the_exposition(checkpoints):
    metrics = Metrics()
    st = ServerThread()
    address = st.start([ScriptedReplica([5])], RouterSettings(host="127.0.0.1", port=0, metrics_port=0,
                                                              health_interval_s=0.05), metrics)
    try:
        from gptoss_cluster.cluster.metrics import start_metrics_server

        server = start_metrics_server(0, "127.0.0.1", metrics=metrics)
        with Client(address, timeout=10) as c:
            _collect(c.generate([1], max_tokens=1))
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
        server.close()
        assert "gptoss_requests_total" in body
    finally:
        st.stop()


def test_tls(tmp_path):
    crypto = pytest.importorskip("cryptography")
    del crypto
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    st, address = _scripted_server(ScriptedReplica([5]), tls_cert_file=str(tmp_path / "cert.pem"),
                                   tls_key_file=str(tmp_path / "key.pem"))
    port = address.rsplit(":", 1)[1]
    try:
        with Client(f"localhost:{port}", root_certificates=pem, timeout=10) as c:
            assert c.model_info().model == "scripted"
            assert len(_collect(c.generate([1], max_tokens=2))[1]) == 2
        with Client(address, timeout=5) as plain, pytest.raises(grpc.RpcError) as info:
            plain.model_info()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        st.stop()


def test_replica_records_engine_stats_and_expert_counts(tiny, client):
    core = tiny["cores"][0]
    metrics = Metrics()
    core.metrics, core.settings.stats_interval_s = metrics, 0.05
    try:
        tiny["st"].run(_start_background(core))
        _collect(client.generate([9, 8, 7, 6], max_tokens=4, ignore_eos=True))
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = metrics.render().decode()
            if "gptoss_expert_routed_tokens_total{" in text and 'replica="r0"' in text:
                break
            time.sleep(0.05)
        assert 'gptoss_kv_cache_usage_ratio{replica="r0"}' in text
        assert "gptoss_expert_routed_tokens_total{" in text
    finally:
        tiny["st"].run(_stop_background(core))
        core.metrics = None


async def _start_background(core):
    core.start_background()


async def _stop_background(core):
    task, core._stats_task = core._stats_task, None
    if task is not None:
        task.cancel()


# ------------------------------------------------------------------------------------------------ replica coalescing
async def _replica_items(core, request, hold_after_first: bool):
    """The replica's items for `request`; with `hold_after_first`, stop reading after the first token until the
    engine has finished the request (a consumer that fell behind: every other output is queued by then)."""
    items = []
    async for item in core.generate(request):
        items.append(item)
        if hold_after_first and len(items) == 2:
            deadline = time.monotonic() + 120
            while core.engine.has_unfinished_requests():
                assert time.monotonic() < deadline, "the engine did not finish the request"
                await asyncio.sleep(0.01)
            # the step thread drops the request from the engine, then hands its last output to this loop
            # (call_soon_threadsafe): give that hand-off time to land in the stream's queue
            await asyncio.sleep(0.2)
    return items


def test_replica_coalesces_queued_outputs_into_one_item(tiny):
    """The first token goes out on its own; whatever queued up behind a slow consumer goes out as one item, with
    the same tokens, logprobs, finish reason and usage as one item per token."""
    core = tiny["cores"][0]

    def request(rid):
        return ReplicaRequest(rid, [5, 6, 7] * 7, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0,
                                                                 logprobs=1))

    steady = tiny["st"].run(_replica_items(core, request("steady"), False))
    held = tiny["st"].run(_replica_items(core, request("held"), True))
    assert steady[0] == held[0] == Accepted(core.replica_id)
    assert [len(i.token_ids) for i in held[1:]] == [1, 11]
    tokens = [t for i in steady[1:] for t in i.token_ids]
    assert [t for i in held[1:] for t in i.token_ids] == tokens and len(tokens) == 12
    assert [lp.token_id for i in held[1:] for lp in i.logprobs] == tokens
    assert held[-1].finish_reason == steady[-1].finish_reason == "length"
    assert held[-1].usage.completion_tokens == 12 and held[1].usage is None
    assert all(i.finish_reason is None for i in held[1:-1])


# ------------------------------------------------------------------------------------------------ the router's body
class _TimedBackend:
    """A backend whose replica streams `token` at the times `script` gives (seconds to wait before each item)."""

    def __init__(self, script, token: int = 5) -> None:
        self.script, self.token = script, token

    async def stream(self, request):
        yield Accepted("r0")
        for i, wait in enumerate(self.script):
            await asyncio.sleep(wait)
            last = i == len(self.script) - 1
            yield Delta([self.token], finish_reason="length" if last else None,
                        usage=Usage(len(request.prompt_token_ids), i + 1, 0) if last else None)

    async def replica_stats(self):
        return [ScriptedReplica(replica_id="r0", max_ongoing_requests=8).stats()]

    async def model_info(self):
        return ScriptedReplica().model_info()


async def _body_server(script, metrics=None):
    """The router's core over a backend that streams on a timetable (no gRPC, no Ray)."""
    from gptoss_cluster.cluster.router.core import RouterCore

    core = RouterCore(_TimedBackend(script), RouterSettings(), metrics)
    await core.refresh()
    assert core.ready_replicas == 1
    return core


def _generate(n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7] * 20), sampling=pb.SamplingParams(max_tokens=n))


def _codes(metrics: Metrics) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    return {s.labels["code"]: s.value for s in families["gptoss_requests"].samples if s.name.endswith("_total")}


def test_deadline_while_waiting_for_the_replica_is_deadline_exceeded():
    """The router's own deadline fires while it waits for the next token (the replica stalls): DEADLINE_EXCEEDED
    with the usual message, and the consuming task is left with no cancellation pending."""
    async def main():
        metrics = Metrics()
        server = await _body_server([0.0, 30.0], metrics)
        got = []
        start = time.monotonic()
        with pytest.raises(RouterError) as info:
            async for response in server.generate_events(_generate(2), timeout=0.2):
                got.append(response)
        assert time.monotonic() - start < 5
        assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
        assert "passed while generating" in info.value.message
        assert [list(r.token_ids) for r in got] == [[5]]
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0.01)  # nothing left to cancel this task
        assert _codes(metrics) == {"DEADLINE_EXCEEDED": 1.0}
        assert server.inflight == 0 and server.admission.running == 0

    asyncio.run(main())


def test_deadline_passing_while_the_caller_is_busy_never_cancels_the_caller():
    """The deadline passes while the caller works on a response (not waiting for the replica): the caller's own
    awaits are not cancelled; its next wait for a token ends in DEADLINE_EXCEEDED. Before the deadline, tokens
    stream as usual."""
    async def main():
        server = await _body_server([0.0, 0.0, 0.0])
        responses = []
        with pytest.raises(RouterError) as info:
            async for response in server.generate_events(_generate(3), timeout=0.15):
                responses.append(response)
                await asyncio.sleep(0.3)  # past the deadline: must not raise CancelledError
        assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
        assert len(responses) == 1
        assert asyncio.current_task().cancelling() == 0

        fine = [r async for r in server.generate_events(_generate(3), timeout=30)]
        assert [list(r.token_ids) for r in fine] == [[5], [5], [5]]
        assert fine[-1].finish_reason == pb.FINISH_REASON_LENGTH and fine[-1].usage.completion_tokens == 3

    asyncio.run(main())


def test_caller_cancelled_while_waiting_with_a_deadline_stays_cancelled():
    """A cancellation from outside (the client went away) while the router waits under a deadline is not turned
    into DEADLINE_EXCEEDED: the task ends cancelled and the request is recorded as CANCELLED."""

    async def main():
        metrics = Metrics()
        server = await _body_server([0.0, 30.0], metrics)
        first = asyncio.Event()

        async def consume():
            async for _ in server.generate_events(_generate(2), timeout=20):
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 5)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _codes(metrics) == {"CANCELLED": 1.0}
        assert server.inflight == 0 and server.admission.running == 0

    asyncio.run(main())


def test_sampling_checks_repeat_for_the_same_settings():
    """Validated sampling settings are the engine's SamplingParams without the stop strings (those stay with the
    router), and the room left by a longer prompt still shrinks the default max_tokens or refuses an explicit one."""
    from gptoss_cluster.cluster.router.requests import Validator

    v = Validator(dataclasses.replace(ScriptedReplica().model_info(), context_length=300))
    s = pb.SamplingParams(temperature=0.0, stop_token_ids=[9], stop=["END"])
    a, stops = v.sampling(s, 10)
    b, _ = v.sampling(s, 10)
    assert a == b and isinstance(a, SamplingParams) and a.stop == () and stops == ("END",)
    assert a.stop_token_ids == (9,)
    assert a.max_tokens == 256 and v.sampling(s, 100)[0].max_tokens == 200  # default shrinks to fit
    explicit = pb.SamplingParams(max_tokens=250)
    assert v.sampling(explicit, 10)[0].max_tokens == 250
    with pytest.raises(RouterError, match="exceed the context of 300 tokens"):
        v.sampling(explicit, 100)
    bad = pb.SamplingParams(max_tokens=20, min_tokens=50)
    for _ in range(2):  # a failure is not remembered as a success
        with pytest.raises(RouterError, match=r"sampling\.min_tokens \(50\) must not exceed max_tokens \(20\)"):
            v.sampling(bad, 10)
    shrunk = pb.SamplingParams(min_tokens=250)  # fits the default 256 with a short prompt, not once it shrinks
    assert v.sampling(shrunk, 10)[0].min_tokens == 250
    with pytest.raises(RouterError, match="must not exceed max_tokens"):
        v.sampling(shrunk, 100)


@pytest.mark.parametrize(("method", "message", "streaming"), [
    ("Generate", pb.GenerateRequest(text="AAAA", sampling=pb.SamplingParams(max_tokens=2)), True),
    ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="AAAA")]), True),
    ("Tokenize", pb.TokenizeRequest(text="AAAA"), False),
])
def test_a_request_that_does_not_decode_is_invalid_argument(tiny, client, method, message, streaming):
    """A string field holding bytes that are not UTF-8 (protobuf refuses to decode it): INVALID_ARGUMENT with the
    reason, not grpc.aio's UNKNOWN, and the server goes on serving."""
    raw = message.SerializeToString().replace(b"AAAA", b"\xff\xfe\xfd\xfc")
    with grpc.insecure_channel(tiny["address"]) as channel:
        path = f"/{INFERENCE_SERVICE}/{method}"
        identity = dict(request_serializer=lambda data: data, response_deserializer=lambda data: data)
        call = channel.unary_stream(path, **identity) if streaming else channel.unary_unary(path, **identity)
        with pytest.raises(grpc.RpcError) as error:
            result = call(raw, timeout=30)
            if streaming:
                list(result)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert "could not be decoded" in error.value.details()
    assert client.tokenize("hi")  # still serving
