"""One request's state inside the engine: its tokens, how far its KV is computed, its status and its outputs."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gptoss_cluster.workers.sampling import SamplingParams

if TYPE_CHECKING:
    from gptoss_cluster.workers.engine.lora_slots import LoraRegistration


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV freed; it recomputes prompt + output so far when resumed
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


class FinishReason:
    STOP = "stop"  # a stop token, an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens generated
    ABORTED = "aborted"  # Engine.abort (or the client went away)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORTED,
}


@dataclass
class TokenLogprob:
    """The log-probability of a sampled token and the `n` most likely tokens at its position (raw model output)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True, slots=True)
class RequestTimes:
    """When a request went through the engine (time.monotonic() seconds): it arrived, was first scheduled (its
    prefill began), gave its first token, finished; and how often it was preempted. The replica's spans (engine.queue,
    engine.prefill, engine.decode) are these intervals. None: it never got that far (an abort)."""

    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float | None
    preemptions: int = 0


@dataclass
class RequestOutput:
    """One streamed delta of a request: what is new since the previous delta (the last one has `finished`)."""

    request_id: str
    new_token_ids: list[int]
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    usage: Usage | None = None
    times: RequestTimes | None = None  # on the last output only


@dataclass
class GenerationResult:
    """The whole of a finished request (what `Engine.generate` returns)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stop_reason: int | str | None
    logprobs: list[TokenLogprob] | None
    usage: Usage


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 eos_token_ids: tuple[int, ...] = (), priority: int = 0, arrival_time: float | None = None,
                 lora: LoraRegistration | None = None) -> None:
        self.request_id = request_id
        self.params = params
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.token_ids: list[int] = list(self.prompt_token_ids)  # prompt, then every sampled token
        self.num_computed_tokens = 0  # leading tokens whose keys/values are in the KV cache (or a step in flight's)
        # tokens sampled by a step still in flight (async scheduling), not yet in token_ids: the next step already
        # computes the first of them, whose id the executor takes from that step's result
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.generator: torch.Generator | None = params.make_generator()
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop |= set(eos_token_ids)
        self.stop_token_ids = frozenset(stop)
        self.block_hashes: list[bytes] = []  # hash chain of the full blocks of token_ids (filled lazily)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.stop_reason: int | str | None = None
        # streaming state
        self.text = ""  # detokenized output so far (cut at a stop string)
        self.num_sent_tokens = 0
        self.num_sent_text = 0
        self.first_scheduled_time: float | None = None  # set by the scheduler when it first admits it
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.constraint: Any = None  # a structured.ConstraintState when the completion is constrained
        # the LoRA adapter it runs with (None: the base model), held even if the adapter is unregistered meanwhile
        self.lora = lora
        self.lora_slot = -1  # the pool slot of its adapter while it runs (the scheduler pins it), -1: none

    # ------------------------------------------------------------------------------------------------ views
    @property
    def lora_name(self) -> str | None:
        return None if self.lora is None else self.lora.name

    @property
    def lora_id(self) -> int:
        """The adapter registration's number (unique per registration), 0 for the base model."""
        return 0 if self.lora is None else self.lora.lora_id

    @property
    def cache_salt(self) -> bytes:
        """What its prefix-cache hash chains start from (b"" for the base model; see `LoraRegistration`)."""
        return b"" if self.lora is None else self.lora.cache_salt

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        """The tokens the scheduler plans with: token_ids plus those a step in flight is sampling."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def usage(self) -> Usage:
        return Usage(self.num_prompt_tokens, self.num_output_tokens, self.num_cached_tokens)

    def times(self) -> RequestTimes:
        return RequestTimes(self.arrival_time, self.first_scheduled_time, self.first_token_time, self.finished_time,
                            self.num_preemptions)

    def sort_key(self, use_priority: bool) -> tuple[float, float]:
        """Scheduling order: earlier is served first and preempted last."""
        return (self.priority if use_priority else 0, self.arrival_time)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens})")
