"""PEFT LoRA adapters for gpt-oss: validate one on disk (`read_adapter`), load one shard's slices (`load_adapter`).

An adapter is a folder as `peft.PeftModel.save_pretrained` writes it: `adapter_config.json` and
`adapter_model.safetensors`, with tensors named

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight    [r, in]
    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_B.weight    [out, r]
    base_model.model.model.layers.{i}.mlp.experts[.base_layer]*.lora_A.weight    [E * r, in]   (expert-major rows)
    base_model.model.model.layers.{i}.mlp.experts[.base_layer]*.lora_B.weight    [out, E * r]  (expert-minor columns)

The expert pairs come from PEFT's `target_parameters` (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`): two
targeted parameters of one module nest as wrappers, so their names differ only in `.base_layer`; which is which is
told by shape (gate_up: in H, out 2I; down: in I, out H: never the same). Expert e's update is
B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e] (peft ParamWrapper.get_delta_weight). The delta of every
module is scaling * B @ (A @ x) with scaling = alpha / r (alpha / sqrt(r) with rsLoRA), r and alpha per module from
`rank_pattern` / `alpha_pattern` when they name it.

Which layers and modules an adapter touches is read from its tensors (PEFT applies `layers_to_transform` to
`target_modules` only, and a `target_parameters` entry may name one layer's experts). Anything this server cannot
apply exactly is refused with a `LoraError` naming it: DoRA, trained biases, `modules_to_save`, modules gpt-oss LoRA
serving does not cover (embeddings, lm_head, the router), ranks above `max_lora_rank`, tensors of the wrong shape.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptoss_cluster.workers.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
MODULES = ATTENTION_MODULES + EXPERT_PARAMS  # the names AdapterInfo.target_modules uses
SUPPORTED = "self_attn q_proj, k_proj, v_proj, o_proj and mlp.experts gate_up_proj, down_proj"

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\."
                  r"(self_attn\.([qkvo])_proj|mlp\.experts((?:\.base_layer)*))\.lora_([AB])\.weight$")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class LoraError(ValueError):
    """A bad or unsupported adapter; the message names the option, module or tensor at fault."""


class LoraNotFoundError(LookupError):
    """A request or call named an adapter that is not registered."""


@dataclass(frozen=True)
class LoraSource:
    """A registered adapter: its served name and its folder. What crosses to the shards (each loads its slices)."""

    name: str
    path: str


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int  # the largest rank over its modules
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # of MODULES, in that order
    layers: tuple[int, ...]  # layers with at least one adapted module
    num_bytes: int  # every A and B, unsharded, in the model dtype read_adapter was given
    num_params: int = 0


@dataclass(frozen=True)
class ModuleLora:
    """One adapted module of one layer, as found in the file (before any sharding)."""

    layer: int
    module: str  # of MODULES
    a_key: str
    b_key: str
    rank: int
    scaling: float


@dataclass
class LayerLora:
    """One layer's adapter slices on one shard, scaling folded into every B. A missing module is None.

    qkv: one shrink for q, k and v together, qkv_a [Rq + Rk + Rv, H] (the projections' A rows stacked); one expand
    per projection, `qkv_parts`: (first output column in the fused qkv of this rank's heads, first column of the
    shrunk rows, B [out_local, r]).
    o: o_a [r, Hq_local D] (the columns of this rank's heads, like out_weight), o_b [H, r].
    experts (this rank's E_local): gate_up_a [E_local, r, H], gate_up_b [E_local, 2I, r], down_a [E_local, r, I],
    down_b [E_local, H, r].
    """

    qkv_a: torch.Tensor | None = None
    qkv_parts: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    o_a: torch.Tensor | None = None
    o_b: torch.Tensor | None = None
    gate_up_a: torch.Tensor | None = None
    gate_up_b: torch.Tensor | None = None
    down_a: torch.Tensor | None = None
    down_b: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.qkv_a, *(b for _, _, b in self.qkv_parts), self.o_a, self.o_b, self.gate_up_a,
                            self.gate_up_b, self.down_a, self.down_b) if t is not None]

    @property
    def has_experts(self) -> bool:
        return self.gate_up_a is not None or self.down_a is not None


@dataclass
class AdapterWeights:
    """One adapter on one shard: its layers' slices (index = layer; None where it adapts nothing)."""

    info: AdapterInfo
    layers: list[LayerLora | None] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def num_bytes(self) -> int:
        """Bytes this shard holds for the adapter."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer is not None
                   for t in layer.tensors())


# ---------------------------------------------------------------------------------------------------- reading
def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise LoraError(f"adapter folder {folder} does not exist")
    if not path.is_file():
        raise LoraError(f"adapter folder {folder} has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoraError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{path} does not hold a JSON object")
    return config


def _read_header(folder: Path) -> dict[str, dict[str, Any]]:
    """The safetensors header (name -> {dtype, shape, data_offsets}): the file's first 8 + n bytes, no tensor data."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        other = "adapter_model.bin" if (folder / "adapter_model.bin").is_file() else None
        hint = f" (only {other}, a pickle: save with safe_serialization=True)" if other else ""
        raise LoraError(f"adapter folder {folder} has no {WEIGHTS_FILE}{hint}")
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > path.stat().st_size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise LoraError(f"{path} is not a safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    return header


def _check_options(config: dict[str, Any]) -> None:
    """Refuse every option whose effect this server does not reproduce, naming it."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraError(f"peft_type {peft_type!r} is not supported (only LORA)")
    bias, saved = config.get("bias", "none"), config.get("modules_to_save")
    refused = [
        (config.get("use_dora"), "DoRA (use_dora=true) is not supported"),
        (bias not in ("none", None), f"bias={bias!r} is not supported: trained biases are not applied (need 'none')"),
        (config.get("lora_bias"), "lora_bias=true is not supported (biases on lora_B)"),
        (saved, f"modules_to_save={saved!r} is not supported: fully trained modules are not served"),
        (config.get("trainable_token_indices"), "trainable_token_indices is not supported (trained embedding rows)"),
        (config.get("layer_replication"), "layer_replication is not supported"),
        (config.get("fan_in_fan_out"), "fan_in_fan_out=true is not supported"),
        (config.get("use_qalora"), "QALoRA (use_qalora=true) is not supported"),
        (config.get("alora_invocation_tokens"), "aLoRA (alora_invocation_tokens) is not supported"),
        (config.get("use_bdlora"), "use_bdlora is not supported"),
    ]
    refused += [(config.get(name) is not None, f"{name} is not supported")
                for name in ("velora_config", "kasa_config", "arrow_config")]
    for bad, message in refused:
        if bad:
            raise LoraError(message)
    targets = config.get("target_modules") or []
    if isinstance(targets, list):  # a string is a regex over module names: the tensors say what it matched
        for name in targets:
            if str(name).rsplit(".", 1)[-1] not in ATTENTION_MODULES:
                raise LoraError(f"target module {name!r} is not supported (gpt-oss LoRA serving covers {SUPPORTED})")
    for name in config.get("target_parameters") or []:
        module, _, param = str(name).rpartition(".")
        if param not in EXPERT_PARAMS or not (module == "experts" or module.endswith(".experts")):
            raise LoraError(f"target parameter {name!r} is not supported (gpt-oss LoRA serving covers {SUPPORTED})")


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first pattern that matches
    the end of the module's key at a dot boundary."""
    for pattern in patterns or {}:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def _shape(header: dict[str, dict[str, Any]], key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in header[key]["shape"])


def _scan(source: LoraSource, config: ModelConfig, max_lora_rank: int
          ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[ModuleLora]]:
    """Check an adapter folder against the model: (adapter config, safetensors header, its modules)."""
    folder = Path(source.path)
    cfg = _read_config(folder)
    _check_options(cfg)
    header = _read_header(folder)
    use_rslora = bool(cfg.get("use_rslora", False))
    default_r, default_alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    hidden, inter, num_experts = config.hidden_size, config.intermediate_size, config.num_experts
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    # module -> (in features, out features)
    features = {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
                "o_proj": (q_out, hidden), "gate_up_proj": (hidden, 2 * inter), "down_proj": (inter, hidden)}

    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key, meta in header.items():
        match = _KEY.match(key)
        if match is None:
            module = key.removeprefix(_PREFIX).split(".lora_", 1)[0].split(".lora_embedding_", 1)[0]
            raise LoraError(f"adapter tensor {key!r} targets {module!r}, which is not supported (gpt-oss LoRA serving "
                            f"covers {SUPPORTED})")
        if meta.get("dtype") not in _DTYPES:
            raise LoraError(f"adapter tensor {key!r} has dtype {meta.get('dtype')}, not a float type")
        layer, attn, nesting, which = int(match[1]), match[3], match[4], match[5]
        if layer >= config.num_hidden_layers:
            raise LoraError(f"adapter tensor {key!r} names layer {layer}; the model has {config.num_hidden_layers}")
        ident = f"{attn}_proj" if attn else f"experts{nesting}"
        pairs.setdefault((layer, ident), {})[which] = key

    modules: list[ModuleLora] = []
    for (layer, ident), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            have, missing = next(iter(ab.values())), "lora_B" if "A" in ab else "lora_A"
            raise LoraError(f"adapter tensor {have!r} has no {missing} partner")
        a_shape, b_shape = _shape(header, ab["A"]), _shape(header, ab["B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise LoraError(f"adapter tensors {ab['A']!r} {list(a_shape)} and {ab['B']!r} {list(b_shape)} are not a "
                            "LoRA pair [r, in], [out, r]")
        if ident.startswith("experts"):
            found = [p for p in EXPERT_PARAMS if features[p] == (a_shape[1], b_shape[0])]
            if not found or a_shape[0] % num_experts:
                raise LoraError(f"adapter tensors {ab['A']!r} {list(a_shape)} / {ab['B']!r} {list(b_shape)} fit "
                                f"neither expert parameter of this model (gate_up_proj: in {hidden}, out {2 * inter}; "
                                f"down_proj: in {inter}, out {hidden}; rows a multiple of {num_experts} experts)")
            module, rank = found[0], a_shape[0] // num_experts
            key = f"model.layers.{layer}.mlp.experts.{module}"
            listed = cfg.get("target_parameters") or []
            if not any(str(t).rpartition(".")[2] == module for t in listed):
                raise LoraError(f"adapter tensor {ab['A']!r} is a {module} update by its shape, but the config's "
                                f"target_parameters {listed} do not name {module}")
        else:
            module, rank = ident, a_shape[0]
            if (a_shape[1], b_shape[0]) != features[module]:
                want_in, want_out = features[module]
                raise LoraError(f"adapter tensors of layer {layer} {module} have shapes {list(a_shape)} / "
                                f"{list(b_shape)}; this model needs [r, {want_in}] / [{want_out}, r]")
            key = f"model.layers.{layer}.self_attn.{module}"
        if any(m.layer == layer and m.module == module for m in modules):
            raise LoraError(f"adapter holds two {module} updates for layer {layer}")
        r = _pattern_value(cfg.get("rank_pattern"), key, default_r)
        alpha = _pattern_value(cfg.get("alpha_pattern"), key, default_alpha)
        if r != rank:
            raise LoraError(f"{key}: its tensors have rank {rank}, the adapter config says r={r}")
        if rank > max_lora_rank:
            raise LoraError(f"{key} has rank {rank}, above max_lora_rank={max_lora_rank}")
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules.append(ModuleLora(layer, module, ab["A"], ab["B"], rank, scaling))
    if not modules:
        raise LoraError(f"adapter {source.name!r} at {folder} holds no LoRA tensors")
    return cfg, header, modules


def read_adapter(source: LoraSource, model_config: ModelConfig, max_lora_rank: int,
                 dtype: torch.dtype = torch.bfloat16) -> AdapterInfo:
    """Validate an adapter folder against the model from its config and safetensors header only (no tensor data);
    raises LoraError naming what does not fit. `dtype`: the model's, for `num_bytes`."""
    return _info(source, *_scan(source, model_config, max_lora_rank), dtype)


def _info(source: LoraSource, cfg: dict[str, Any], header: dict[str, dict[str, Any]], modules: list[ModuleLora],
          dtype: torch.dtype) -> AdapterInfo:
    num_params = sum(math.prod(_shape(header, k)) for m in modules for k in (m.a_key, m.b_key))
    present = {m.module for m in modules}
    return AdapterInfo(
        name=source.name, path=str(source.path), rank=max(m.rank for m in modules),
        lora_alpha=cfg.get("lora_alpha", 8), use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=tuple(m for m in MODULES if m in present), layers=tuple(sorted({m.layer for m in modules})),
        num_bytes=num_params * torch.empty((), dtype=dtype).element_size(), num_params=num_params)


def load_adapter(source: LoraSource, model_config: ModelConfig, shard: Any, max_lora_rank: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> AdapterWeights:
    """This shard's slices of an adapter (`shard`: the model's ShardSpec), scaling folded into B, in `dtype` on
    `device`: attention heads as the base weights are split (q/k/v rows of B by head, o's A by column), experts
    [first, first + E_local) under expert parallelism. Validates like `read_adapter`."""
    from safetensors import safe_open

    cfg, header, modules = _scan(source, model_config, max_lora_rank)
    info = _info(source, cfg, header, modules, dtype)
    head_dim, num_experts = model_config.head_dim, model_config.num_experts
    q0, q1 = shard.span(model_config.num_attention_heads, "attention heads")
    kv0, kv1 = shard.span(model_config.num_key_value_heads, "KV heads")
    e0, e1 = shard.span(num_experts, "experts")
    q_rows, kv_rows = slice(q0 * head_dim, q1 * head_dim), slice(kv0 * head_dim, kv1 * head_dim)
    q_size, kv_size = (q1 - q0) * head_dim, (kv1 - kv0) * head_dim

    layers: list[LayerLora | None] = [None] * model_config.num_hidden_layers
    with safe_open(str(Path(source.path) / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        def read(key: str) -> torch.Tensor:
            return f.get_tensor(key).to(torch.float32)  # scaling folded in float32, then cast once

        by_layer: dict[int, dict[str, ModuleLora]] = {}
        for m in modules:
            by_layer.setdefault(m.layer, {})[m.module] = m
        for layer, found in by_layer.items():
            out = LayerLora()
            qkv = [(found[p], rows, size) for p, rows, size in
                   (("q_proj", q_rows, q_size), ("k_proj", kv_rows, kv_size), ("v_proj", kv_rows, kv_size))
                   if p in found]  # in the fused order
            if qkv:
                first_column = {"q_proj": 0, "k_proj": q_size, "v_proj": q_size + kv_size}
                a_parts, rank0 = [], 0
                for m, rows, _ in qkv:
                    a_parts.append(read(m.a_key))
                    b = (read(m.b_key)[rows] * m.scaling).to(device=device, dtype=dtype).contiguous()
                    out.qkv_parts.append((first_column[m.module], rank0, b))
                    rank0 += m.rank
                out.qkv_a = torch.cat(a_parts, dim=0)
            if "o_proj" in found:
                m = found["o_proj"]
                out.o_a, out.o_b = read(m.a_key)[:, q_rows], read(m.b_key) * m.scaling
            for module, prefix in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
                if module not in found:
                    continue
                m = found[module]
                a, b = read(m.a_key), read(m.b_key)
                a = a.reshape(num_experts, m.rank, a.shape[-1])[e0:e1]  # expert-major rows: [E_local, r, in]
                # expert-minor columns (index = rank_index * E + expert) -> [E_local, out, r]
                b = b.reshape(b.shape[0], m.rank, num_experts).permute(2, 0, 1)[e0:e1]
                setattr(out, f"{prefix}_a", a)
                setattr(out, f"{prefix}_b", b * m.scaling)
            for name in ("qkv_a", "o_a", "o_b", "gate_up_a", "gate_up_b", "down_a", "down_b"):
                tensor = getattr(out, name)
                if tensor is not None:
                    setattr(out, name, tensor.to(device=device, dtype=dtype).contiguous())
            layers[layer] = out
    return AdapterWeights(info, layers)
