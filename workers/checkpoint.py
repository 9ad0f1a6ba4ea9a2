"""Checkpoint I/O: lazy, sliced safetensors reading for both published layouts, and a synthetic checkpoint writer.

Reading. `open_checkpoint(path)` reads config.json (either layout), then every safetensors header, and checks - without
touching tensor data - that every tensor the model needs is there with the right shape and dtype and that every file
is as long as its header says (so a truncated download fails at open, not mid-inference). `reader.read(name, index)`
then reads only the requested slice through `safetensors.safe_open(...).get_slice(...)`; file handles stay open for
the reader's life. Names are always the canonical (Hugging Face) ones; for the original OpenAI layout they are mapped
onto the stored tensors (q/k/v become row ranges of the fused `qkv` tensor). A Hugging Face checkpoint may also hold
its experts as float tensors, as transformers saves them (`experts.gate_up_proj` [E, H, 2I], `experts.down_proj`
[E, I, H]: every fine-tune, every dequantized save); the canonical MXFP4 `*_blocks` / `*_scales` are then quantized
from them on read, exactly when the values are MXFP4 values (a dequantized save), rounded otherwise (logged).

Writing. `write_checkpoint(config, out_dir, layout=..., seed=...)` writes deterministic random weights in either
layout. Every value is a pure function of (seed, canonical tensor name, chunk index) - see `synthetic_tensor` - so both
layouts hold the same model and the same seed gives byte-identical files. Tensors are generated chunk by chunk and
streamed straight into the safetensors files (header first, then the data in order), so peak memory is a few hundred
MB even for 120b. The output appears atomically: everything is written to a hidden temporary directory next to
`out_dir` and renamed into place at the end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptoss_cluster.kernels.mxfp4 import BLOCK, BYTES_PER_BLOCK, dequantize_mxfp4, quantize_mxfp4
from gptoss_cluster.workers.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
HF_INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
LAYOUTS = ("hf", "original")

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
UINT8 = (torch.uint8,)

# safetensors dtype strings <-> torch dtypes
_ST_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors refuses larger headers

PROGRESS_MIN_BYTES = 256 * 1024 * 1024  # below this, no progress bar
SINGLE_FILE_LIMIT = 2 * 1024**3  # checkpoints smaller than this are written as one file by default
DEFAULT_SHARD_BYTES = 4 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and, where there is one, the tensor."""


class _CheckpointConfigError(CheckpointError, ConfigError):
    """A bad config.json: catchable as either error."""


# =================================================================================================== tensor specs
@dataclass(frozen=True)
class TensorSpec:
    """One tensor the model needs: canonical name, shape and the dtypes accepted on disk (the first is written)."""

    name: str
    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.dtypes[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def expected_tensors(config: ModelConfig) -> dict[str, TensorSpec]:
    """Canonical (Hugging Face) name -> spec of every tensor of a gpt-oss checkpoint, in checkpoint order."""
    h, v, e, i = config.hidden_size, config.vocab_size, config.num_experts, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    specs: list[TensorSpec] = [TensorSpec("model.embed_tokens.weight", (v, h), FLOAT_DTYPES)]
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        a, m = p + "self_attn.", p + "mlp."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), FLOAT_DTYPES),
            TensorSpec(a + "q_proj.weight", (q, h), FLOAT_DTYPES),
            TensorSpec(a + "q_proj.bias", (q,), FLOAT_DTYPES),
            TensorSpec(a + "k_proj.weight", (kv, h), FLOAT_DTYPES),
            TensorSpec(a + "k_proj.bias", (kv,), FLOAT_DTYPES),
            TensorSpec(a + "v_proj.weight", (kv, h), FLOAT_DTYPES),
            TensorSpec(a + "v_proj.bias", (kv,), FLOAT_DTYPES),
            TensorSpec(a + "o_proj.weight", (h, q), FLOAT_DTYPES),
            TensorSpec(a + "o_proj.bias", (h,), FLOAT_DTYPES),
            TensorSpec(a + "sinks", (config.num_attention_heads,), FLOAT_DTYPES),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), FLOAT_DTYPES),
            TensorSpec(m + "router.weight", (e, h), FLOAT_DTYPES),
            TensorSpec(m + "router.bias", (e,), FLOAT_DTYPES),
            TensorSpec(m + "experts.gate_up_proj_blocks", (e, 2 * i, h // BLOCK, BYTES_PER_BLOCK), UINT8),
            TensorSpec(m + "experts.gate_up_proj_scales", (e, 2 * i, h // BLOCK), UINT8),
            TensorSpec(m + "experts.gate_up_proj_bias", (e, 2 * i), FLOAT_DTYPES),
            TensorSpec(m + "experts.down_proj_blocks", (e, h, i // BLOCK, BYTES_PER_BLOCK), UINT8),
            TensorSpec(m + "experts.down_proj_scales", (e, h, i // BLOCK), UINT8),
            TensorSpec(m + "experts.down_proj_bias", (e, h), FLOAT_DTYPES),
        ]
    specs += [
        TensorSpec("model.norm.weight", (h,), FLOAT_DTYPES),
        TensorSpec("lm_head.weight", (v, h), FLOAT_DTYPES),
    ]
    return {s.name: s for s in specs}


# ---------------------------------------------------------------------------------------------- original layout
_HF_TO_ORIGINAL_TOP = {
    "model.embed_tokens.weight": "embedding.weight",
    "lm_head.weight": "unembedding.weight",
    "model.norm.weight": "norm.scale",
}
_HF_TO_ORIGINAL_LAYER = {
    "input_layernorm.weight": "attn.norm.scale",
    "self_attn.q_proj.weight": "attn.qkv.weight",
    "self_attn.k_proj.weight": "attn.qkv.weight",
    "self_attn.v_proj.weight": "attn.qkv.weight",
    "self_attn.q_proj.bias": "attn.qkv.bias",
    "self_attn.k_proj.bias": "attn.qkv.bias",
    "self_attn.v_proj.bias": "attn.qkv.bias",
    "self_attn.sinks": "attn.sinks",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
    "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
    "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class _Stored:
    """Where a canonical tensor lives: a stored tensor name and, for q/k/v of a fused qkv, its row range; for MXFP4
    expert weights stored as floats, which half ("blocks" or "scales") of their quantization it is."""

    name: str
    rows: tuple[int, int] | None = None
    mxfp4: str | None = None


def original_location(config: ModelConfig, name: str) -> tuple[str, tuple[int, int] | None]:
    """Canonical name -> (original-layout tensor name, row range within it or None for the whole tensor)."""
    if name in _HF_TO_ORIGINAL_TOP:
        return _HF_TO_ORIGINAL_TOP[name], None
    match = _LAYER_RE.fullmatch(name)
    if match is None or match.group(2) not in _HF_TO_ORIGINAL_LAYER:
        raise KeyError(name)
    layer, rest = match.groups()
    stored = f"block.{layer}.{_HF_TO_ORIGINAL_LAYER[rest]}"
    q, kv = config.q_size, config.kv_size
    ranges = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    proj = rest.split(".")[1] if rest.startswith("self_attn.") else ""
    return stored, ranges.get(proj)


# Canonical MXFP4 expert tensor -> (the float tensor transformers stores instead, which half of the quantization).
_MXFP4_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.(?:gate_up_proj|down_proj))_(blocks|scales)")


def _hf_stored_specs(
    canonical: dict[str, TensorSpec], present: Iterable[str]
) -> tuple[dict[str, TensorSpec], dict[str, _Stored]]:
    """The Hugging Face layout: each canonical tensor stored under its own name, except experts whose `*_blocks` are
    absent and whose float weight (input features first: [E, K, rows]) is present; those are read from the floats."""
    present = set(present)
    stored: dict[str, TensorSpec] = {}
    where: dict[str, _Stored] = {}
    for name, spec in canonical.items():
        match = _MXFP4_EXPERT.fullmatch(name)
        if match is None or match.group(1) not in present or f"{match.group(1)}_blocks" in present:
            stored[name], where[name] = spec, _Stored(name)
            continue
        weight = match.group(1)
        experts, rows, groups = spec.shape[:3]
        stored[weight] = TensorSpec(weight, (experts, groups * BLOCK, rows), FLOAT_DTYPES)
        where[name] = _Stored(weight, mxfp4=match.group(2))
    return stored, where


def _stored_specs(
    config: ModelConfig, layout: str, present: Iterable[str] = ()
) -> tuple[dict[str, TensorSpec], dict[str, _Stored]]:
    """(stored name -> spec in file order, canonical name -> location) for a layout; `present` (the stored names)
    tells which form a Hugging Face checkpoint's experts take."""
    canonical = expected_tensors(config)
    if layout == "hf":
        return _hf_stored_specs(canonical, present)
    stored: dict[str, TensorSpec] = {}
    where: dict[str, _Stored] = {}
    fused_rows = config.q_size + 2 * config.kv_size
    for name, spec in canonical.items():
        orig, rows = original_location(config, name)
        where[name] = _Stored(orig, rows)
        if orig in stored:
            continue
        shape = (fused_rows, *spec.shape[1:]) if rows is not None else spec.shape
        stored[orig] = TensorSpec(orig, shape, spec.dtypes)
    return stored, where


# =================================================================================================== progress
def progress_enabled(total_bytes: int, progress: bool = True) -> bool:
    """Whether to show a progress bar: allowed, stderr a TTY, enough bytes, and GPTOSS_NO_PROGRESS unset/0."""
    if not progress or os.environ.get("GPTOSS_NO_PROGRESS", "0") not in ("", "0"):
        return False
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and total_bytes >= PROGRESS_MIN_BYTES


def progress_bar(total_bytes: int, desc: str, progress: bool = True) -> Any:
    """A tqdm bar counting bytes (a disabled one when `progress_enabled` says no)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not progress_enabled(total_bytes, progress), dynamic_ncols=True, leave=False,
    )


# =================================================================================================== headers
@dataclass(frozen=True)
class _HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_header(path: Path) -> tuple[dict[str, _HeaderEntry], int]:
    """Parse and sanity-check a safetensors header: (entries, file size). Raises CheckpointError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header length {n} exceeds the file's {size} bytes)"
                )
            if n > _HEADER_LIMIT:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} is implausibly large)")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    entries: dict[str, _HeaderEntry] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        itemsize = _ST_DTYPES[dtype].itemsize if dtype in _ST_DTYPES else None
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor '{name}' ({dtype} {list(shape)}) has "
                f"{end - begin} bytes of data"
            )
        entries[name] = _HeaderEntry(dtype, shape, begin, end)
        data_end = max(data_end, end)
    expected_size = 8 + n + data_end
    if expected_size > size:
        raise CheckpointError(
            f"{path}: truncated: its header describes {expected_size} bytes but the file has only {size}"
        )
    if expected_size < size:
        raise CheckpointError(
            f"{path}: corrupt: its header describes {expected_size} bytes but the file has {size}"
        )
    return entries, size


def _fmt_dtype(dtype: torch.dtype) -> str:
    return _ST_NAMES.get(dtype, str(dtype))


# =================================================================================================== reader
class CheckpointReader:
    """Validated, lazy access to one checkpoint directory (either layout). Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._handles: dict[Path, Any] = {}
        self._fds: dict[Path, int] = {}  # plain descriptors for pread: reads that leave no file mapping resident
        self._data_start: dict[Path, int] = {}
        self._closed = False
        # The other half of the last float experts quantized: ((stored name, expert range, half), tensor). The
        # model reads blocks then scales of the same experts, so each is quantized once.
        self._mxfp4_spare: tuple[tuple[str, range, str], torch.Tensor] | None = None
        self._warned_rounding = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ opening
    def _open(self) -> None:
        path = self.path
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory holding config.json)")
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{path}: not a checkpoint directory (no {CONFIG_FILE})")
        try:
            self.config = ModelConfig.from_json(config_path)
            raw = json.loads(config_path.read_text())
        except ConfigError as exc:
            raise _CheckpointConfigError(str(exc)) from exc
        self.layout = "hf" if "model_type" in raw else "original"

        files = self._data_files()
        self._headers: dict[Path, dict[str, _HeaderEntry]] = {}
        self.file_size_bytes = 0
        for file in files:
            entries, size = _read_header(file)
            self._headers[file] = entries
            self.file_size_bytes += size
            # the data section ends the file (checked by _read_header), so it starts this far in
            self._data_start[file] = size - max((e.end for e in entries.values()), default=0)
            self._fds[file] = os.open(file, os.O_RDONLY)
        for file in files:
            try:
                from safetensors import safe_open

                handle = safe_open(str(file), framework="pt")
                handle.__enter__()
            except Exception as exc:  # SafetensorError, OSError, ...
                raise CheckpointError(f"{file}: cannot open as safetensors ({exc})") from None
            self._handles[file] = handle

        # Which file holds each stored tensor.
        self._file_of: dict[str, Path] = {}
        for file in files:
            for name in self._headers[file]:
                if self._listed is not None and self._listed.get(name, file) != file:
                    continue  # the index says it lives elsewhere: only that copy counts
                if name in self._file_of:
                    raise CheckpointError(
                        f"{path}: tensor '{name}' appears in both {self._file_of[name].name} and {file.name}"
                    )
                self._file_of[name] = file
        self._validate()

    def _data_files(self) -> list[Path]:
        """The safetensors files to read; sets self._listed (stored name -> file per the HF index, or None)."""
        path = self.path
        self._listed: dict[str, Path] | None = None
        index_path = path / HF_INDEX_FILE
        if self.layout == "hf" and index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("'weight_map' must map tensor names to file names")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc!s})") from None
            self._index_path = index_path
            self._listed = {name: path / file for name, file in weight_map.items()}
            files = sorted(set(self._listed.values()))
            for file in files:
                if not file.is_file():
                    users = sorted(n for n, f in self._listed.items() if f == file)
                    raise CheckpointError(
                        f"{index_path}: references missing file '{file.name}' (holding {len(users)} tensors, "
                        f"e.g. '{users[0]}')"
                    )
            return files
        if self.layout == "hf" and (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE]
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        return files

    def _where_expected(self, stored: str) -> str:
        if self._listed is not None:
            if stored in self._listed:
                return f"expected in {self._listed[stored].name}"
            return f"not listed in {HF_INDEX_FILE}"
        names = [f.name for f in self._headers]
        return f"expected in {names[0]}" if len(names) == 1 else f"expected in one of: {', '.join(names)}"

    def _validate(self) -> None:
        self._specs = expected_tensors(self.config)
        stored_specs, self._where = _stored_specs(self.config, self.layout, self._file_of)
        canonical_of: dict[str, list[str]] = collections.defaultdict(list)
        for name, loc in self._where.items():
            canonical_of[loc.name].append(name)
        problems: list[str] = []
        for stored, spec in stored_specs.items():
            label = f"'{stored}'"
            if self.layout == "original":
                label += f" (canonical {', '.join(repr(c) for c in canonical_of[stored])})"
            file = self._file_of.get(stored)
            if file is None:
                problems.append(f"missing tensor {label} ({self._where_expected(stored)})")
                continue
            entry = self._headers[file][stored]
            if entry.shape != spec.shape:
                problems.append(
                    f"tensor {label} in {file} has shape {list(entry.shape)}, expected {list(spec.shape)}"
                )
            if _ST_DTYPES.get(entry.dtype) not in spec.dtypes:
                allowed = "/".join(_fmt_dtype(d) for d in spec.dtypes)
                problems.append(f"tensor {label} in {file} has dtype {entry.dtype}, expected {allowed}")
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise CheckpointError(f"{self.path}: {problems[0]}{more}")
        self.extra_names = sorted(set(self._file_of) - set(stored_specs))
        if self.extra_names:
            shown = ", ".join(self.extra_names[:5]) + (", ..." if len(self.extra_names) > 5 else "")
            log.warning("%s: ignoring %d unknown tensor(s): %s", self.path, len(self.extra_names), shown)
        floats = sum(loc.mxfp4 == "blocks" for loc in self._where.values())
        if floats:
            log.info("%s: %d expert weight tensor(s) stored as floats; quantizing them to MXFP4 as they load",
                     self.path, floats)

    # ------------------------------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        """Canonical names of the model's tensors, in checkpoint order."""
        return list(self._specs)

    def _locate(self, name: str) -> tuple[_Stored, Path]:
        if self._closed:
            raise CheckpointError(f"{self.path}: reader is closed")
        loc = self._where.get(name)
        if loc is None and name in self._file_of:  # a stored name (original layout, or an extra tensor)
            loc = _Stored(name)
        if loc is None:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'")
        return loc, self._file_of[loc.name]

    def shape(self, name: str) -> tuple[int, ...]:
        loc, file = self._locate(name)
        if loc.mxfp4 is not None:
            return self._specs[name].shape
        shape = self._headers[file][loc.name].shape
        return (loc.rows[1] - loc.rows[0], *shape[1:]) if loc.rows else shape

    def dtype(self, name: str) -> torch.dtype:
        loc, file = self._locate(name)
        if loc.mxfp4 is not None:
            return torch.uint8
        return _ST_DTYPES[self._headers[file][loc.name].dtype]

    # ------------------------------------------------------------------------------------------ reading
    def read(self, name: str, index: tuple[slice, ...] | None = None, *, copy: bool = True,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name` (canonical, or a stored name), or only `index` of it, in its stored dtype.

        With `out`, the values land in that tensor (converted to its dtype) and it is returned; a row range of the
        stored dtype is read from disk straight into it.

        `index` is a tuple of slices applied to the leading dimensions (the rest are taken whole); only those bytes are
        read from disk (the files are memory-mapped). safetensors hands back tensors that view the file mapping
        itself, so an in-place change would show up in every later read of the same bytes; by default the result is
        therefore copied into memory of its own. `copy=False` skips that copy for callers that only read the result
        or convert it right away (`.to(device)`, `.float()`).
        """
        loc, file = self._locate(name)
        shape = self.shape(name)
        if index is None:
            index = ()
        elif isinstance(index, slice):
            index = (index,)
        if not isinstance(index, tuple) or not all(isinstance(s, slice) for s in index):
            raise TypeError(f"index must be a tuple of slices, got {index!r}")
        if len(index) > len(shape):
            raise IndexError(f"index {index!r} has more dimensions than tensor '{name}' {list(shape)}")
        bounds = [s.indices(dim) for s, dim in zip(index, shape, strict=False)]
        if any(step <= 0 for _, _, step in bounds):
            raise ValueError(f"index {index!r}: only positive slice steps are supported")
        full = [slice(start, max(start, stop), step) for start, stop, step in bounds]
        if loc.mxfp4 is not None:
            return self._read_mxfp4(file, loc, full, out)
        if loc.rows is not None:  # a row range of a fused tensor
            r0 = loc.rows[0]
            first = full[0] if full else slice(0, shape[0], 1)
            full = [slice(first.start + r0, first.stop + r0, first.step), *full[1:]]
        while len(full) > 1 and full[-1] == slice(0, shape[len(full) - 1], 1):
            full.pop()  # a trailing whole dimension is no slicing at all
        if all(s.step == 1 for s in full[:1]) and len(full) <= 1:
            return self._pread_rows(file, loc.name, full[0] if full else None, out)
        try:
            tensor = self._handles[file].get_slice(loc.name)[tuple(full)]
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read tensor '{loc.name}' ({exc})") from None
        tensor = tensor.clone(memory_format=torch.contiguous_format) if copy else tensor
        if out is not None:
            return out.copy_(tensor)
        return tensor

    def _pread_rows(self, file: Path, stored: str, rows: slice | None, out: torch.Tensor | None) -> torch.Tensor:
        """Rows [start, stop) of a stored tensor are one contiguous byte range: read it with pread, straight into
        `out` when it fits. Unlike the safetensors memory map, this leaves no file pages resident in the process,
        so loading a model costs its size in memory and no more."""
        entry = self._headers[file][stored]
        dtype = _ST_DTYPES[entry.dtype]
        start, stop = (rows.start, rows.stop) if rows is not None else (0, entry.shape[0] if entry.shape else 1)
        row_bytes = math.prod(entry.shape[1:]) * dtype.itemsize
        shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
        direct = (out is not None and out.dtype == dtype and tuple(out.shape) == shape and out.is_contiguous()
                  and out.device.type == "cpu")
        target = out if direct else torch.empty(shape, dtype=dtype)
        view = memoryview(target.view(-1).view(torch.uint8).numpy()) if target.numel() else memoryview(b"")
        offset = self._data_start[file] + entry.begin + start * row_bytes
        done = 0
        while done < len(view):
            got = os.preadv(self._fds[file], [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{file}: truncated while reading tensor '{stored}'")
            done += got
        if out is not None and not direct:
            return out.copy_(target)
        return target

    def _read_mxfp4(self, file: Path, loc: _Stored, index: list[slice], out: torch.Tensor | None) -> torch.Tensor:
        """`index` of the MXFP4 blocks or scales of float experts: the indexed experts are quantized, one at a time."""
        experts = (range(index[0].start, index[0].stop, index[0].step) if index
                   else range(self._headers[file][loc.name].shape[0]))
        spare, self._mxfp4_spare = self._mxfp4_spare, None
        if spare is not None and spare[0] == (loc.name, experts, loc.mxfp4):
            tensor = spare[1]
        else:
            blocks, scales = self._quantize_experts(file, loc.name, experts)
            tensor, other = (blocks, scales) if loc.mxfp4 == "blocks" else (scales, blocks)
            self._mxfp4_spare = ((loc.name, experts, "scales" if loc.mxfp4 == "blocks" else "blocks"), other)
        tensor = tensor[(slice(None), *index[1:])]
        return out.copy_(tensor) if out is not None else tensor.contiguous()

    def _quantize_experts(self, file: Path, stored: str, experts: range) -> tuple[torch.Tensor, torch.Tensor]:
        """MXFP4 (blocks, scales) of the float experts `experts` of `stored` ([E, K, rows] -> rows of K values)."""
        _, k, rows = self._headers[file][stored].shape
        blocks = torch.empty(len(experts), rows, k // BLOCK, BYTES_PER_BLOCK, dtype=torch.uint8)
        scales = torch.empty(len(experts), rows, k // BLOCK, dtype=torch.uint8)
        for i, expert in enumerate(experts):
            weight = self._pread_rows(file, stored, slice(expert, expert + 1), None)[0].t().float()
            blocks[i], scales[i] = quantize_mxfp4(weight)
            if not self._warned_rounding and not torch.equal(dequantize_mxfp4(blocks[i], scales[i]), weight):
                # A fine-tune's float weights: serving them as MXFP4 (what the expert kernels run) rounds them.
                log.warning("%s: expert weights '%s' are not MXFP4 values; rounded to MXFP4 on load "
                            "(further tensors may be rounded too)", self.path, stored)
                self._warned_rounding = True
        return blocks, scales

    def slice_nbytes(self, name: str, index: tuple[slice, ...] | None = None) -> int:
        shape = list(self.shape(name))
        for d, s in enumerate(index or ()):
            shape[d] = len(range(*s.indices(shape[d])))
        return math.prod(shape) * self.dtype(name).itemsize

    def iter_tensors(
        self,
        names: Iterable[str] | None = None,
        *,
        index: Mapping[str, tuple[slice, ...] | None] | Callable[[str], tuple[slice, ...] | None] | None = None,
        desc: str = "loading",
        progress: bool = True,
        copy: bool = True,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for each name (default: all), read with `index` (a mapping or a function of the name),
        under a bytes progress bar (shown only on a TTY for large loads; GPTOSS_NO_PROGRESS=1 hides it)."""
        names = list(self.names() if names is None else names)
        pick = index if callable(index) else (lambda n: (index or {}).get(n))
        slices = {n: pick(n) for n in names}
        total = sum(self.slice_nbytes(n, slices[n]) for n in names)
        with progress_bar(total, desc, progress) as bar:
            for name in names:
                tensor = self.read(name, slices[name], copy=copy)
                bar.update(tensor.numel() * tensor.element_size())
                yield name, tensor

    # ------------------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self._closed = True
        self._mxfp4_spare = None
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            with contextlib.suppress(Exception):
                handle.__exit__(None, None, None)
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, layout={self.layout!r}, files={len(self._headers)})"


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open and validate a checkpoint directory (Hugging Face or original OpenAI layout)."""
    return CheckpointReader(path)


# =================================================================================================== synthetic weights
# Values are generated in chunks of whole rows of the last dimension (the tensor seen as [rows, last dim]), each
# chunk from its own generator seeded by (seed, name, chunk index). Chunks stay small (4 MiB of float32) so that every
# temporary is reused by the allocator instead of being mapped and zero-filled afresh (that cost more than the maths).
CHUNK_VALUES = 1 << 20
_EXPERT_FLOAT = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj))(_blocks|_scales)?")


def _seed_for(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"gptoss-synthetic-v1|{seed}|{name}|{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _float_spec(config: ModelConfig, name: str) -> tuple[tuple[int, ...], float, float]:
    """(shape, mean, std) of the float values behind a canonical tensor (or an expert float weight name)."""
    h, i = config.hidden_size, config.intermediate_size
    match = _EXPERT_FLOAT.fullmatch(name)
    if match:
        if match.group(2) == "gate_up_proj":
            return (config.num_experts, 2 * i, h), 0.0, h**-0.5
        return (config.num_experts, h, i), 0.0, i**-0.5
    spec = expected_tensors(config).get(name)
    if spec is None:
        raise KeyError(f"no synthetic tensor named '{name}'")
    if name.endswith("norm.weight"):
        mean, std = 1.0, 0.1
    elif name == "model.embed_tokens.weight":
        mean, std = 0.0, 1.0
    elif name == "lm_head.weight":
        mean, std = 0.0, 2.0 * h**-0.5
    elif name.endswith("self_attn.sinks"):
        mean, std = 0.0, 1.0
    elif name.endswith("o_proj.weight"):
        mean, std = 0.0, config.q_size**-0.5
    elif name.endswith("_proj.weight") or name.endswith("router.weight"):  # q/k/v, router
        mean, std = 0.0, h**-0.5
    elif name.endswith("router.bias"):
        mean, std = 0.0, 0.1
    elif name.endswith("bias"):  # attention and expert biases
        mean, std = 0.0, 0.05
    else:  # pragma: no cover - every spec is covered above
        raise KeyError(name)
    return spec.shape, mean, std


def _chunk_rows(shape: tuple[int, ...]) -> int:
    return max(1, CHUNK_VALUES // shape[-1])


def _flat_rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1])


def _chunks_for(shape: tuple[int, ...], flat: tuple[int, int]) -> range:
    """The chunks covering flat rows [f0, f1) (at least one, so that empty ranges keep their shape)."""
    per = _chunk_rows(shape)
    first = min(flat[0], max(_flat_rows(shape) - 1, 0)) // per
    return range(first, max(first + 1, (flat[1] + per - 1) // per))


def _float_chunk(name: str, shape: tuple[int, ...], mean: float, std: float, seed: int, chunk: int) -> torch.Tensor:
    """Flat rows [chunk * per, (chunk + 1) * per) of the float values behind `name`, as [rows, shape[-1]] float32."""
    per = _chunk_rows(shape)
    f0, f1 = chunk * per, min(_flat_rows(shape), (chunk + 1) * per)
    gen = torch.Generator().manual_seed(_seed_for(seed, name, chunk))
    values = torch.randn((f1 - f0, shape[-1]), generator=gen, dtype=torch.float32)
    values.mul_(std)
    if mean:
        values.add_(mean)
    return values


def _finish_chunk(values: torch.Tensor, kind: str | None) -> Any:
    """float32 chunk -> what is stored: bf16, or MXFP4 (blocks, scales) for kind 'mxfp4'."""
    if kind == "mxfp4":
        return quantize_mxfp4(values)
    return values.to(torch.bfloat16) if kind == "bf16" else values


def synthetic_tensor(
    config: ModelConfig, name: str, *, seed: int = 0, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Exactly what `write_checkpoint` stores for canonical tensor `name` (rows [r0, r1) of dim 0, default all).

    Float tensors come back bf16, MXFP4 blocks/scales uint8. The expert float weights before quantization are
    available as 'model.layers.N.mlp.experts.gate_up_proj' ([E, 2I, H]) and '...experts.down_proj' ([E, H, I]),
    float32.
    """
    match = _EXPERT_FLOAT.fullmatch(name)
    base = match.group(1) if match else name
    shape, mean, std = _float_spec(config, base)
    r0, r1 = rows if rows is not None else (0, shape[0])
    if not 0 <= r0 <= r1 <= shape[0]:
        raise IndexError(f"rows {rows} out of range for '{name}' with {shape[0]} rows")
    if len(shape) == 1:  # a vector: one flat row, sliced afterwards
        flat, cut = (0, 1), slice(r0, r1)
    else:
        inner = math.prod(shape[1:-1])
        flat, cut = (r0 * inner, r1 * inner), slice(None)
    per = _chunk_rows(shape)
    parts = []
    for chunk in _chunks_for(shape, flat):
        values = _float_chunk(base, shape, mean, std, seed, chunk)
        values = values[max(flat[0] - chunk * per, 0):max(min(flat[1] - chunk * per, values.shape[0]), 0)]
        parts.append(values)
    values = torch.cat(parts) if len(parts) > 1 else parts[0]
    if len(shape) == 1:
        values = values.reshape(-1)[cut]
    else:
        values = values.reshape(r1 - r0, *shape[1:])
    kind = "mxfp4" if match and match.group(3) else None if match else "bf16"
    result = _finish_chunk(values, kind)
    if kind == "mxfp4":
        result = result[0] if match.group(3) == "_blocks" else result[1]
    return result.contiguous()


# =================================================================================================== writer
@dataclass
class _Piece:
    """One chunk of data to write: computed in a worker thread (`task`), or taken from the scales stash."""

    task: Callable[[], Any] | None = None
    stash_key: tuple[str, int] | None = None  # scales chunk produced alongside a blocks chunk
    fallback: Callable[[], torch.Tensor] | None = None


def _pieces(config: ModelConfig, canonical: str, seed: int) -> list[_Piece]:
    """The chunks of one canonical tensor, in order."""
    match = _EXPERT_FLOAT.fullmatch(canonical)
    base = match.group(1) if match else canonical
    shape, mean, std = _float_spec(config, base)
    chunks = _chunks_for(shape, (0, _flat_rows(shape)))
    kind = "mxfp4" if match else "bf16"

    def make(c: int) -> Any:
        return _finish_chunk(_float_chunk(base, shape, mean, std, seed, c), kind)

    if not match:
        return [_Piece(task=lambda c=c: make(c)) for c in chunks]
    if match.group(3) == "_blocks":
        return [_Piece(task=lambda c=c: make(c), stash_key=(base, c)) for c in chunks]
    # scales: normally produced together with the blocks just written
    return [_Piece(stash_key=(base, c), fallback=lambda c=c: make(c)[1]) for c in chunks]


def _plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _header_bytes(specs: list[TensorSpec]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _ST_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def write_checkpoint(
    config: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    layout: str = "hf",
    seed: int = 0,
    max_shard_bytes: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a checkpoint of deterministic random weights (see `synthetic_tensor`) and return its directory.

    `max_shard_bytes` caps each safetensors file (default: one file below 2 GiB, else 4 GiB shards). The directory
    appears atomically. An existing non-empty `out_dir` is refused unless `overwrite` is set and it holds a
    config.json (a checkpoint); `workers` threads generate and quantize (default: torch's thread count).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    config_dict = config.to_hf_dict() if layout == "hf" else config.to_original_dict()
    try:
        reread = ModelConfig.from_dict(json.loads(json.dumps(config_dict)))
    except ConfigError as exc:
        raise ConfigError(f"the {layout} layout cannot express this config: {exc}") from None
    if reread != config:
        diff = [
            f.name for f in dataclasses.fields(config)
            if f.compare and getattr(reread, f.name) != getattr(config, f.name)
        ]
        raise ConfigError(f"the {layout} layout's config.json cannot express field(s): {', '.join(diff)}")
    out_dir = Path(out_dir).absolute()
    _check_destination(out_dir, overwrite)

    stored, where = _stored_specs(config, layout)
    canonical_specs = expected_tensors(config)
    total = sum(s.nbytes for s in stored.values())
    if max_shard_bytes is None:
        max_shard_bytes = total if total < SINGLE_FILE_LIMIT else DEFAULT_SHARD_BYTES
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards = _plan_shards([(n, s.nbytes) for n, s in stored.items()], max_shard_bytes)
    if len(shards) == 1:
        file_names = [SINGLE_FILE]
    else:  # the numbering of the published gpt-oss checkpoints: model-00000-of-00002 ... model-00002-of-00002
        file_names = [f"model-{k:05d}-of-{len(shards) - 1:05d}.safetensors" for k in range(len(shards))]
    headers = [_header_bytes([stored[n] for n in shard]) for shard in shards]
    file_bytes = sum(len(h) for h in headers) + total
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir.parent).free
    if free < file_bytes + (1 << 20):
        raise OSError(f"not enough disk space under {out_dir.parent}: need {file_bytes} bytes, {free} free")

    # Stored tensor -> the canonical tensors (pieces) it concatenates, in order.
    parts: dict[str, list[str]] = collections.defaultdict(list)
    for name in canonical_specs:
        parts[where[name].name].append(name)

    def items() -> Iterator[tuple[int, _Piece]]:
        for k, shard in enumerate(shards):
            for stored_name in shard:
                for canonical in parts[stored_name]:
                    for piece in _pieces(config, canonical, seed):
                        yield k, piece

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is an ordinary directory
        n_workers = workers or max(1, torch.get_num_threads())
        with progress_bar(file_bytes, f"writing {out_dir.name}", progress) as bar, \
                concurrent.futures.ThreadPoolExecutor(max_workers=n_workers) as pool:
            _stream(items(), tmp, file_names, headers, pool, 2 * n_workers + 2, bar)
        if layout == "hf" and len(shards) > 1:
            weight_map = {n: file_names[k] for k, shard in enumerate(shards) for n in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_text(tmp / HF_INDEX_FILE, json.dumps(index, indent=2) + "\n")
        _write_text(tmp / CONFIG_FILE, json.dumps(config_dict, indent=2) + "\n")
        _fsync_dir(tmp)
        _install(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _stream(
    items: Iterator[tuple[int, _Piece]],
    tmp: Path,
    file_names: list[str],
    headers: list[bytes],
    pool: concurrent.futures.Executor,
    lookahead: int,
    bar: Any,
) -> None:
    """Compute pieces in the pool (a bounded window ahead) and append their bytes, in order, to the shard files."""
    stash: dict[tuple[str, int], torch.Tensor] = {}
    pending: collections.deque[tuple[int, _Piece, concurrent.futures.Future | None]] = collections.deque()
    current: Any = None
    current_k = -1

    def submit_next() -> bool:
        item = next(items, None)
        if item is None:
            return False
        k, piece = item
        pending.append((k, piece, pool.submit(piece.task) if piece.task is not None else None))
        return True

    try:
        while len(pending) < lookahead and submit_next():
            pass
        while pending:
            k, piece, future = pending.popleft()
            submit_next()
            if k != current_k:
                if current is not None:
                    _finish(current)
                current = open(tmp / file_names[k], "wb")
                current_k = k
                current.write(headers[k])
                bar.update(len(headers[k]))
            if future is not None:
                result = future.result()
                if isinstance(result, tuple):  # (blocks, scales): keep the scales for their own tensor
                    result, stash[piece.stash_key] = result
            else:
                result = stash.pop(piece.stash_key, None)
                if result is None:
                    result = piece.fallback()
            data = _as_bytes(result)
            current.write(data)
            bar.update(data.nbytes)
            del result, data
        if current is not None:
            _finish(current)
            current = None
    finally:
        for _, _, future in pending:
            if future is not None:
                future.cancel()
        if current is not None:
            current.close()


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:  # Linux: read without changing
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: already exists and is not empty (pass --force / overwrite=True)")
        if not (out_dir / CONFIG_FILE).is_file():
            raise FileExistsError(
                f"{out_dir}: refusing to overwrite a non-empty directory that is not a checkpoint (no {CONFIG_FILE})"
            )


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished temporary directory into place (replacing an old checkpoint when allowed)."""
    _check_destination(out_dir, overwrite)
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "ckpt")
        else:
            out_dir.rmdir()
    os.replace(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
