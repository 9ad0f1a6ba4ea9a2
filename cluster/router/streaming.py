"""Turning a replica's token stream into what clients see: text with stop strings, and harmony chat deltas.

The replica's engine works on token ids only (stop tokens, max_tokens, `min_tokens` masking); the router owns
everything textual:

- `TextStream` (Generate): incremental detokenization that never splits a UTF-8 character, and stop strings
  (`workers.stop_strings.StopStrings`, the same rules as the offline engine's: held back while they might still be
  forming; the text ends before the first one, once `min_tokens` are out).
- `ChatStream` (Chat): feeds tokens through `workers.harmony.HarmonyStreamParser` and emits `ChatDelta`s tagged with
  their channel (analysis / commentary / final); a message with a recipient (`functions.NAME` on commentary, or a
  built-in tool such as `browser.search` / `python` on analysis) becomes a tool call: its first delta carries the
  call's index, id and name, later ones the argument text. It counts reasoning tokens (every token of
  analysis-channel messages, headers included) and tells a tool-call stop (`<|call|>`) from a normal one. Output the
  model garbles beyond harmony's grammar is passed on as plain text with no channel rather than dropped.

Every generated token id is attached to exactly one emitted delta (ids of header tokens ride on the next delta), so
a client that concatenates `token_ids` gets the whole completion.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gptoss_cluster.workers.harmony import (
    CALL_ID,
    HarmonyStreamParser,
    IncrementalDetokenizer,
    Tokenizer,
    get_tokenizer,
)
from gptoss_cluster.workers.stop_strings import StopStrings

__all__ = ["ChatDelta", "ChatStream", "TextStream", "chat_finish_reason"]


class TextStream:
    """Generate's text: token ids -> text deltas, stop strings applied."""

    def __init__(self, stops: Sequence[str] = (), min_tokens: int = 0, tokenizer: Tokenizer | None = None) -> None:
        self._detok = IncrementalDetokenizer(tokenizer or get_tokenizer())
        self._stop = StopStrings(stops, min_tokens=min_tokens)
        self.num_tokens = 0

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stop.matched

    def feed(self, token_ids: Sequence[int], *, drop_last: bool = False) -> tuple[list[int], str]:
        """New tokens -> (the tokens that count, their text). `drop_last`: the last token is the stop token that
        ended generation (its id is reported, its text is not). After a stop string, nothing counts any more."""
        if not self._stop.stops:  # nothing can end the text early: every token counts, one detokenizer call
            kept = list(token_ids)
            self.num_tokens += len(kept)
            spoken = kept[:-1] if drop_last else kept
            return kept, self._detok.add(spoken) if spoken else ""
        kept: list[int] = []
        text = []
        for i, token in enumerate(token_ids):
            if self._stop.matched is not None:
                break
            kept.append(token)
            self.num_tokens += 1
            if drop_last and i == len(token_ids) - 1:
                break
            text.append(self._stop.push(self._detok.add(token), self.num_tokens))
        return kept, "".join(text)

    def finish(self) -> str:
        if self._stop.matched is not None:
            return ""
        return self._stop.push(self._detok.flush(), self.num_tokens) + self._stop.flush()


@dataclass
class ChatDelta:
    channel: str | None  # "analysis" | "commentary" | "final" | None (unparsed text)
    text: str = ""
    tool_call: dict[str, Any] | None = None  # {"index", "id", "name", "arguments_delta"}
    token_ids: list[int] = field(default_factory=list)


def chat_finish_reason(finish_reason: str | None, stop_reason: Any) -> str | None:
    """Engine finish reason -> chat's: a stop on <|call|> is a tool call."""
    if finish_reason == "stop" and stop_reason == CALL_ID:
        return "tool_call"
    return finish_reason


def _tool_name(recipient: str) -> str:
    return recipient[len("functions."):] if recipient.startswith("functions.") else recipient


class ChatStream:
    """Harmony completion tokens -> channel-tagged chat deltas, tool calls, reasoning token count."""

    def __init__(self, tokenizer: Tokenizer | None = None, stops: Sequence[str] = (), min_tokens: int = 0) -> None:
        self._tok = tokenizer or get_tokenizer()
        self._parser: HarmonyStreamParser | None = HarmonyStreamParser(self._tok)
        self._raw: IncrementalDetokenizer | None = None  # set once the output left harmony's grammar
        self._stop = StopStrings(stops, min_tokens=min_tokens)
        self._pending: list[int] = []  # token ids not yet attached to an emitted delta
        self._calls: dict[int, int] = {}  # message index -> tool-call index
        # reasoning tokens are the analysis bodies (between <|message|> and <|end|>), as max_reasoning_tokens counts
        self._message_id = self._tok.token_id("<|message|>")
        self._body_ends = {self._tok.token_id(t) for t in ("<|end|>", "<|return|>", "<|call|>")}
        self._in_body = False
        self._body_tokens = 0
        self.num_tokens = 0
        self.reasoning_tokens = 0
        self.tool_calls: list[dict[str, Any]] = []  # [{"id", "name", "arguments", "channel"}]
        self.parse_error: str | None = None

    @property
    def stopped(self) -> str | None:
        return self._stop.matched

    def feed(self, token_ids: Sequence[int]) -> list[ChatDelta]:
        deltas: list[ChatDelta] = []
        for token in token_ids:
            if self._stop.matched is not None:
                break
            self._pending.append(token)
            self.num_tokens += 1
            if token == self._message_id:
                self._in_body, self._body_tokens = True, 0
            elif token in self._body_ends:
                self._in_body = False
            elif self._in_body:
                self._body_tokens += 1
            if self._parser is not None:
                try:
                    events = self._parser.feed(token)
                except ValueError as exc:
                    self._go_raw(str(exc))
                    events = []
                    deltas.extend(self._raw_text([token]))
                for event in events:
                    deltas.extend(self._event(event))
            else:
                deltas.extend(self._raw_text([token]))
        return self._attach(deltas)

    def finish(self) -> list[ChatDelta]:
        """End of the stream: close a message cut short; returns the last deltas (maybe one empty delta carrying
        the remaining token ids, if any)."""
        deltas: list[ChatDelta] = []
        if self._parser is not None and self._stop.matched is None:
            for event in self._parser.finish():
                deltas.extend(self._event(event))
        if self._raw is not None and self._stop.matched is None:
            text = self._stop.push(self._raw.flush(), self.num_tokens) + self._stop.flush()
            if text:
                deltas.append(ChatDelta(None, text))
        if self._pending and not deltas:
            deltas.append(ChatDelta(None))
        return self._attach(deltas)

    # ------------------------------------------------------------------------------------------------ internals
    def _attach(self, deltas: list[ChatDelta]) -> list[ChatDelta]:
        if deltas and self._pending:
            deltas[0].token_ids = self._pending
            self._pending = []
        return deltas

    def _go_raw(self, error: str) -> None:
        self.parse_error = error
        self._parser = None
        self._raw = IncrementalDetokenizer(self._tok, skip_special_tokens=True)

    def _raw_text(self, tokens: list[int]) -> list[ChatDelta]:
        assert self._raw is not None
        text = self._stop.push(self._raw.add(tokens), self.num_tokens)
        return [ChatDelta(None, text)] if text else []

    def _event(self, event: Any) -> list[ChatDelta]:
        index = event.message_index
        if event.done:
            message = event.message
            if message is not None and message.channel == "analysis":
                self.reasoning_tokens += self._body_tokens
            self._body_tokens = 0
            if event.is_tool_call and index not in self._calls:  # a call with no argument text at all
                return [self._call_delta(index, event.channel, event.recipient, "")]
            return []
        if event.is_tool_call:
            return [self._call_delta(index, event.channel, event.recipient, event.delta)]
        text = self._stop.push(event.delta, self.num_tokens)
        return [ChatDelta(event.channel, text)] if text else []

    def _call_delta(self, index: int, channel: str | None, recipient: str, arguments: str) -> ChatDelta:
        if index not in self._calls:
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "name": _tool_name(recipient), "arguments": "",
                    "channel": channel}
            self._calls[index] = len(self.tool_calls)
            self.tool_calls.append(call)
            first = True
        else:
            call = self.tool_calls[self._calls[index]]
            first = False
        call["arguments"] += arguments
        return ChatDelta(channel, "", {"index": self._calls[index], "id": call["id"] if first else "",
                                       "name": call["name"] if first else "", "arguments_delta": arguments})
