"""Sampling parameters (validated once, at the edge) and token selection from one row of logits.

The engine's executors sample whole batches at once (`workers.engine.sampler.sample`); `sample_token` is the one-row
form of the same math, kept for callers that hold a single row of logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the router validates SamplingParams in a process that never loads torch
    import torch

MAX_LOGPROBS = 20  # most top logprobs a request may ask for per token
_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Temperature 0 is greedy.

    Penalties follow the OpenAI / vLLM definitions: `presence_penalty` and `frequency_penalty` (in [-2, 2]) subtract
    from the logits of tokens already generated (once, or once per occurrence); `repetition_penalty` (> 0, 1 = off)
    divides positive and multiplies negative logits of tokens seen in the prompt or the output. `min_p` drops tokens
    whose probability is below `min_p` times the most likely one. Stops: a token of `stop_token_ids` (kept in the
    output ids, not in the text), the model's end-of-sequence tokens unless `ignore_eos`, or a string of `stop`
    appearing in the text (the text is cut before it unless `include_stop_str_in_output`). None of them can end a
    request before `min_tokens` tokens. `logprobs=n` returns the log-probability of every sampled token plus the n
    most likely alternatives (0: the sampled token's only), from the model's raw distribution.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k cut
    max_tokens: int = 16
    ignore_eos: bool = False
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        stop_ids = (self.stop_token_ids,) if _is_int(self.stop_token_ids) else self.stop_token_ids
        if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, (Sequence, set, frozenset)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(stop_ids))
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif not isinstance(stop, (Sequence, set, frozenset)) or isinstance(stop, bytes):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        self.validate()

    def validate(self) -> None:
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or a non-negative integer, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for token in self.stop_token_ids:
            if not _is_int(token) or token < 0:
                raise ValueError(f"stop_token_ids must hold non-negative integers, got {token!r}")
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop must hold non-empty strings, got {text!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def make_generator(self) -> torch.Generator | None:
        """A per-request generator, so a seeded request samples the same tokens whatever else runs beside it."""
        if self.seed is None or self.temperature == 0:
            return None
        import torch

        return torch.Generator().manual_seed(self.seed)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """logits [vocab] float32 -> one token id (no penalties: they need the request's history; see the engine)."""
    from gptoss_cluster.workers.engine.sampler import SamplingBatch, sample_rows

    logits = logits.float()[None]
    batch = SamplingBatch.from_params([params], [generator], None, logits.shape[1]).to(logits.device)
    return int(sample_rows(logits, batch)[0])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
