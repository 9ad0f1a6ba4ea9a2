"""Model configuration: one frozen object read once from a checkpoint's config.json (either layout) or a preset.

Both published layouts describe the same architecture with different field names:
- Hugging Face (`model_type: gpt_oss`): `num_local_experts`, `num_experts_per_tok`, `rope_scaling` / `rope_parameters`,
  `layer_types`, `quantization_config`.
- Original OpenAI (`original/config.json`): `num_experts`, `experts_per_token`, `initial_context_length`,
  `rope_scaling_factor`, `rope_ntk_alpha` / `rope_ntk_beta`.
Unknown fields are refused (naming the field) rather than ignored: a silently dropped field is a silent wrong answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
MXFP4_BLOCK = 32  # values per MXFP4 block sharing one e8m0 scale
DEFAULT_EOS_TOKEN_ID = 200002  # <|return|> in o200k_harmony
DEFAULT_PAD_TOKEN_ID = 199999  # <|endoftext|>


class ConfigError(ValueError):
    """A config.json (or preset override) that does not describe a valid gpt-oss model."""


@dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    # RoPE with YaRN scaling
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_original_context: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False
    max_position_embeddings: int = 131072
    eos_token_id: int = DEFAULT_EOS_TOKEN_ID
    pad_token_id: int = DEFAULT_PAD_TOKEN_ID
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            # gpt-oss alternates, starting with a sliding-window layer.
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self._validate()

    # ----------------------------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        positive = (
            "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
            "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
            "rope_original_context", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "swiglu_limit", "swiglu_alpha", "rope_theta", "rope_scaling_factor",
                     "rope_beta_fast", "rope_beta_slow"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive number, got {value!r}")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"config field 'experts_per_token' ({self.experts_per_token}) exceeds "
                f"'num_experts' ({self.num_experts})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even for RoPE, got {self.head_dim}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % MXFP4_BLOCK:
                raise ConfigError(
                    f"config field '{name}' ({getattr(self, name)}) must be a multiple of {MXFP4_BLOCK} "
                    "(MXFP4 block size of the expert weights)"
                )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config field 'layer_types' has {len(self.layer_types)} entries but 'num_hidden_layers' is "
                f"{self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in (SLIDING, FULL):
                raise ConfigError(f"config field 'layer_types[{i}]' is {kind!r}; expected {SLIDING!r} or {FULL!r}")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"config field '{name}' ({value!r}) is outside the vocabulary [0, {self.vocab_size})")

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed; `layer_types` is re-derived when the layer count changes."""
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                raise ConfigError(f"unknown config field '{key}'")
        if "num_hidden_layers" in overrides and "layer_types" not in overrides:
            overrides["layer_types"] = ()
        return dataclasses.replace(self, **overrides)

    # ----------------------------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    # ----------------------------------------------------------------------------------------------- Hugging Face
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if data.get("model_type") != "gpt_oss":
            raise ConfigError(f"config field 'model_type' is {data.get('model_type')!r}; expected 'gpt_oss'")
        _refuse_unknown(data, _HF_FIELDS | _HF_IGNORED | _HF_GENERIC, "Hugging Face")
        rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError("config field 'rope_scaling' must be an object")
        if rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise ConfigError(
                f"config field 'rope_scaling.rope_type' is {rope.get('rope_type')!r}; gpt-oss uses 'yarn'"
            )
        quant = data.get("quantization_config")
        if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4"):
            raise ConfigError(
                f"config field 'quantization_config.quant_method' must be 'mxfp4', got {quant!r}"
            )
        for key, expected in (("hidden_act", "silu"), ("attention_bias", True), ("tie_word_embeddings", False),
                              ("is_encoder_decoder", False)):
            if key in data and data[key] != expected:
                raise ConfigError(f"config field '{key}' is {data[key]!r}; gpt-oss requires {expected!r}")
        experts_per_token = data.get("num_experts_per_tok", data.get("experts_per_token", 4))
        if "experts_per_token" in data and data["experts_per_token"] != experts_per_token:
            raise ConfigError("config fields 'num_experts_per_tok' and 'experts_per_token' disagree")
        # transformers 5 writes null token ids when the config names none; harmony's stop tokens end chat turns
        # whatever this says, so the published ids are the right fallback.
        eos = data.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        pad = data.get("pad_token_id")
        kwargs = dict(
            **_same_named_fields(data),
            num_experts=data.get("num_local_experts", 32),
            experts_per_token=experts_per_token,
            layer_types=tuple(data.get("layer_types") or ()),
            rms_norm_eps=data.get("rms_norm_eps", 1e-5),
            swiglu_alpha=data.get("swiglu_alpha", 1.702),
            rope_theta=rope.get("rope_theta", data.get("rope_theta", 150000.0)),
            rope_scaling_factor=rope.get("factor", 32.0),
            rope_original_context=rope.get(
                "original_max_position_embeddings", data.get("initial_context_length", 4096)
            ),
            rope_beta_fast=rope.get("beta_fast", 32.0),
            rope_beta_slow=rope.get("beta_slow", 1.0),
            rope_truncate=rope.get("truncate", True),
            max_position_embeddings=data.get("max_position_embeddings", 131072),
            eos_token_id=DEFAULT_EOS_TOKEN_ID if eos is None else eos,
            pad_token_id=DEFAULT_PAD_TOKEN_ID if pad is None else pad,
        )
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "experts_per_token": self.experts_per_token,
            "num_experts_per_tok": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.rope_original_context,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
                ],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.rope_original_context,
                "rope_type": "yarn",
                "truncate": self.rope_truncate,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    # ----------------------------------------------------------------------------------------------- original
    @classmethod
    def from_original_dict(cls, data: dict[str, Any]) -> ModelConfig:
        _refuse_unknown(data, _ORIGINAL_FIELDS, "original OpenAI")
        if data.get("rope_ntk_alpha", 1.0) <= 0 or data.get("rope_ntk_beta", 32.0) <= 0:
            raise ConfigError("config fields 'rope_ntk_alpha' and 'rope_ntk_beta' must be positive")
        return cls(
            **_same_named_fields(data),
            num_experts=data.get("num_experts", 32),
            experts_per_token=data.get("experts_per_token", 4),
            rope_theta=data.get("rope_theta", 150000.0),
            rope_scaling_factor=data.get("rope_scaling_factor", 32.0),
            rope_original_context=data.get("initial_context_length", 4096),
            rope_beta_fast=data.get("rope_ntk_beta", 32.0),
            rope_beta_slow=data.get("rope_ntk_alpha", 1.0),
            # The original reference computes the YaRN correction range in floats: never truncated.
            rope_truncate=False,
        )

    def to_original_dict(self) -> dict[str, Any]:
        if self.layer_types != ModelConfig(num_hidden_layers=self.num_hidden_layers).layer_types:
            raise ConfigError("the original layout cannot express non-alternating 'layer_types'")
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.rope_original_context,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_beta_slow,
            "rope_ntk_beta": self.rope_beta_fast,
        }

    # ----------------------------------------------------------------------------------------------- files
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Either layout, told apart by `model_type` (only the Hugging Face one has it)."""
        if not isinstance(data, dict):
            raise ConfigError("config.json must hold a JSON object")
        if "model_type" in data:
            return cls.from_hf_dict(data)
        return cls.from_original_dict(data)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except TypeError as exc:  # a field of the wrong JSON type reaching arithmetic
            raise ConfigError(f"{path}: {exc}") from None


# Fields both layouts spell as ModelConfig does.
_SAME_NAMED_FIELDS = (
    "num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
    "num_key_value_heads", "sliding_window", "swiglu_limit",
)


def _same_named_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The same-named fields `data` gives; the ones it leaves out keep ModelConfig's defaults."""
    return {name: data[name] for name in _SAME_NAMED_FIELDS if name in data}


def _refuse_unknown(data: dict[str, Any], known: set[str], layout: str) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown field '{key}' in a {layout} gpt-oss config")


_HF_FIELDS = {
    "model_type", "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "experts_per_token", "vocab_size",
    "hidden_size", "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
    "layer_types", "rms_norm_eps", "swiglu_limit", "swiglu_alpha", "rope_theta", "rope_scaling", "rope_parameters",
    "initial_context_length", "max_position_embeddings", "eos_token_id", "pad_token_id", "quantization_config",
    "hidden_act", "attention_bias", "tie_word_embeddings",
}
# Fields real checkpoints carry that do not change inference.
_HF_IGNORED = {
    "architectures", "attention_dropout", "initializer_range", "output_router_logits", "router_aux_loss_coef",
    "use_cache", "torch_dtype", "dtype", "transformers_version", "bos_token_id", "_name_or_path",
}
# The generic PretrainedConfig fields transformers 5 writes for every model (PretrainedConfig.to_dict of a
# GptOssConfig). None touches a causal LM's forward: they pick what a transformers forward returns (extra outputs,
# a tuple instead of a dict), label maps and loss kind for classification heads, and feed-forward chunking (same
# values, less memory). `is_encoder_decoder` is allowed only as False (checked in from_hf_dict).
_HF_GENERIC = {
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type",
}
_ORIGINAL_FIELDS = {
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size", "intermediate_size",
    "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
    "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta",
}

PRESETS: dict[str, ModelConfig] = {
    # The published dimensions of gpt-oss-20b and gpt-oss-120b.
    "20b": ModelConfig(name="20b", num_hidden_layers=24, num_experts=32),
    "120b": ModelConfig(name="120b", num_hidden_layers=36, num_experts=128),
    # Small enough for CPU tests, with the real vocabulary, window, RoPE and 4 KV heads / 8 experts so that
    # 1, 2 and 4 shards all divide it.
    "tiny": ModelConfig(
        name="tiny", num_hidden_layers=4, num_experts=8, hidden_size=192, intermediate_size=192, head_dim=32,
        num_attention_heads=8, num_key_value_heads=4,
    ),
}
