"""The offline API: load a checkpoint, generate from text, token ids or chat conversations, read logits.

    from gptoss_cluster import LLM, SamplingParams
    llm = LLM(model="/path/to/gpt-oss-20b")
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))[0]
    print(out.text)

LoRA adapters (PEFT's adapter_config.json + adapter_model.safetensors), chosen per prompt:

    llm = LLM(model=..., lora_modules={"sql": "/adapters/sql"}, engine_config=EngineConfig(max_loras=4))
    outs = llm.generate(["Hello", "SELECT"], params, lora=[None, "sql"])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptoss_cluster.workers.checkpoint import open_checkpoint
from gptoss_cluster.workers.engine import Engine, EngineConfig
from gptoss_cluster.workers.engine.engine import per_request_lora
from gptoss_cluster.workers.engine.ray_executor import as_dtype
from gptoss_cluster.workers.harmony import ParsedMessage, get_tokenizer, parse_completion, render_chat
from gptoss_cluster.workers.lora.adapter import AdapterInfo
from gptoss_cluster.workers.model import GptOssModel, KVCache
from gptoss_cluster.workers.sampling import SamplingParams

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


@dataclass
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens)
    # Chat prompts only: the generated tokens parsed into harmony messages (analysis / commentary / final).
    messages: list[ParsedMessage] = field(default_factory=list)


class LLM:
    def __init__(self, model: str | Path, dtype: str | torch.dtype = "auto", progress: bool = True,
                 engine_config: EngineConfig | None = None, num_shards: int = 1, placement_strategy: str = "PACK",
                 lora_modules: dict[str, str] | None = None, **executor_kwargs: Any) -> None:
        """`num_shards` > 1 splits the model over that many ShardWorker actors (a RayExecutor, as in a served
        replica): on the Ray this process is connected to, else $RAY_ADDRESS, else a local Ray started on loopback
        (and stopped by `shutdown()`). `executor_kwargs` go to `make_executor` (device, cpus_per_shard,
        placement_group, timeouts, ...). `lora_modules` registers LoRA adapters by name -> PEFT adapter directory
        (`engine_config` sets `max_loras` resident and `max_lora_rank`); a prompt picks one by name."""
        if lora_modules is not None and not isinstance(lora_modules, dict):
            raise ValueError(f"lora_modules maps adapter names to directories, got {type(lora_modules).__name__}")
        dtype = as_dtype(dtype)
        self.tokenizer = get_tokenizer()
        if num_shards != 1:
            from gptoss_cluster.workers.engine.ray_executor import make_executor

            limits = engine_config or EngineConfig()  # every shard sizes its LoRA pool as the engine does
            executor = make_executor(model, num_shards, dtype=dtype, placement_strategy=placement_strategy,
                                     max_loras=limits.max_loras, max_lora_rank=limits.max_lora_rank,
                                     **executor_kwargs)
            self.config, self.model = executor.model_config, None  # the model lives in the shards
            try:
                self.engine = Engine(executor, self.config, engine_config, tokenizer=self.tokenizer)
                for name, path in (lora_modules or {}).items():
                    self.engine.add_lora(name, path)
            except BaseException:
                executor.shutdown()
                raise
            return
        if executor_kwargs:
            raise TypeError(f"{', '.join(executor_kwargs)}: executor options, for num_shards > 1 only")
        with open_checkpoint(model) as reader:
            self.config = reader.config
            self.model = GptOssModel.from_checkpoint(reader, dtype=dtype, progress=progress)
        # generate() runs on the serving engine (continuous batching, paged KV, prefix cache, full sampling).
        self.engine = Engine.from_model(self.model, engine_config, tokenizer=self.tokenizer)
        for name, path in (lora_modules or {}).items():
            self.engine.add_lora(name, path)

    def shutdown(self) -> None:
        """Stop the shards (and the Ray this LLM started, if it did); a no-op for the in-process model."""
        self.engine.executor.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------------------------------------ prompts
    def _prompt_token_ids(self, prompt: Prompt) -> tuple[list[int], bool]:
        """(token ids, is_chat) for a text, a token-id list, or a chat conversation (a list of message dicts)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt), False
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prompt is empty")
        if all(isinstance(m, dict) for m in prompt):
            return render_chat(prompt), True
        self._check_token_ids(prompt)
        return [int(t) for t in prompt], False

    def _check_token_ids(self, token_ids: Sequence[int]) -> None:
        if len(token_ids) == 0:
            raise ValueError("token_ids is empty")
        vocab = self.config.vocab_size
        for i, token in enumerate(token_ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise ValueError(f"token id {token!r} at position {i} is outside the vocabulary [0, {vocab})")
        if len(token_ids) > self.config.max_position_embeddings:
            raise ValueError(f"{len(token_ids)} tokens exceed the context of {self.config.max_position_embeddings}")

    # ------------------------------------------------------------------------------------------------ LoRA
    def add_lora(self, name: str, path: str | Path) -> AdapterInfo:
        """Register a PEFT adapter directory under `name` (validated now: LoraError naming what is unsupported)."""
        return self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> bool:
        """Unregister an adapter (False: no such name)."""
        return self.engine.remove_lora(name)

    def list_loras(self) -> list[AdapterInfo]:
        return self.engine.list_loras()

    # ------------------------------------------------------------------------------------------------ API
    def forward_logits(self, token_ids: Sequence[int], lora: str | None = None) -> torch.Tensor:
        """float32 logits [len, vocab] of a whole sequence (with the LoRA adapter `lora`), for verification against
        other implementations."""
        token_ids = list(token_ids)
        self._check_token_ids(token_ids)
        if self.model is None or lora is not None:  # sharded, or an adapter: one forward through the executor
            return self.engine.forward_logits(token_ids, lora)
        cache = self.model.new_kv_cache(len(token_ids))
        return self._forward(token_ids, cache, all_logits=True)

    def _forward(self, token_ids: list[int], cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Run `token_ids` continuing `cache`; logits of every position, or of the last only."""
        device = self.model.device
        n = len(token_ids)
        logits_at = torch.arange(n, device=device) if all_logits else torch.tensor([n - 1], device=device)
        logits = self.model(torch.tensor(token_ids, dtype=torch.long, device=device), cache.positions(n), cache,
                            logits_at)
        cache.advance(n)
        return logits

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 lora: str | Sequence[str | None] | None = None) -> list[CompletionOutput]:
        """Complete every prompt (a text, token ids or a chat conversation), batched; `lora` is the adapter name of
        every prompt or a list of one name (or None: the base model) per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and not isinstance(
                prompts[0], (str, list, tuple))):
            prompts = [prompts]  # one prompt: a text, a token-id list or a conversation
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        loras = per_request_lora(lora, len(prompts))
        # Validate every prompt before running any, so one bad prompt costs no compute.
        encoded = [self._prompt_token_ids(p) for p in prompts]
        for (ids, _), params in zip(encoded, sampling_params, strict=True):
            if len(ids) + params.max_tokens > self.config.max_position_embeddings:
                raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceed the context "
                                 f"of {self.config.max_position_embeddings}")
        # Chat ends on harmony's assistant-action stops (<|return|>, <|call|>), never on <|end|>.
        requests = [(ids, params, tuple(self.tokenizer.stop_token_ids_for_chat) if is_chat
                     else (self.config.eos_token_id,))
                    for (ids, is_chat), params in zip(encoded, sampling_params, strict=True)]
        results = self.engine.generate(requests, lora=loras)
        return [CompletionOutput(
            prompt_token_ids=list(result.prompt_token_ids),
            token_ids=list(result.token_ids),
            text=result.text if result.text is not None else self.tokenizer.decode(result.token_ids),
            finish_reason=result.finish_reason,
            messages=_parse_or_empty(result.token_ids) if is_chat else [],
        ) for result, (_, is_chat) in zip(results, encoded, strict=True)]


def _parse_or_empty(token_ids: Sequence[int]) -> list[ParsedMessage]:
    """Harmony messages of a completion; a random or cut-off model output may not parse, which is not an error."""
    try:
        return parse_completion(token_ids)
    except ValueError:
        return []
