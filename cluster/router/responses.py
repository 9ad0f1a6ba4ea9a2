"""The pieces of gptoss.v1 response messages that come from a replica's deltas: logprobs, usage, chat deltas."""

from __future__ import annotations

from collections.abc import Sequence

from gptoss_cluster.cluster.contract import TokenLogprob, Usage
from gptoss_cluster.cluster.router.streaming import ChatDelta
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2 as pb

__all__ = ["FINISH", "ChatLogprobs", "chat_response", "logprobs", "usage"]

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "tool_call": pb.FINISH_REASON_TOOL_CALL,
          "aborted": pb.FINISH_REASON_ABORTED}
_CHANNELS = {"analysis": pb.CHANNEL_ANALYSIS, "commentary": pb.CHANNEL_COMMENTARY, "final": pb.CHANNEL_FINAL}


def logprobs(items: Sequence[TokenLogprob] | None, n: int) -> list[pb.TokenLogprob]:
    """The first `n` of a delta's logprobs (the tokens the router kept) as messages."""
    if not items:
        return []
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top])
            for lp in items[:n]]


def usage(prompt_tokens: int, completion_tokens: int, replica_usage: Usage | None,
          reasoning_tokens: int = 0) -> pb.Usage:
    """The router counts what the client got (a stop string may end the text before the replica stopped); the
    replica says how much of the prompt its prefix cache served."""
    cached = replica_usage.cached_prompt_tokens if replica_usage is not None else 0
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached_prompt_tokens=cached,
                    reasoning_tokens=reasoning_tokens)


class ChatLogprobs:
    """Logprobs of the chat tokens fed so far, handed out in token order as chat deltas claim their token ids."""

    def __init__(self) -> None:
        self._items: list[pb.TokenLogprob] = []
        self._at = 0

    def push(self, items: Sequence[TokenLogprob] | None, n: int) -> None:
        if items:
            self._items.extend(logprobs(items, n))

    def pop(self, n: int) -> list[pb.TokenLogprob]:
        out = self._items[self._at:self._at + n]
        self._at += len(out)
        return out


def chat_response(request_id: str, delta: ChatDelta, logprobs_: ChatLogprobs) -> pb.ChatResponse:
    out = pb.ChatResponse(request_id=request_id, channel=_CHANNELS.get(delta.channel or "", pb.CHANNEL_UNSPECIFIED),
                          text=delta.text, token_ids=delta.token_ids, logprobs=logprobs_.pop(len(delta.token_ids)))
    if delta.tool_call is not None:
        tc = delta.tool_call
        out.tool_call.CopyFrom(pb.ToolCallDelta(index=tc["index"], id=tc["id"], name=tc["name"],
                                                arguments_delta=tc["arguments_delta"]))
    return out
