"""OpenAI request bodies -> gptoss.v1 request messages (pure: no I/O, no server state).

The HTTP front door converts here and nothing more: the pb.ChatRequest / pb.GenerateRequest it gets goes through the
same `Validator` as a gRPC request (harmony rendering, sampling checks, the structured-output constraint), so both
wire formats mean exactly the same. What OpenAI's shapes allow but this server cannot honour (n > 1, images,
logit_bias, stored responses) is refused here as `InvalidRequest`, naming the parameter.

Bodies are pydantic models: FastAPI checks the scalar types; unknown fields are accepted and ignored, as OpenAI's own
optional fields are. Messages, tools and input items are read by hand so that an error names the exact path
(`messages[2].tool_calls[0].function.arguments`). vLLM-style extras are accepted on every endpoint: `top_k`,
`min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `priority`, `request_id`,
`max_reasoning_tokens` (chat and responses) and, for chat, `guided_json` / `guided_regex` / `guided_grammar`.

Every conversion first checks that each string of the body, at any depth, is valid Unicode (`check_text`): JSON can
spell a lone UTF-16 surrogate (`"\\ud800"`, a JavaScript string cut inside an emoji), which no UTF-8 text holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb

__all__ = ["ChatCompletionRequest", "CompletionRequest", "InvalidRequest", "ResponsesRequest", "chat_request",
           "check_text", "completion_request", "responses_request"]

# OpenAI's effort names -> harmony's three levels ("none"/"minimal" still reason a little: harmony has no "off";
# max_reasoning_tokens 0 is the way to skip the analysis).
_EFFORTS = {"none": pb.REASONING_EFFORT_LOW, "minimal": pb.REASONING_EFFORT_LOW, "low": pb.REASONING_EFFORT_LOW,
            "medium": pb.REASONING_EFFORT_MEDIUM, "high": pb.REASONING_EFFORT_HIGH,
            "xhigh": pb.REASONING_EFFORT_HIGH}
_TOOL_MODES = {"auto": pb.ToolChoice.MODE_AUTO, "none": pb.ToolChoice.MODE_NONE,
               "required": pb.ToolChoice.MODE_REQUIRED}
_TEXT_PARTS = ("text", "input_text", "output_text")
# What JSON's "\ud800" escape decodes to (and what invalid UTF-8 bytes ED A0 80 decode to: Python's JSON decoder reads
# bytes with "surrogatepass"). Protobuf, the tokenizer and the JSON answer all refuse such a string with a
# UnicodeEncodeError, so it is refused up front, by name.
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidRequest(ValueError):
    """A body this server cannot run (HTTP 400); `param` names the field, OpenAI-style (`messages[0].content`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


# ================================================================================================ bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    # sampling, every endpoint (OpenAI's own plus vLLM-style extras)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    priority: int = 0
    request_id: str = ""
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(_Body):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_reasoning_tokens: int | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None


class CompletionRequest(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None
    n: int | None = None
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class ResponsesRequest(_Body):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    reasoning: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    max_reasoning_tokens: int | None = None
    previous_response_id: str | None = None
    background: bool | None = None


# ================================================================================================ conversions
def chat_request(body: ChatCompletionRequest) -> pb.ChatRequest:
    """POST /v1/chat/completions -> Chat."""
    check_text(body)
    if body.n not in (None, 1):
        raise InvalidRequest(f"n must be 1 (one choice per request), got {body.n}", "n")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
    messages = [_chat_message(i, m) for i, m in enumerate(body.messages)]
    tools, builtin = _tools(body.tools, flat=False, strict=False)
    max_tokens = ("max_completion_tokens", body.max_completion_tokens) if body.max_completion_tokens is not None \
        else ("max_tokens", body.max_tokens)
    return _build(lambda: pb.ChatRequest(
        request_id=body.request_id, messages=messages, tools=tools, builtin_tools=builtin,
        priority=_int(body.priority, "priority"), reasoning_effort=_effort(body.reasoning_effort, "reasoning_effort"),
        sampling=_sampling(body, max_tokens, ("top_logprobs", (body.top_logprobs or 0) if body.logprobs else None)),
        response_format=_chat_response_format(body), tool_choice=_tool_choice(body.tool_choice),
        max_reasoning_tokens=_int(body.max_reasoning_tokens, "max_reasoning_tokens")))


def completion_request(body: CompletionRequest) -> pb.GenerateRequest:
    """POST /v1/completions -> Generate (one prompt: text or token ids)."""
    check_text(body)
    if body.n not in (None, 1) or body.best_of not in (None, 1):
        raise InvalidRequest("n and best_of must be 1 (one choice per request)", "n" if body.n not in (None, 1)
                             else "best_of")
    if body.echo:
        raise InvalidRequest("echo is not supported", "echo")
    if body.suffix:
        raise InvalidRequest("suffix is not supported", "suffix")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequest(f"one prompt per request, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, list) and not prompt:
        raise InvalidRequest("prompt is empty", "prompt")
    sampling = _sampling(body, ("max_tokens", body.max_tokens), ("logprobs", body.logprobs))
    priority = _int(body.priority, "priority")
    if isinstance(prompt, str):
        return pb.GenerateRequest(request_id=body.request_id, text=prompt, sampling=sampling, priority=priority)
    return _build(lambda: pb.GenerateRequest(request_id=body.request_id, token_ids=pb.TokenIds(ids=prompt),
                                             sampling=sampling, priority=priority), "prompt")


def responses_request(body: ResponsesRequest) -> pb.ChatRequest:
    """POST /v1/responses -> Chat: `instructions` + `input` items become the conversation."""
    check_text(body)
    if body.previous_response_id:
        raise InvalidRequest("previous_response_id is not supported: responses are not stored; send the earlier "
                             "output items back in `input`", "previous_response_id")
    if body.background:
        raise InvalidRequest("background responses are not supported", "background")
    messages = [pb.ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    if isinstance(body.input, str):
        messages.append(pb.ChatMessage(role="user", content=body.input))
    else:
        messages += _input_items(body.input)
    tools, builtin = _tools(body.tools, flat=True, strict=True)
    effort = (body.reasoning or {}).get("effort")
    text_format = (body.text or {}).get("format")
    return _build(lambda: pb.ChatRequest(
        request_id=body.request_id, messages=messages, tools=tools, builtin_tools=builtin,
        priority=_int(body.priority, "priority"), reasoning_effort=_effort(effort, "reasoning.effort"),
        sampling=_sampling(body, ("max_output_tokens", body.max_output_tokens), ("logprobs", None)),
        response_format=_response_format(text_format, "text.format", flat=True),
        tool_choice=_tool_choice(body.tool_choice),
        max_reasoning_tokens=_int(body.max_reasoning_tokens, "max_reasoning_tokens")))


# ================================================================================================ pieces
def check_text(body: BaseModel) -> None:
    """Every string of `body` (values and keys, at any depth, ignored extras too) must be valid Unicode: raises
    InvalidRequest naming the first one that is not (`messages[0].content`)."""
    todo: list[tuple[str, Any]] = list(body)[::-1]  # (path, value), a stack: no recursion limit on deep JSON
    while todo:
        where, value = todo.pop()
        if isinstance(value, str):
            if found := _SURROGATE.search(value):
                raise InvalidRequest(f"{where} is not valid Unicode: it holds a lone surrogate "
                                     f"U+{ord(found.group()):04X} at character {found.start()} (a string cut inside "
                                     "a surrogate pair?)", where)
        elif isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and _SURROGATE.search(key):
                    raise InvalidRequest(f"{where} has a key that is not valid Unicode: {key!r}", where)
            todo += [(f"{where}.{key}", item) for key, item in reversed(value.items())]
        elif isinstance(value, list):
            todo += [(f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value)))]


def _build(make: Callable[[], Any], param: str | None = None) -> Any:
    """`make()`, with protobuf's own range checks (a repeated int32 field given 10**12) as InvalidRequest."""
    try:
        return make()
    except InvalidRequest:
        raise  # ours, raised while building a part: already names its parameter
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{param}: {exc}" if param else f"a value is out of range: {exc}", param) from None


def _int(value: int | None, param: str, bits: int = 32) -> int | None:
    """An integer for a protobuf int32 / int64 field, range-checked here so that the error names the parameter."""
    limit = 1 << (bits - 1)
    if value is not None and not -limit <= value < limit:
        raise InvalidRequest(f"{param} is out of range: {value} (a {bits}-bit integer)", param)
    return value


def _sampling(body: _Body, max_tokens: tuple[str, int | None], logprobs: tuple[str, int | None]) -> pb.SamplingParams:
    """`max_tokens` and `logprobs` are (the parameter's name in this endpoint, value)."""
    if body.logit_bias:
        raise InvalidRequest("logit_bias is not supported", "logit_bias")
    values = {"temperature": body.temperature, "top_p": body.top_p, "seed": _int(body.seed, "seed", 64),
              "max_tokens": _int(max_tokens[1], max_tokens[0]), "presence_penalty": body.presence_penalty,
              "frequency_penalty": body.frequency_penalty, "top_k": _int(body.top_k, "top_k"), "min_p": body.min_p,
              "repetition_penalty": body.repetition_penalty, "min_tokens": _int(body.min_tokens, "min_tokens"),
              "logprobs": _int(logprobs[1], logprobs[0])}
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    return _build(lambda: pb.SamplingParams(**{k: v for k, v in values.items() if v is not None}, stop=stop,
                                            stop_token_ids=body.stop_token_ids or (), ignore_eos=body.ignore_eos),
                  "stop_token_ids")  # the one field left to protobuf's range check


def _effort(value: Any, param: str) -> int:
    if value is None:
        return pb.REASONING_EFFORT_UNSPECIFIED
    if value not in _EFFORTS:
        raise InvalidRequest(f"{param} must be one of {', '.join(_EFFORTS)}, got {value!r}", param)
    return _EFFORTS[value]


def _text(content: Any, where: str) -> str:
    """A content field: a string, or a list of text parts (joined by newlines)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}[{j}]: only text parts are supported, got {kind!r}", f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def _string(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string", where)
    return value


def _arguments(value: Any, where: str) -> str:
    if isinstance(value, (dict, list)):  # lenient: an object instead of its JSON text
        return json.dumps(value)
    return _string(value, where)


def _chat_message(i: int, m: Any) -> pb.ChatMessage:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise InvalidRequest(f"{where} must be an object", where)
    # the role itself is checked by the Validator (with the gRPC path's message)
    out = pb.ChatMessage(role=_string(m.get("role"), f"{where}.role"), content=_text(m.get("content"),
                                                                                      f"{where}.content"))
    if m.get("role") == "assistant":
        # vLLM returns the analysis as reasoning_content (older: reasoning); either comes back in history
        out.reasoning = _string(m.get("reasoning_content") or m.get("reasoning"), f"{where}.reasoning_content")
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            raise InvalidRequest(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
        for j, call in enumerate(calls):
            at = f"{where}.tool_calls[{j}]"
            fn = _unwrap_function(call, at)
            out.tool_calls.append(pb.ToolCall(id=_string(call.get("id"), f"{at}.id"),
                                              name=_string(fn.get("name"), f"{at}.function.name"),
                                              arguments=_arguments(fn.get("arguments"), f"{at}.function.arguments")))
    elif m.get("role") == "tool":
        out.tool_call_id = _string(m.get("tool_call_id"), f"{where}.tool_call_id")
        out.name = _string(m.get("name"), f"{where}.name")
    return out


# harmony's built-in tool namespaces, by their harmony names and by the OpenAI hosted-tool types they stand for; their
# calls come back as tool calls named by recipient ("browser.search", "python"), run by the client
_BUILTIN_TOOL_TYPES = {"browser": "browser", "web_search": "browser", "web_search_preview": "browser",
                       "python": "python", "code_interpreter": "python"}


def _tools(tools: Any, flat: bool, strict: bool) -> tuple[list[pb.FunctionTool], list[str]]:
    """The request's `tools` -> (function tools, built-in namespaces)."""
    functions: list[pb.FunctionTool] = []
    builtin: list[str] = []
    for i, t in enumerate(tools or ()):
        where = f"tools[{i}]"
        if isinstance(t, dict) and t.get("type") in _BUILTIN_TOOL_TYPES:
            name = _BUILTIN_TOOL_TYPES[t["type"]]
            if name not in builtin:
                builtin.append(name)
            continue
        functions.append(_function_tool(_unwrap_function(t, where, flat=flat), where if flat else f"{where}.function",
                                        strict=strict))
    return functions, builtin


def _unwrap_function(t: Any, where: str, flat: bool = False) -> dict[str, Any]:
    """A function tool or call: chat's {"type": "function", "function": {...}}, or the Responses API's flat form."""
    if not isinstance(t, dict):
        raise InvalidRequest(f"{where} must be an object", where)
    if t.get("type", "function") != "function":
        raise InvalidRequest(f"{where}.type: function, browser (web_search_preview) or python (code_interpreter) "
                             f"tools are supported, got {t.get('type')!r}",
                             f"{where}.type")
    fn = t.get("function")
    if fn is None and flat:
        return t
    if not isinstance(fn, dict):
        raise InvalidRequest(f"{where}.function must be an object", f"{where}.function")
    return fn


def _function_tool(fn: dict[str, Any], where: str, strict: bool) -> pb.FunctionTool:
    name = _string(fn.get("name"), f"{where}.name")
    if not name:
        raise InvalidRequest(f"{where}.name is required", f"{where}.name")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest(f"{where}.parameters must be a JSON Schema object", f"{where}.parameters")
    # `strict` defaults differ: false for chat completions, true for the Responses API (as OpenAI's)
    return pb.FunctionTool(name=name, description=_string(fn.get("description"), f"{where}.description"),
                           parameters_json=json.dumps(params) if params is not None else "",
                           strict=bool(fn["strict"]) if fn.get("strict") is not None else strict)


def _tool_choice(value: Any) -> pb.ToolChoice | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in _TOOL_MODES:
            raise InvalidRequest(f"tool_choice must be one of {', '.join(_TOOL_MODES)} or a function, got {value!r}",
                                 "tool_choice")
        return pb.ToolChoice(mode=_TOOL_MODES[value])
    if value.get("type") != "function":
        raise InvalidRequest(f"tool_choice.type: only 'function' is supported, got {value.get('type')!r}",
                             "tool_choice.type")
    fn = value.get("function") if isinstance(value.get("function"), dict) else value  # chat: nested; responses: flat
    name = _string(fn.get("name"), "tool_choice.name")
    if not name:
        raise InvalidRequest("tool_choice names no function", "tool_choice")
    return pb.ToolChoice(name=name)


def _chat_response_format(body: ChatCompletionRequest) -> pb.ResponseFormat | None:
    given = [(k, v) for k, v in (("response_format", body.response_format), ("guided_json", body.guided_json),
                                 ("guided_regex", body.guided_regex), ("guided_grammar", body.guided_grammar))
             if v is not None and not (k == "response_format" and v.get("type") == "text")]
    if len(given) > 1:
        raise InvalidRequest(f"give one output format, got {', '.join(k for k, _ in given)}", given[1][0])
    if not given:
        return None
    key, value = given[0]
    if key == "guided_json":
        return pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(
            name="guided_json", schema_json=value if isinstance(value, str) else json.dumps(value)))
    if key == "guided_regex":
        return pb.ResponseFormat(regex=value)
    if key == "guided_grammar":
        return pb.ResponseFormat(grammar=value)
    return _response_format(value, "response_format", flat=False)


def _response_format(fmt: Any, where: str, flat: bool) -> pb.ResponseFormat | None:
    """{"type": "text" | "json_object" | "json_schema", ...}: chat nests the schema under `json_schema`, the
    Responses API's text.format holds it flat."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequest(f"{where} must be an object", where)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return pb.ResponseFormat(json_object=True)
    if kind != "json_schema":
        raise InvalidRequest(f"{where}.type must be text, json_object or json_schema, got {kind!r}", f"{where}.type")
    spec = fmt if flat else fmt.get("json_schema")
    at = where if flat else f"{where}.json_schema"
    if not isinstance(spec, dict):
        raise InvalidRequest(f"{at} must be an object", at)
    schema = spec.get("schema")
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest(f"{at}.schema must be a JSON Schema object", f"{at}.schema")
    return pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(
        name=_string(spec.get("name"), f"{at}.name"), schema_json=json.dumps(schema),
        strict=bool(spec.get("strict")), description=_string(spec.get("description"), f"{at}.description")))


def _input_items(items: list[dict[str, Any]]) -> list[pb.ChatMessage]:
    """Responses API input items -> chat messages. Reasoning items attach to the assistant turn that follows;
    consecutive function calls form one assistant turn; a function_call_output answers its call_id."""
    out: list[pb.ChatMessage] = []
    reasoning = ""
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = _string(item.get("role"), f"{where}.role")
            message = pb.ChatMessage(role=role, content=_text(item.get("content"), f"{where}.content"))
            if role == "assistant":
                message.reasoning, reasoning = reasoning, ""
            out.append(message)
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            if not isinstance(parts, list):
                raise InvalidRequest(f"{where}.content must be a list of reasoning_text parts", f"{where}.content")
            reasoning += "".join(_string(p.get("text"), f"{where}.content") for p in parts if isinstance(p, dict))
        elif kind == "function_call":
            call = pb.ToolCall(id=_string(item.get("call_id"), f"{where}.call_id"),
                               name=_string(item.get("name"), f"{where}.name"),
                               arguments=_arguments(item.get("arguments"), f"{where}.arguments"))
            if out and out[-1].role == "assistant" and out[-1].tool_calls and not reasoning:
                out[-1].tool_calls.append(call)
            else:
                out.append(pb.ChatMessage(role="assistant", reasoning=reasoning, tool_calls=[call]))
                reasoning = ""
        elif kind == "function_call_output":
            output = item.get("output")
            out.append(pb.ChatMessage(role="tool", tool_call_id=_string(item.get("call_id"), f"{where}.call_id"),
                                      content=output if isinstance(output, str) else _text(output, f"{where}.output")))
        else:
            raise InvalidRequest(f"{where}.type {kind!r} is not supported (message, reasoning, function_call, "
                                 "function_call_output)", f"{where}.type")
    if reasoning:
        out.append(pb.ChatMessage(role="assistant", reasoning=reasoning))
    return out
