"""Kernel benchmarks (issue 4): the Triton MoE and paged attention against HBM bandwidth and the torch reference.

    .venv/bin/python benchmarks/kernels.py                 # on a CUDA GPU (H100 / H200): timings, markdown tables
    .venv/bin/python benchmarks/kernels.py --ptxas         # any machine: sm_90a registers / spills / shared memory
    .venv/bin/python benchmarks/kernels.py --smoke         # any machine: the whole script at tiny shapes on CPU
                                                           # through Triton's interpreter (checks it, times nothing)

MoE: one layer's `moe_experts` for gpt-oss-20b (32 experts) and -120b (128 experts) expert shapes (hidden 2880,
intermediate 2880, top-4, MXFP4 weights), bf16 activations, at 1, 8, 64 and 256 tokens. Bytes = the packed weights,
scales and biases of the experts the batch actually routes to (each read once) + activations in and out; bandwidth
= bytes / time, reported against the GPU's HBM peak and against the bandwidth of a large `zero_()` (memset)
measured in the same process. Target: decode (1-8 tokens) >= 70% of memset bandwidth.

Attention decode: `paged_attention` for a batch of sequences (64 query / 8 KV heads of dim 64, pages of 16, bf16
cache) at 1k, 8k and 32k context, full-attention layer. Bytes = the K and V the batch must read. Target >= 70% of
memset bandwidth on KV bytes, and >= 5x the torch reference.

Triton kernels are timed with triton.testing.do_bench_cudagraph (they never read device values on the host, so they
capture). The torch references synchronise with the host (`.tolist()`, `torch.unique`), so they cannot be captured:
they are timed with triton.testing.do_bench, on the same GPU in the same process.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default; set, so that 3.9 does not warn

import torch  # noqa: E402

HBM_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}  # SXM datasheet figures (H100 PCIe: 2000; pass --peak-gbps)
PRESETS = {"20b": 32, "120b": 128}


@dataclass
class Setup:
    """Where and at what size the benchmarks run: the real shapes on a GPU, or (--smoke) tiny ones on CPU through
    Triton's interpreter, float32 (its bf16 math is wrong), timed by the wall clock."""

    device: torch.device
    dtype: torch.dtype
    hidden: int  # = the expert intermediate size, as in gpt-oss
    max_experts: int  # caps PRESETS' expert counts
    heads: tuple[int, int, int]  # attention: query heads, KV heads, head dim
    time_graph: Callable[[Callable[[], object]], float]  # ms per call of a capturable function
    time_host: Callable[[Callable[[], object]], float]  # ms per call of one that syncs with the host


def _wall_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gpu_setup() -> Setup:
    import triton.testing

    return Setup(torch.device("cuda"), torch.bfloat16, 2880, 1 << 30, (64, 8, 64), triton.testing.do_bench_cudagraph,
                 triton.testing.do_bench)


def smoke_setup() -> Setup:
    os.environ["TRITON_INTERPRET"] = "1"  # read at each launch (kernels/triton/_jit.py)
    return Setup(torch.device("cpu"), torch.float32, 64, 8, (8, 2, 32), _wall_ms, _wall_ms)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ptxas", action="store_true", help="compile every kernel for sm_90a and print ptxas "
                        "registers / spills / shared memory (no GPU needed)")
    parser.add_argument("--smoke", action="store_true", help="run the whole script on CPU through Triton's "
                        "interpreter at tiny shapes (hidden 64, <= 8 experts, float32): checks it, times nothing")
    parser.add_argument("--models", default="20b,120b", help="comma-separated presets (20b, 120b)")
    parser.add_argument("--tokens", default=None, help="MoE batch sizes (default 1,8,64,256; --smoke 1,3)")
    parser.add_argument("--contexts", default=None, help="decode context lengths (default 1024,8192,32768; "
                        "--smoke 40,100)")
    parser.add_argument("--decode-batch", type=int, default=None, help="sequences per attention decode step "
                        "(default 16; --smoke 2)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="HBM peak to compare against (default: by "
                        "device name)")
    parser.add_argument("--skip-reference", action="store_true", help="time only the Triton kernels")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or ("1,3" if args.smoke else "1,8,64,256")
    args.contexts = args.contexts or ("40,100" if args.smoke else "1024,8192,32768")
    args.decode_batch = args.decode_batch or (2 if args.smoke else 16)
    for name in args.models.split(","):
        if name not in PRESETS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
    return args


# ---------------------------------------------------------------------------------------------------- ptxas
def ptxas_table() -> list[dict]:
    """Every distinct kernel build the wrappers launch for 20b and 120b (one rank), compiled for sm_90a; builds
    that differ only in the JIT's integer/alignment specialisation are merged, keeping the worst figures."""
    from gptoss_cluster.kernels.triton.compile_check import compile_launch, describe, gptoss_launches, ptxas_report

    rows: dict[str, dict] = {}
    for preset in ("20b", "120b"):
        for situations, launch in gptoss_launches(preset):
            report = ptxas_report(compile_launch(launch)).__dict__
            row = rows.setdefault(describe(launch), {"kernel": describe(launch), "models": [], "situations": [],
                                                     **{k: 0 for k in report}})
            row["models"] += [preset] if preset not in row["models"] else []
            row["situations"] += [s for s in situations.split(", ") if s not in row["situations"]]
            for key, value in report.items():
                row[key] = max(row[key], value)
    for row in rows.values():
        row["models"], row["situations"] = ", ".join(row["models"]), ", ".join(row["situations"])
    print("| kernel [block sizes; warps, stages] | model | launched for | regs | spill st/ld (B) | stack (B) | "
          "shared (B) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows.values():
        print(f"| `{r['kernel']}` | {r['models']} | {r['situations']} | {r['registers']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['shared']} |")
    return list(rows.values())


# ---------------------------------------------------------------------------------------------------- GPU
def memset_gbps(setup: Setup) -> float:
    size = 2 * 1024**3 if setup.device.type == "cuda" else 64 * 1024**2
    buf = torch.empty(size, dtype=torch.uint8, device=setup.device)
    ms = setup.time_graph(lambda: buf.zero_())
    return buf.numel() / (ms * 1e-3) / 1e9


def random_experts(num_experts: int, hidden: int, inter: int, device: torch.device, dtype: torch.dtype):
    """Random MXFP4 bytes with scales near 2^-6 (weights of a realistic magnitude), biases in `dtype`."""
    g = torch.Generator(device=device).manual_seed(0)

    def blocks(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=g)

    def scales(*shape):
        return torch.randint(118, 124, shape, dtype=torch.uint8, device=device, generator=g)

    gu = (blocks(num_experts, 2 * inter, hidden // 32, 16), scales(num_experts, 2 * inter, hidden // 32),
          torch.randn(num_experts, 2 * inter, device=device, generator=g).to(dtype))
    dn = (blocks(num_experts, hidden, inter // 32, 16), scales(num_experts, hidden, inter // 32),
          torch.randn(num_experts, hidden, device=device, generator=g).to(dtype))
    return gu, dn


def bench_moe(args, setup: Setup, peak, memset) -> list[dict]:
    from gptoss_cluster.kernels import reference
    from gptoss_cluster.kernels import triton as tk

    hidden = inter = setup.hidden
    device, dtype = setup.device, setup.dtype
    rows = []
    for preset in args.models.split(","):
        num_experts = min(PRESETS[preset], setup.max_experts)
        gu, dn = random_experts(num_experts, hidden, inter, device, dtype)
        per_expert = sum(t[0].numel() * t.element_size() for t in (*gu, *dn))
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, hidden, device=device).to(dtype)
            logits = torch.randn(tokens, num_experts, device=device)
            weights, ids = tk.route(logits.to(dtype), 4)
            used = int(torch.unique(ids).numel())
            nbytes = used * per_expert + 2 * x.numel() * x.element_size()

            run = functools.partial(tk.moe_experts, x, weights, ids, *gu, *dn, 7.0, 1.702)
            ref = functools.partial(reference.moe_experts, x, weights, ids, *gu, *dn, 7.0, 1.702)
            ms = setup.time_graph(run)
            row = {"bench": "moe", "model": preset, "tokens": tokens, "experts_used": used, "MB": nbytes / 1e6,
                   "triton_us": ms * 1e3, "GBps": nbytes / (ms * 1e-3) / 1e9}
            row["pct_peak"], row["pct_memset"] = 100 * row["GBps"] / peak, 100 * row["GBps"] / memset
            if not args.skip_reference:
                ref_ms = setup.time_host(ref)
                row["torch_us"], row["speedup"] = ref_ms * 1e3, ref_ms / ms
                expected = ref()
                torch.testing.assert_close(run(), expected, rtol=3e-2, atol=3e-2 * float(expected.abs().max()))
            rows.append(row)
        del gu, dn, run, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_attention(args, setup: Setup, peak, memset) -> list[dict]:
    from gptoss_cluster.kernels import paged
    from gptoss_cluster.kernels import triton as tk

    (hq, hkv, d), page, batch = setup.heads, 16, args.decode_batch
    device, dtype = setup.device, setup.dtype
    rows = []
    for context in map(int, args.contexts.split(",")):
        pages_per_seq = -(-context // page)
        num_blocks = batch * pages_per_seq
        k_cache = torch.randn(num_blocks, page, hkv, d, device=device).to(dtype)
        v_cache = torch.randn(num_blocks, page, hkv, d, device=device).to(dtype)
        tables = torch.randperm(num_blocks, device=device).int().reshape(batch, pages_per_seq)
        q = torch.randn(batch, hq, d, device=device).to(dtype)
        qsl = torch.arange(batch + 1, device=device, dtype=torch.int32)
        lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        sinks = torch.randn(hq, device=device)
        nbytes = 2 * batch * context * hkv * d * k_cache.element_size()

        args_ = (q, k_cache, v_cache, tables, qsl, lens, sinks, None, d**-0.5)
        run = functools.partial(tk.paged_attention, *args_)
        ref = functools.partial(paged.paged_attention, *args_)
        ms = setup.time_graph(run)
        row = {"bench": "decode-attention", "batch": batch, "context": context, "MB": nbytes / 1e6,
               "triton_us": ms * 1e3, "GBps": nbytes / (ms * 1e-3) / 1e9}
        row["pct_peak"], row["pct_memset"] = 100 * row["GBps"] / peak, 100 * row["GBps"] / memset
        if not args.skip_reference:
            ref_ms = setup.time_host(ref)
            row["torch_us"], row["speedup"] = ref_ms * 1e3, ref_ms / ms
            torch.testing.assert_close(run(), ref(), rtol=2e-2, atol=2e-2)
        rows.append(row)
        del k_cache, v_cache, args_, run, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_rows(title: str, rows: list[dict], keys: list[str]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---:|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.1f}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in keys)
              + " |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ptxas:
        rows = ptxas_table()
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return 0
    if args.smoke:
        setup, name = smoke_setup(), "CPU (Triton interpreter, smoke run: the figures mean nothing)"
        memset = memset_gbps(setup)
        peak = args.peak_gbps or memset
    else:
        if not torch.cuda.is_available():
            print("benchmarks/kernels.py: no CUDA GPU here, and the kernel timings need one (an H100 or H200). "
                  "Run it on a GPU node; `--ptxas` prints the compile-only register/spill table and `--smoke` runs "
                  "the script at tiny shapes on any machine.", file=sys.stderr)
            return 1
        setup = gpu_setup()
        name = torch.cuda.get_device_name(setup.device)
        peak = args.peak_gbps or next((v for k, v in HBM_PEAK_GBPS.items() if k in name), None)
        if peak is None:
            print(f"unknown HBM peak for {name!r}; pass --peak-gbps", file=sys.stderr)
            return 2
        memset = memset_gbps(setup)
    print(f"device: {name}; HBM peak {peak:.0f} GB/s; memset {memset:.0f} GB/s ({100 * memset / peak:.0f}% of peak)")
    moe_rows = bench_moe(args, setup, peak, memset)
    print_rows("MoE (one layer)", moe_rows, ["model", "tokens", "experts_used", "MB", "triton_us", "GBps",
                                             "pct_peak", "pct_memset", "torch_us", "speedup"])
    attn_rows = bench_attention(args, setup, peak, memset)
    print_rows(f"Decode attention (batch {args.decode_batch}, full-attention layer)", attn_rows,
               ["context", "MB", "triton_us", "GBps", "pct_peak", "pct_memset", "torch_us", "speedup"])
    if args.json:
        args.json.write_text(json.dumps({"device": name, "peak_gbps": peak, "memset_gbps": memset,
                                         "moe": moe_rows, "attention": attn_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
