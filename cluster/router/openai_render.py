"""gptoss.v1 response messages -> OpenAI JSON: chat completions, text completions and the Responses API, whole or as
server-sent events (pure: the deltas come in as an async iterator, JSON-ready dicts / SSE text go out).

Harmony's channels map the way vLLM maps them for gpt-oss: the analysis channel is the reasoning (`reasoning_content`
and `reasoning` on chat messages and deltas; a `reasoning` output item with `reasoning_text` content in the
Responses API), final and commentary text is the answer, and tool-call deltas become OpenAI tool calls
(`finish_reason: "tool_calls"` when the model stopped to call one). A `RouterError` in the middle of a stream becomes
an error event (the HTTP status is long gone); before the first delta the caller answers it as a plain HTTP error.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gptoss_cluster.cluster.contract import ErrorCode
from gptoss_cluster.cluster.router.errors import RouterError
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb
from gptoss_cluster.workers.harmony import Tokenizer

__all__ = ["ChatCompletion", "ResponsesStream", "TextCompletion", "error_body", "error_code", "http_status"]

ChatEvents = AsyncIterator[tuple[pb.ChatResponse, list[pb.TokenLogprob]]]
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_TOOL_CALL: "tool_calls",
           pb.FINISH_REASON_ABORTED: "stop"}
# the router's error code -> (HTTP status, OpenAI error type)
_HTTP = {ErrorCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
         ErrorCode.UNAUTHENTICATED: (401, "authentication_error"),
         ErrorCode.NOT_FOUND: (404, "not_found_error"),
         ErrorCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
         ErrorCode.CANCELLED: (499, "cancelled"),
         ErrorCode.UNAVAILABLE: (503, "service_unavailable_error"),
         ErrorCode.DEADLINE_EXCEEDED: (504, "timeout_error")}
DONE = "data: [DONE]\n\n"


def http_status(code: ErrorCode) -> tuple[int, str]:
    return _HTTP.get(code, (500, "server_error"))


def error_code(code: ErrorCode) -> str:
    """The OpenAI error body's `code` for a router error: what a request can miss is its model (a LoRA adapter that
    is not loaded), which OpenAI calls model_not_found; the rest are the status's name."""
    return "model_not_found" if code is ErrorCode.NOT_FOUND else code.name.lower()


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _router_error(exc: RouterError) -> dict[str, Any]:
    return error_body(exc.message, http_status(exc.code)[1], code=error_code(exc.code))


def _sse(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _kind(r: pb.ChatResponse) -> str:
    if r.HasField("tool_call"):
        return "tool_call"
    return "reasoning" if r.channel == pb.CHANNEL_ANALYSIS else "content"


class _Logprobs:
    """Token logprobs in OpenAI's chat shape ({token, logprob, bytes, top_logprobs})."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.tok.decode([token_id]), "logprob": logprob,
                "bytes": list(self.tok.decode_bytes([token_id]))}

    def chat(self, items: Sequence[pb.TokenLogprob]) -> list[dict[str, Any]]:
        return [{**self.entry(lp.token_id, lp.logprob), "top_logprobs": [self.entry(t.token_id, t.logprob)
                                                                        for t in lp.top]} for lp in items]


# ================================================================================================ chat completions
class ChatCompletion:
    """Chat deltas -> a `chat.completion`, or `chat.completion.chunk` events."""

    def __init__(self, model: str, tokenizer: Tokenizer, *, logprobs: bool = False,
                 include_usage: bool = False) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = _Logprobs(tokenizer) if logprobs else None
        self.include_usage = include_usage

    async def collect(self, events: ChatEvents) -> dict[str, Any]:
        text: dict[str, list[str]] = {"reasoning": [], "content": []}
        calls: dict[int, dict[str, Any]] = {}
        logprobs: list[dict[str, Any]] = []
        last = pb.ChatResponse()
        async with contextlib.aclosing(events):
            async for r in events:
                kind = _kind(r)
                if kind == "tool_call":
                    call = calls.setdefault(r.tool_call.index, {"id": r.tool_call.id, "type": "function",
                                                                "function": {"name": r.tool_call.name,
                                                                             "arguments": ""}})
                    call["function"]["arguments"] += r.tool_call.arguments_delta
                else:
                    text[kind].append(r.text)
                    if kind == "content" and self.logprobs is not None:
                        logprobs += self.logprobs.chat(r.logprobs)
                last = r
        content, reasoning = "".join(text["content"]), "".join(text["reasoning"])
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None,
                                   "reasoning_content": reasoning or None, "reasoning": reasoning or None,
                                   "tool_calls": [calls[i] for i in sorted(calls)]}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": _FINISH.get(last.finish_reason),
                             "logprobs": {"content": logprobs} if self.logprobs is not None else None}],
                "usage": chat_usage(last.usage)}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    async def stream(self, events: ChatEvents) -> AsyncIterator[str]:
        yield self._chunk({"role": "assistant", "content": ""})
        last = None
        try:
            async with contextlib.aclosing(events):
                async for r in events:
                    kind = _kind(r)
                    if kind == "tool_call":
                        tc = r.tool_call
                        call: dict[str, Any] = {"index": tc.index, "function": {"arguments": tc.arguments_delta}}
                        if tc.id:  # the call's first delta
                            call.update(id=tc.id, type="function")
                            call["function"]["name"] = tc.name
                        yield self._chunk({"tool_calls": [call]})
                    elif r.text:
                        if kind == "reasoning":
                            yield self._chunk({"reasoning_content": r.text, "reasoning": r.text})
                        else:
                            lp = {"content": self.logprobs.chat(r.logprobs)} if self.logprobs is not None else None
                            yield self._chunk({"content": r.text}, logprobs=lp)
                    last = r
        except RouterError as exc:
            yield _sse(_router_error(exc))
            yield DONE
            return
        assert last is not None
        yield self._chunk({}, finish=_FINISH.get(last.finish_reason, "stop"))
        if self.include_usage:
            yield _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": chat_usage(last.usage)})
        yield DONE


def chat_usage(u: pb.Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


# ================================================================================================ text completions
class TextCompletion:
    """Generate deltas -> a `text_completion` (whole or as chunks); legacy logprobs when asked for."""

    def __init__(self, model: str, tokenizer: Tokenizer, *, logprobs: bool = False,
                 include_usage: bool = False) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tok = tokenizer if logprobs else None
        self.include_usage = include_usage
        self._offset = 0

    def _logprobs(self, r: pb.GenerateResponse) -> dict[str, Any] | None:
        if self.tok is None:
            return None
        tokens = [self.tok.decode([lp.token_id]) for lp in r.logprobs]
        offsets = []
        for token in tokens:
            offsets.append(self._offset)
            self._offset += len(token)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in r.logprobs],
                "top_logprobs": [{self.tok.decode([t.token_id]): t.logprob for t in lp.top} for lp in r.logprobs],
                "text_offset": offsets}

    def _object(self, text: str, finish: str | None, logprobs: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    async def collect(self, events: AsyncIterator[pb.GenerateResponse]) -> dict[str, Any]:
        text: list[str] = []
        merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        last = pb.GenerateResponse()
        async with contextlib.aclosing(events):
            async for r in events:
                text.append(r.text)
                for key, values in (self._logprobs(r) or {}).items():
                    merged[key] += values
                last = r
        out = self._object("".join(text), _FINISH.get(last.finish_reason), merged if self.tok else None)
        out["usage"] = chat_usage(last.usage)
        return out

    async def stream(self, events: AsyncIterator[pb.GenerateResponse]) -> AsyncIterator[str]:
        last = None
        try:
            async with contextlib.aclosing(events):
                async for r in events:
                    if r.text or r.finish_reason:
                        yield _sse(self._object(r.text, _FINISH.get(r.finish_reason), self._logprobs(r)))
                    last = r
        except RouterError as exc:
            yield _sse(_router_error(exc))
            yield DONE
            return
        if self.include_usage and last is not None:
            yield _sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                        "choices": [], "usage": chat_usage(last.usage)})
        yield DONE


# ================================================================================================ Responses API
class ResponsesStream:
    """Chat deltas -> Responses API output items and their streaming events. Consecutive deltas of one kind form
    one item (reasoning, message, or one function call per tool-call index); each item goes added -> deltas ->
    done, and the response created -> in_progress -> completed (or incomplete when max_output_tokens cut it)."""

    def __init__(self, model: str, echo: dict[str, Any]) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.echo = echo  # request fields a Response repeats (tools, tool_choice, temperature, ...)
        self.output: list[dict[str, Any]] = []
        self._open: Any = None  # key of the item receiving deltas
        self._seq = 0

    # -------------------------------------------------------------------------------------------- the response
    def response(self, status: str, usage: pb.Usage | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        out = {"id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
               "status": status, "error": error, "incomplete_details": None, "output": list(self.output),
               "parallel_tool_calls": True, "metadata": {}, **self.echo, "usage": None}
        if status == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        if usage is not None:
            out["usage"] = {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                            "input_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
                            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}}
        return out

    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        return {"type": type_, "sequence_number": self._seq - 1, **fields}

    def begin(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=self.response("in_progress")),
                self._event("response.in_progress", response=self.response("in_progress"))]

    def feed(self, r: pb.ChatResponse) -> list[dict[str, Any]]:
        kind = _kind(r)
        if kind != "tool_call" and not r.text:
            return []
        key = ("call", r.tool_call.index) if kind == "tool_call" else kind
        events = self._close() + self._start(key, r) if key != self._open else []
        item, at = self.output[-1], len(self.output) - 1
        if kind == "tool_call":
            item["arguments"] += r.tool_call.arguments_delta
            if r.tool_call.arguments_delta:
                events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                          output_index=at, delta=r.tool_call.arguments_delta))
        else:
            item["content"][0]["text"] += r.text
            kind_ = "reasoning_text" if kind == "reasoning" else "output_text"
            extra = {} if kind == "reasoning" else {"logprobs": []}
            events.append(self._event(f"response.{kind_}.delta", item_id=item["id"], output_index=at,
                                      content_index=0, delta=r.text, **extra))
        return events

    def end(self, last: pb.ChatResponse) -> list[dict[str, Any]]:
        incomplete = last.finish_reason == pb.FINISH_REASON_LENGTH
        events = self._close("incomplete" if incomplete else "completed")
        status = "incomplete" if incomplete else "completed"
        return events + [self._event(f"response.{status}", response=self.response(status, last.usage))]

    def fail(self, exc: RouterError) -> list[dict[str, Any]]:
        body = _router_error(exc)["error"]
        return [self._event("error", code=body["code"], message=body["message"], param=None),
                self._event("response.failed", response=self.response(
                    "failed", error={"code": "server_error", "message": exc.message}))]

    # -------------------------------------------------------------------------------------------- items
    def _start(self, key: Any, r: pb.ChatResponse) -> list[dict[str, Any]]:
        suffix = uuid.uuid4().hex
        if key == "reasoning":
            item: dict[str, Any] = {"type": "reasoning", "id": f"rs_{suffix}", "summary": [], "content": [],
                                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        elif key == "content":
            item = {"type": "message", "id": f"msg_{suffix}", "role": "assistant", "content": [],
                    "status": "in_progress"}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"type": "function_call", "id": f"fc_{suffix}", "call_id": r.tool_call.id, "name": r.tool_call.name,
                    "arguments": "", "status": "in_progress"}
            part = None
        self._open = key
        self.output.append(item)
        at = len(self.output) - 1
        events = [self._event("response.output_item.added", output_index=at, item=json.loads(json.dumps(item)))]
        if part is not None:
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=at,
                                      content_index=0, part=dict(part)))
            item["content"].append(part)
        return events

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        if self._open is None:
            return []
        self._open = None
        item, at = self.output[-1], len(self.output) - 1
        item["status"] = status
        events = []
        if item["type"] == "function_call":
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                                      name=item["name"], arguments=item["arguments"]))
        else:
            part = item["content"][0]
            kind = part["type"]
            extra = {} if kind == "reasoning_text" else {"logprobs": []}
            events.append(self._event(f"response.{kind}.done", item_id=item["id"], output_index=at,
                                      content_index=0, text=part["text"], **extra))
            events.append(self._event("response.content_part.done", item_id=item["id"], output_index=at,
                                      content_index=0, part=dict(part)))
        events.append(self._event("response.output_item.done", output_index=at, item=json.loads(json.dumps(item))))
        return events

    # -------------------------------------------------------------------------------------------- drivers
    async def collect(self, events: ChatEvents) -> dict[str, Any]:
        last = pb.ChatResponse()
        async with contextlib.aclosing(events):
            async for r in events:
                self.feed(r)
                last = r
        return self.end(last)[-1]["response"]

    async def stream(self, events: ChatEvents) -> AsyncIterator[str]:
        for event in self.begin():
            yield _sse(event, event["type"])
        last = pb.ChatResponse()
        try:
            async with contextlib.aclosing(events):
                async for r in events:
                    for event in self.feed(r):
                        yield _sse(event, event["type"])
                    last = r
        except RouterError as exc:
            for event in self.fail(exc):
                yield _sse(event, event["type"])
            return
        for event in self.end(last):
            yield _sse(event, event["type"])
