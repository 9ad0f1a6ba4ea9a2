"""The spans of one Generate / Chat call on the router, when tracing is on (`cluster.tracing`).

    gptoss.router.Chat | gptoss.router.Generate   (kind server; child of the caller's W3C traceparent, if any)
      router.validate       the request checked and rendered (harmony)
      router.admission      waiting for a slot in the router's admission queue
      router.dispatch       the replica chosen and its acceptance (one per attempt: a retry before the first token
                            makes a second); attribute gptoss.replica
      event first_token     the first token reached the router

The call's attributes: model, operation, protocol, response id, prompt / output / cached / reasoning tokens, finish
reason, replica, and on failure the status (error.type: the gRPC status name). The replica's spans
(`cluster.replica`) are children of the call's span: its W3C context travels in `ReplicaRequest.trace_context`.

The phases run one after the other, so each child span is recorded when the next phase begins, with the times the
call passed through them. A `RequestTrace` stands in front of the call's metrics timer (the same methods), so that the
dispatch path reports to both without knowing of tracing; with tracing off there is none and nothing here runs. A
call the sampler leaves out makes its (non-recording) span only, to hand its context on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from gptoss_cluster.cluster.contract import ErrorCode, Usage
from gptoss_cluster.cluster.router.requests import Prepared
from gptoss_cluster.cluster.tracing import Attr, Tracer

__all__ = ["RequestTrace"]

OPERATIONS = {"Chat": "chat", "Generate": "text_completion"}
_PHASES = ("router.validate", "router.admission", "router.dispatch")


class RequestTrace:
    """One call's spans; see the module docstring. Also its metrics timer (`dispatched`, `tokens`, `finish`)."""

    __slots__ = ("tracer", "timer", "span", "recording", "_phase", "_mark", "_first_token")

    def __init__(self, tracer: Tracer, timer: Any, method: str, protocol: str,
                 parent: Mapping[str, str] | None) -> None:
        self.tracer = tracer
        self.timer = timer
        self._mark = time.time_ns()  # when the current phase began
        self.span = tracer.start(f"gptoss.router.{method}", parent, {Attr.OPERATION: OPERATIONS[method],
                                                                      Attr.PROTOCOL: protocol},
                                 start_time_ns=self._mark, kind="server")
        self.recording = self.span.recording  # False: not sampled, nothing more to record
        self._phase = 0  # index in _PHASES of the phase running now (len: streaming)
        self._first_token = not self.recording

    def _next_phase(self, attributes: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        """Record the phase running now as a child span (ending now) and begin the next one."""
        if not self.recording:
            return
        now = time.time_ns()
        child = self.tracer.start(_PHASES[self._phase], self.span, attributes, start_time_ns=self._mark)
        if error is not None:
            child.error(error)
        child.end(now)
        self._mark = now
        self._phase += 1

    def context(self) -> dict[str, str]:
        """The W3C context the replica's spans continue (also when this call is not sampled: the replica then
        follows that decision rather than making its own)."""
        return self.span.context()

    def validated(self, prep: Prepared, model: str) -> None:
        if not self.recording:
            return
        self._next_phase()
        self.span.set_many({Attr.MODEL: model, Attr.RESPONSE_ID: prep.request_id,
                            Attr.INPUT_TOKENS: len(prep.prompt_token_ids),
                            Attr.MAX_TOKENS: prep.sampling.max_tokens})

    def accepted(self, replica_id: str) -> None:
        """A replica took the request (again, after a retry)."""
        if not self.recording:
            return
        if self._phase == len(_PHASES):  # a retry: its dispatch span runs from the previous acceptance
            self._phase -= 1
        self._next_phase({Attr.REPLICA: replica_id})
        self.span.set(Attr.REPLICA, replica_id)

    def answered(self, finish_reason: str, output_tokens: int, usage: Usage | None,
                 reasoning_tokens: int | None = None) -> None:
        """The call's outcome, as the caller gets it (output tokens after stop strings)."""
        if not self.recording:
            return
        self.span.set_many({Attr.FINISH_REASONS: [finish_reason], Attr.OUTPUT_TOKENS: output_tokens,
                            Attr.REASONING_TOKENS: reasoning_tokens,
                            Attr.CACHED_INPUT_TOKENS: None if usage is None else usage.cached_prompt_tokens})

    def end(self, code: ErrorCode | str, exc: BaseException | None) -> None:
        """End the call's span: OK, or the status it failed with (and the phase it failed in)."""
        if not self.recording:
            return
        error = None
        if exc is not None and not isinstance(code, ErrorCode):  # what the metrics count as OK: a bug
            code = ErrorCode.INTERNAL
        if isinstance(code, ErrorCode):
            error = f"{code.name}: {getattr(exc, 'message', None) or exc or ''}".rstrip(": ")
            self.span.set(Attr.ERROR_TYPE, code.name)
            self.span.error(error)
        if self._phase < len(_PHASES):
            self._next_phase(error=error)
        self.span.end()

    # ------------------------------------------------------------------------------------------------ the timer's
    def dispatched(self) -> None:
        """Admitted: the admission wait ends, the dispatch begins."""
        self._next_phase()
        self.timer.dispatched()

    def tokens(self, n: int = 1) -> None:
        if n > 0 and not self._first_token:
            self._first_token = True
            self.span.event("first_token")
        self.timer.tokens(n)

    def finish(self, *args: Any, **kwargs: Any) -> None:
        self.timer.finish(*args, **kwargs)
