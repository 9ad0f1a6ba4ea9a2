"""Compile every kernel for Hopper (sm_90a) on any machine, no GPU needed, and read ptxas's resource report.

`gptoss_launches(preset)` runs the host wrappers on meta tensors of gpt-oss shapes (20b / 120b: hidden 2880,
intermediate 2880, 64 query / 8 KV heads of dim 64, 32 or 128 experts, top-4, KV pages of 16) across decode and
prefill batch sizes, recording the launches they would make: the exact kernels, argument types and block sizes the
dispatcher picks. `compile_launch` builds one through `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))` with the same integer/pointer specialisation the JIT applies at launch, and `ptxas_report` runs the bundled
ptxas -v on the PTX for registers, spills and stack. The kernel tests fail on spills; benchmarks/kernels.py --ptxas
prints the table kept in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import triton
from gptoss_cluster.kernels.triton._jit import Launch, record_launches
from triton.backends.compiler import GPUTarget

HOPPER = GPUTarget("cuda", 90, 32)
_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
         torch.int32: "i32", torch.int64: "i64"}


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 2880
    intermediate: int = 2880
    num_experts: int = 32
    top_k: int = 4
    num_q_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 64
    page: int = 16


SHAPES = {"20b": ModelShape(num_experts=32), "120b": ModelShape(num_experts=128)}
MOE_TOKENS = (1, 8, 64, 256, 4096)
DECODE_BATCHES = (1, 8, 64, 256)


def gptoss_launches(preset: str, world_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, Launch]]:
    """(situations, launch) for everything one rank of `preset` runs per layer, decode and prefill: one entry per
    distinct compiled kernel, with the situations (kernel wrapper and batch size) that launch it."""
    from gptoss_cluster.kernels import triton as tk

    shape = SHAPES[preset]
    meta = torch.device("meta")
    h, inter, e_local = shape.hidden, shape.intermediate, shape.num_experts // world_size
    hq, hkv, d = shape.num_q_heads // world_size, shape.num_kv_heads // world_size, shape.head_dim
    found: dict[tuple, tuple[list[str], Launch]] = {}

    def run(situation: str, fn, *args, **kwargs) -> None:
        with record_launches() as launches:
            fn(*args, **kwargs)
        for item in launches:
            where, _ = found.setdefault(signature_key(item), ([], item))
            if situation not in where:
                where.append(situation)

    def t(*size, dt=dtype):
        return torch.empty(size, dtype=dt, device=meta)

    gate_up = (t(e_local, 2 * inter, h // 32, 16, dt=torch.uint8), t(e_local, 2 * inter, h // 32, dt=torch.uint8),
               t(e_local, 2 * inter))
    down = (t(e_local, h, inter // 32, 16, dt=torch.uint8), t(e_local, h, inter // 32, dt=torch.uint8), t(e_local, h))
    for n in MOE_TOKENS:
        run(f"T={n}", tk.moe_experts, t(n, h), t(n, shape.top_k), t(n, shape.top_k, dt=torch.int64), *gate_up,
            *down, 7.0, 1.702, 0)
        run(f"T={n}", tk.route, t(n, shape.num_experts), shape.top_k)
        run(f"T={n}", tk.rms_norm, t(n, h), t(h, dt=torch.float32), 1e-5)
        qkv = t(n, (hq + 2 * hkv) * d)
        run(f"T={n}", tk.apply_rope, qkv[:, :hq * d].view(n, hq, d), t(n, d // 2), t(n, d // 2))
    run("T=256", tk.expert_histogram, t(256, shape.top_k, dt=torch.int64), shape.num_experts)

    num_blocks = 4096
    cache = (t(num_blocks, shape.page, hkv, d), t(num_blocks, shape.page, hkv, d))
    sinks = t(hq, dt=torch.float32)
    for window in (None, 128):
        for b in DECODE_BATCHES:
            run(f"decode B={b}", tk.paged_attention, t(b, hq, d), *cache, t(b, 2048, dt=torch.int32),
                t(b + 1, dt=torch.int32), t(b, dt=torch.int32), sinks, window, d**-0.5)
        run("prefill T=2048", tk.paged_attention, t(2048, hq, d), *cache, t(4, 2048, dt=torch.int32),
            t(5, dt=torch.int32), t(4, dt=torch.int32), sinks, window, d**-0.5)
        run("dense T=256", tk.attention_with_sinks, t(256, hq, d), t(512, hkv, d), t(512, hkv, d), sinks,
            t(256, dt=torch.int64), t(512, dt=torch.int64), window, d**-0.5)
    return [(", ".join(where), item) for where, item in found.values()]


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _specialise(launch: Launch):
    """signature, constexprs and attrs as the JIT derives them at launch (ints equal to 1 become constants;
    pointers and multiples of 16 carry divisibility 16)."""
    names = launch.kernel.arg_names
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, (name, value) in enumerate(zip(names, launch.args, strict=False)):
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
            continue
        signature[name] = _arg_type(value)
        if isinstance(value, torch.Tensor) or (isinstance(value, int) and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in launch.constexprs:
        signature[name] = "constexpr"
    return signature, constexprs, attrs


def signature_key(launch: Launch) -> tuple:
    signature, constexprs, attrs = _specialise(launch)
    return (launch.kernel.fn.__name__, tuple(sorted(signature.items())),
            tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(sorted(attrs)),
            launch.num_warps, launch.num_stages)


def compile_launch(launch: Launch, target: GPUTarget = HOPPER):
    signature, constexprs, attrs = _specialise(launch)
    source = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target,
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


@dataclass(frozen=True)
class PtxasReport:
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int  # bytes of shared memory the kernel asks for (Triton's dynamic allocation)


def ptxas_path(arch: int = 90) -> str:
    """The ptxas Triton itself assembles with for `arch` (for sm_90 that is the bundled CUDA 13 `ptxas-blackwell`:
    the legacy `bin/ptxas` (CUDA 12.9) rejects the PTX 9.x that Triton 3.9 emits)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _report_cache() -> Path:
    from triton import knobs

    return Path(knobs.cache.dir) / "gptoss-ptxas-reports.json"


def ptxas_report(compiled, arch: str = "sm_90a") -> PtxasReport:
    """ptxas -v on the kernel's PTX with the flags Triton's own cubin step uses (cached by PTX hash next to
    Triton's own kernel cache, like the compiled kernels themselves)."""
    ptx_text = compiled.asm["ptx"]
    key = hashlib.sha256(f"{arch}|{ptxas_path(int(arch[3:5]))}|{ptx_text}".encode()).hexdigest()
    cache_file = _report_cache()
    try:
        cached = json.loads(cache_file.read_text()).get(key)
    except (OSError, ValueError):
        cached = None
    if cached is not None:
        return PtxasReport(**cached)
    report = _run_ptxas(compiled, arch)
    try:  # best effort, atomic replace: concurrent writers lose entries, never corrupt the file
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            entries = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            entries = {}
        entries[key] = report.__dict__
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        tmp.replace(cache_file)
    except OSError:
        pass
    return report


def _run_ptxas(compiled, arch: str) -> PtxasReport:
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        command = [ptxas_path(int(arch[3:5])), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                   str(ptx), "-o", os.devnull]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"ptxas failed ({' '.join(command)}):\n{result.stderr}")
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output:\n{text}")
    return PtxasReport(int(registers.group(1)), int(spills.group(2)), int(spills.group(3)), int(spills.group(1)),
                       int(getattr(compiled.metadata, "shared", 0)))


def describe(launch: Launch) -> str:
    consts = ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in launch.constexprs.items()
                       if not k.startswith("DOT_"))
    return f"{launch.kernel.fn.__name__}[{consts}; warps={launch.num_warps}, stages={launch.num_stages}]"
