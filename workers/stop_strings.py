"""Stop strings over streamed text: the one implementation, for the router and the offline engine.

Who applies them: the engine owns everything it can decide on token ids (stop tokens, EOS, max_tokens, and
`min_tokens`, which masks the stop tokens until that many are out). Stop strings need text: for served requests the
router detokenizes, so it applies them (`cluster.router.streaming`) and cancels the replica's request when one
matches; the offline engine, which holds a tokenizer, applies them itself (`workers.engine.engine`). Both use
`StopStrings`, so a request stops at the same place either way.

Rules: the text ends before the first stop string that appears once at least `min_tokens` tokens are out (with it,
if `include_stop`); until a stop string can no longer be forming, the text's last `len(longest stop) - 1` characters
are held back.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopStrings"]


class StopStrings:
    """Finds the first stop string in streamed text, holding back a tail that could still become one."""

    __slots__ = ("stops", "min_tokens", "include_stop", "_hold", "_buffer", "matched")

    def __init__(self, stops: Sequence[str] = (), *, min_tokens: int = 0, include_stop: bool = False) -> None:
        self.stops = tuple(s for s in stops if s) if stops else ()
        self.min_tokens = min_tokens
        self.include_stop = include_stop
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buffer = ""
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, text: str, num_tokens: int) -> str:
        """Add `text`, the text of the tokens up to the `num_tokens`-th generated one; returns what is safe to pass
        on. After a match, everything else is dropped."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        self._buffer += text
        if num_tokens >= self.min_tokens:
            hit: tuple[int, str] | None = None
            for stop in self.stops:
                at = self._buffer.find(stop)
                if at >= 0 and (hit is None or at < hit[0]):
                    hit = (at, stop)
            if hit is not None:
                at, stop = hit
                self.matched = stop
                out = self._buffer[:at + (len(stop) if self.include_stop else 0)]
                self._buffer = ""
                return out
        cut = max(0, len(self._buffer) - self._hold)
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out

    def flush(self) -> str:
        """The held-back tail, at the end of the text (nothing after a match)."""
        out, self._buffer = self._buffer, ""
        return "" if self.matched is not None else out
