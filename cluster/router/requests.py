"""gptoss.v1 requests -> what a replica runs, validated at the edge with messages that name the field.

Every problem raises `RouterError(INVALID_ARGUMENT, message)` (`cluster.router.errors.invalid`), whatever the
transport. The checks need the model's facts (`ModelInfo`: vocab size, context length), which the router learns from
a replica, never from the model directory. A validated request is a `Prepared`: the `ReplicaRequest` of
`cluster.contract` it becomes, and what stays with the router (stop strings, min_tokens for them, the timeout).

A chat's structured-output fields (response_format, tool_choice, max_reasoning_tokens, strict tools) become a
`workers.constraint.Constraint` (`constraint_from_chat`); the replica compiles it (xgrammar), which has the final word
on what a grammar supports and answers INVALID_ARGUMENT otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gptoss_cluster.cluster.contract import ModelInfo, ReplicaRequest, lora_name_problem
from gptoss_cluster.cluster.router.errors import invalid
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from gptoss_cluster.workers.constraint import BUILTIN_RECIPIENTS, Constraint
from gptoss_cluster.workers.harmony import Tokenizer, get_tokenizer, render_chat
from gptoss_cluster.workers.sampling import SamplingParams

__all__ = ["Prepared", "Validator", "DEFAULT_SAMPLING", "constraint_from_chat"]

# Server defaults for fields a request leaves unset (before the deployment's `sampling_defaults`).
DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 256}
_EFFORTS = {pb.REASONING_EFFORT_LOW: "low", pb.REASONING_EFFORT_MEDIUM: "medium", pb.REASONING_EFFORT_HIGH: "high"}
_OPTIONAL_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed",
                      "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs")
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_TOOL_CHOICE_MODES = {pb.ToolChoice.MODE_AUTO: "auto", pb.ToolChoice.MODE_NONE: "none",
                      pb.ToolChoice.MODE_REQUIRED: "required"}
MAX_REQUEST_ID = 128


@dataclass(slots=True)
class Prepared:
    """A validated request: what the replica runs (`replica_request`) and what the router keeps (the stop strings,
    which it applies to the text once `min_tokens` are out, and the request's own timeout)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams  # without stop strings: those stay on the router
    stop: tuple[str, ...] = ()
    priority: int = 0
    timeout_s: float | None = None
    eos_token_ids: tuple[int, ...] | None = None
    constraint: Constraint | None = None
    lora: str | None = None  # the LoRA adapter that runs it (None: the base model)

    @property
    def min_tokens(self) -> int:
        return self.sampling.min_tokens

    def replica_request(self, deadline: float | None, prefix_hashes: tuple[bytes, ...] = (),
                        trace_context: dict[str, str] | None = None,
                        exclude_replicas: tuple[str, ...] = ()) -> ReplicaRequest:
        """`deadline`: wall-clock seconds (time.time()), or None; `exclude_replicas`: those not serving its adapter."""
        return ReplicaRequest(self.request_id, self.prompt_token_ids, self.sampling, priority=self.priority,
                              deadline=deadline, eos_token_ids=self.eos_token_ids, constraint=self.constraint,
                              prefix_hashes=prefix_hashes, exclude_replicas=exclude_replicas,
                              trace_context=trace_context, lora=self.lora)


def _check_schema(where: str, schema: Any, depth: int = 0) -> None:
    """Structural JSON-Schema checks (the parts tool calling relies on); jsonschema's meta-check when present."""
    if depth > 32:
        raise invalid(f"{where}: schema nested too deeply")
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise invalid(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        for k in kinds:
            if k not in _JSON_TYPES:
                raise invalid(f"{where}.type must be one of {sorted(_JSON_TYPES)}, got {k!r}")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise invalid(f"{where}.properties must be an object, got {type(props).__name__}")
        for name, sub in props.items():
            _check_schema(f"{where}.properties.{name}", sub, depth + 1)
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise invalid(f"{where}.required must be a list of property names")
    items = schema.get("items")
    if items is not None:
        _check_schema(f"{where}.items", items, depth + 1)
    enum = schema.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise invalid(f"{where}.enum must be a list")


def _meta_check(where: str, schema: Any) -> None:
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "".join(f"[{p!r}]" for p in exc.path)
        raise invalid(f"{where} is not a valid JSON Schema{' at ' + path if path else ''}: {exc.message}") from None


def _json_schema_text(where: str, text: str) -> str:
    """A JSON Schema given as JSON text -> its compact text, after the structural and meta checks."""
    if not text.strip():
        raise invalid(f"{where} is empty")
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise invalid(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise invalid(f"{where} must be a JSON Schema (an object or a boolean), got {type(schema).__name__}")
    _check_schema(where, schema)
    _meta_check(where, schema)
    # compact, key order kept: xgrammar emits properties in schema order
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _response_format(rf: pb.ResponseFormat) -> dict[str, str] | None:
    which = rf.WhichOneof("format")
    if which is None:  # an empty ResponseFormat is free text, like an unset one
        return None
    if which == "json_schema":
        where = "response_format.json_schema.schema_json"
        return {"type": "json_schema", "value": _json_schema_text(where, rf.json_schema.schema_json)}
    if which == "json_object":
        if not rf.json_object:
            raise invalid("response_format.json_object must be true (leave response_format unset for free text)")
        return {"type": "json_object", "value": ""}
    value = getattr(rf, which)
    if not value.strip():
        raise invalid(f"response_format.{which} is empty")
    return {"type": which, "value": value}


def _tools(req: pb.ChatRequest) -> list[dict[str, Any]]:
    """Declared tools -> ToolSpec dicts: functions.NAME (with its schema when strict), then built-in recipients."""
    out: list[dict[str, Any]] = []
    for i, t in enumerate(req.tools):
        if not t.name:
            raise invalid(f"tools[{i}].name is empty")
        schema = None
        if t.strict and t.parameters_json:
            schema = _json_schema_text(f"tools[{i}].parameters_json", t.parameters_json)
        out.append({"recipient": f"functions.{t.name}", "schema": schema})
    for i, name in enumerate(dict.fromkeys(req.builtin_tools)):  # a repeated built-in declares it once
        if name not in BUILTIN_RECIPIENTS:
            raise invalid(f"builtin_tools[{i}]: unknown built-in tool {name!r}; known: {sorted(BUILTIN_RECIPIENTS)}")
        out.extend({"recipient": r, "schema": None} for r in BUILTIN_RECIPIENTS[name])
    return out


def _tool_choice(tc: pb.ToolChoice, tools: list[dict[str, Any]]) -> str:
    recipients = [t["recipient"] for t in tools]
    if tc.name:
        # a bare function name first (OpenAI's form), then a full recipient (functions.NAME, browser.search, python)
        for candidate in (f"functions.{tc.name}", tc.name):
            if candidate in recipients:
                return candidate
        declared = ", ".join(r.removeprefix("functions.") for r in recipients) or "none"
        raise invalid(f"tool_choice.name {tc.name!r} names no declared tool (declared: {declared})")
    mode = _TOOL_CHOICE_MODES.get(tc.mode)
    if mode is None:
        raise invalid(f"tool_choice.mode: unknown value {tc.mode}")
    if mode == "required" and not tools:
        raise invalid("tool_choice.mode REQUIRED needs at least one tool (tools or builtin_tools)")
    return mode


def constraint_from_chat(req: pb.ChatRequest) -> Constraint | None:
    """The request's decoding constraint, or None when it asks for none.

    Active only when the request sets response_format, tool_choice (a mode other than AUTO, or a name),
    max_reasoning_tokens, or a strict function tool; otherwise the model runs unconstrained. Raises RouterError
    (INVALID_ARGUMENT) naming the field. Grammar support itself is checked by the replica's compile."""
    tools = _tools(req)
    response_format = _response_format(req.response_format) if req.HasField("response_format") else None
    choice = _tool_choice(req.tool_choice, tools) if req.HasField("tool_choice") else "auto"
    budget = req.max_reasoning_tokens if req.HasField("max_reasoning_tokens") else None
    if budget is not None and budget < 0:
        raise invalid(f"max_reasoning_tokens must be >= 0, got {budget}")
    strict = any(t.strict for t in req.tools)
    if response_format is None and choice == "auto" and budget is None and not strict:
        return None
    try:
        return Constraint.from_dict({"response_format": response_format, "tools": tools, "tool_choice": choice,
                                     "max_reasoning_tokens": budget})
    except ValueError as exc:
        raise invalid(str(exc)) from None


class Validator:
    """Checks and converts requests; `model` holds the served model's facts (from a replica's model_info)."""

    def __init__(self, model: ModelInfo, *, sampling_defaults: Mapping[str, Any] | None = None,
                 default_reasoning_effort: str = "medium", tokenizer: Tokenizer | None = None) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self.context_length = model.context_length
        self.defaults = {**DEFAULT_SAMPLING, **dict(sampling_defaults or {})}
        self.default_effort = default_reasoning_effort
        self.tok = tokenizer or get_tokenizer()
        self.chat_stop_token_ids = tuple(self.tok.stop_token_ids_for_chat)  # harmony's <|return|>, <|call|>

    # ------------------------------------------------------------------------------------------------ pieces
    def request_id(self, value: str) -> str:
        if not value:
            return uuid.uuid4().hex
        if len(value) > MAX_REQUEST_ID or not value.isprintable():
            raise invalid(f"request_id must be at most {MAX_REQUEST_ID} printable characters")
        return value

    @staticmethod
    def timeout(has: bool, value: float) -> float | None:
        if not has:
            return None
        if not math.isfinite(value) or value <= 0:
            raise invalid(f"timeout_seconds must be a positive number of seconds, got {value!r}")
        return float(value)

    def adapter(self, has: bool, name: str) -> str | None:
        """The request's LoRA adapter: None for the base model (unset, empty, or the served model's name); a name
        that cannot be an adapter's is INVALID_ARGUMENT (whether one is loaded is the router core's question)."""
        if not has or not name or name == self.model.model:
            return None
        problem = lora_name_problem(name)
        if problem is not None:
            raise invalid(f"adapter: {problem}")
        return name

    def token_ids(self, ids: Any, where: str) -> list[int]:
        out = list(ids)
        if out and (min(out) < 0 or max(out) >= self.vocab_size):
            i, t = next((i, t) for i, t in enumerate(out) if not 0 <= t < self.vocab_size)
            raise invalid(f"{where}[{i}]: token id {t} is outside the vocabulary [0, {self.vocab_size})")
        return out

    def sampling(self, s: pb.SamplingParams, prompt_len: int) -> tuple[SamplingParams, tuple[str, ...]]:
        """proto SamplingParams + defaults -> (the engine's SamplingParams, without stop strings; the stop strings);
        checks against the context."""
        if prompt_len >= self.context_length:
            raise invalid(f"the prompt has {prompt_len} tokens; the context holds {self.context_length} (prompt + "
                          "at least one generated token)")
        values: dict[str, Any] = dict(self.defaults)
        explicit_max = s.HasField("max_tokens")
        for name in _OPTIONAL_SAMPLING:
            if s.HasField(name):
                values[name] = getattr(s, name)
        if values.get("top_k") == 0:
            values["top_k"] = -1
        stops = tuple(s.stop)
        stop_ids = self.token_ids(s.stop_token_ids, "sampling.stop_token_ids")
        room = self.context_length - prompt_len
        if explicit_max:
            if values["max_tokens"] > room:
                raise invalid(f"sampling.max_tokens: the prompt ({prompt_len} tokens) + max_tokens "
                              f"({values['max_tokens']}) exceed the context of {self.context_length} tokens")
        elif isinstance(values.get("max_tokens"), int) and values["max_tokens"] > room:
            values["max_tokens"] = room  # a default never makes a request invalid: it shrinks to fit
        try:
            params = SamplingParams(**values, stop=stops, stop_token_ids=tuple(stop_ids), ignore_eos=s.ignore_eos)
        except (TypeError, ValueError) as exc:
            raise invalid(f"sampling.{exc}") from None
        return (dataclasses.replace(params, stop=()) if params.stop else params), params.stop

    # ------------------------------------------------------------------------------------------------ requests
    def generate(self, req: pb.GenerateRequest) -> Prepared:
        which = req.WhichOneof("prompt")
        if which is None:
            raise invalid("prompt: set text or token_ids")
        if which == "text":
            if not req.text:
                raise invalid("text is empty")
            prompt = self.tok.encode(req.text)
        else:
            if not req.token_ids.ids:
                raise invalid("token_ids.ids is empty")
            prompt = self.token_ids(req.token_ids.ids, "token_ids.ids")
        sampling, stops = self.sampling(req.sampling, len(prompt))
        return Prepared(self.request_id(req.request_id), prompt, sampling, stops, req.priority,
                        self.timeout(req.HasField("timeout_seconds"), req.timeout_seconds),
                        lora=self.adapter(req.HasField("adapter"), req.adapter))

    def chat(self, req: pb.ChatRequest) -> Prepared:
        prompt = self.render(req.messages, req.reasoning_effort, req.tools, req.builtin_tools)
        constraint = constraint_from_chat(req)
        sampling, stops = self.sampling(req.sampling, len(prompt))
        return Prepared(self.request_id(req.request_id), prompt, sampling, stops, req.priority,
                        self.timeout(req.HasField("timeout_seconds"), req.timeout_seconds),
                        eos_token_ids=self.chat_stop_token_ids, constraint=constraint,
                        lora=self.adapter(req.HasField("adapter"), req.adapter))

    def tokenize(self, req: pb.TokenizeRequest) -> list[int]:
        which = req.WhichOneof("input")
        if which is None:
            raise invalid("input: set text or chat")
        if which == "text":
            return self.tok.encode(req.text)
        return self.render(req.chat.messages, req.reasoning_effort, req.tools, ())

    # ------------------------------------------------------------------------------------------------ chat
    def render(self, messages: Any, effort: int, tools: Any, builtin_tools: Any) -> list[int]:
        if not messages:
            raise invalid("messages is empty")
        if effort not in (pb.REASONING_EFFORT_UNSPECIFIED, *_EFFORTS):
            raise invalid(f"reasoning_effort: unknown value {effort}")
        try:
            return render_chat([self.message(i, m) for i, m in enumerate(messages)],
                               reasoning_effort=_EFFORTS.get(effort, self.default_effort),
                               tools=[self.tool(i, t) for i, t in enumerate(tools)] or None,
                               builtin_tools=list(builtin_tools) or None)
        except ValueError as exc:
            raise invalid(str(exc)) from None

    @staticmethod
    def message(i: int, m: pb.ChatMessage) -> dict[str, Any]:
        out: dict[str, Any] = {"role": m.role}
        if m.role == "assistant":
            calls = []
            for j, call in enumerate(m.tool_calls):
                if call.arguments:
                    try:
                        json.loads(call.arguments)
                    except ValueError as exc:
                        raise invalid(f"messages[{i}].tool_calls[{j}].arguments is not valid JSON: {exc}") from None
                calls.append({"id": call.id or f"call_{i}_{j}", "function": {"name": call.name,
                                                                              "arguments": call.arguments}})
            if calls:
                out["tool_calls"] = calls
            if m.reasoning:
                out["reasoning"] = m.reasoning
            if m.content or not (calls or m.reasoning):
                out["content"] = m.content
        else:
            out["content"] = m.content
            if m.role == "tool":
                if m.name:
                    out["name"] = m.name
                if m.tool_call_id:
                    out["tool_call_id"] = m.tool_call_id
        return out

    @staticmethod
    def tool(i: int, t: pb.FunctionTool) -> dict[str, Any]:
        out: dict[str, Any] = {"name": t.name, "description": t.description}
        if t.parameters_json:
            where = f"tools[{i}].parameters_json"
            try:
                schema = json.loads(t.parameters_json)
            except ValueError as exc:
                raise invalid(f"{where} is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise invalid(f"{where} must be a JSON object (a JSON Schema), got {type(schema).__name__}")
            _check_schema(where, schema)
            _meta_check(where, schema)
            out["parameters"] = schema
        if t.strict:
            out["strict"] = True
        return out
