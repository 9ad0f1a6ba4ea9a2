"""Decode throughput of the served engine on one GPU, against the weight-bandwidth roofline (issue 13, point 5).

    python benchmarks/gpu_decode.py                   # a CUDA GPU: the 20b-shaped checkpoint, bf16, Triton kernels
    python benchmarks/gpu_decode.py --prepare         # only write the checkpoint (gpu_session.sh runs this early)
    python benchmarks/gpu_decode.py --smoke           # any machine: the tiny preset on CPU, float32 (checks the
                                                      # script end to end; its figures mean nothing)

The checkpoint (deterministic random weights in the HF layout, MXFP4 experts) is written once to --checkpoint (default
$TMPDIR/gptoss-bench/<preset>-hf) and reused. It is loaded the way a one-shard replica loads it (`make_executor`:
LocalExecutor, kernels from kernels/dispatch.py, i.e. Triton on CUDA unless GPTOSS_KERNELS says otherwise) under an
`Engine` with the default EngineConfig except a KV pool sized for the workload.

Workload per batch size B (default 1 and 64): B requests of random prompt ids (--prompt-len, default 128), exactly
--output-len tokens each (default 128, EOS ignored), greedy, all submitted at once, after a warm-up run of the same
shape (Triton compiles, allocator) and up to 24 output tokens.

Method: the engine is stepped by hand (`submit` + `step`) and every step is timed with the host clock (a step ends
when the sampled ids reach the host, so the GPU is idle at its end). Only *pure decode steps at full batch* count:
steps that computed no prompt token and sampled exactly B tokens. Chunked prefill, the steps where prefill and decode
mix, and the tail where early requests have finished are left out. Decode tokens/s = B x counted steps / their time.

Bytes per decode step, the fewest a step must read from device memory: every non-expert weight once (attention,
router, norms, unembedding; the embedding only for the B rows looked up), the routed experts' MXFP4 blocks and scales
(4.25 bits per parameter) and biases once per *distinct* expert a layer routes to in that step (counted from the
engine's expert counters: 4 per layer at B = 1, nearly all 32 at B = 64), and the KV cache the step attends to (full
layers the whole context, sliding layers at most the window). Roofline tok/s = B x peak bandwidth / bytes per step;
share = measured / roofline. Peak bandwidth by device name (datasheet: H100 SXM 3.35 TB/s, H200 4.8 TB/s;
--peak-gbps overrides); on CPU the share is n/a. For 20b at B = 1: ~3.7 GB, at most ~900 tok/s on an H100.

Each batch size is measured twice: as served (the engine counts routed tokens per expert in every layer, for its
statistics) and with that counting off (`model.expert_counts = None`): the difference is what the counting costs
(while it read each layer's counts back to the host, a GPU sync per layer and step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Datasheet HBM bandwidth (GB/s), matched in order against torch.cuda.get_device_name.
PEAK_GBPS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("H200", 4800.0))
# Long enough for the warm-up to reach full-batch decode steps after chunked prefill, and for integer kernel
# arguments to be seen both divisible by 16 and not (Triton compiles a variant for each): no compile in a timed step.
WARMUP_TOKENS = 24


@dataclass
class Row:
    batch: int
    tok_s: float  # decode tokens/s as served (expert counting on)
    step_ms: float  # median pure decode step
    decode_steps: int  # steps counted
    experts_per_layer: float  # distinct experts a layer reads per step (mean)
    weight_bytes_per_step: float
    kv_bytes_per_step: float
    roofline_tok_s: float | None
    roofline_share: float | None
    tok_s_uncounted: float  # the same with the engine's expert counting off


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU, float32, short prompts and outputs")
    parser.add_argument("--prepare", action="store_true", help="write the checkpoint if missing, then exit")
    parser.add_argument("--preset", default=None, help="checkpoint shape (default 20b; --smoke: tiny)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="where the checkpoint is (or is written)")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 128; --smoke 16")
    parser.add_argument("--output-len", type=int, default=None, help="default 128; --smoke 8")
    parser.add_argument("--device", default=None, help="default cuda when available (--smoke: cpu)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth to compare against "
                        "(default: by device name)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.smoke else "20b")
    args.checkpoint = args.checkpoint or Path(os.environ.get("TMPDIR", "/tmp")) / "gptoss-bench" / f"{args.preset}-hf"
    args.prompt_len = args.prompt_len or (16 if args.smoke else 128)
    args.output_len = args.output_len or (8 if args.smoke else 128)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.device is None and not (args.smoke or args.prepare or torch.cuda.is_available()):
        parser.error("no CUDA GPU here: run it on a GPU node, or --smoke (the tiny preset on CPU), or name --device")
    args.device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    if args.output_len < 2 or args.prompt_len < 1 or min(args.batches) < 1:
        parser.error("needs --output-len >= 2, --prompt-len >= 1 and batch sizes >= 1")
    return args


def ensure_checkpoint(path: Path, preset: str) -> float | None:
    """Write the checkpoint unless `path` holds one of this preset's shape; seconds spent writing (None: reused)."""
    from gptoss_cluster.workers.checkpoint import write_checkpoint
    from gptoss_cluster.workers.config import ModelConfig

    config = ModelConfig.preset(preset)
    if (path / "config.json").exists():
        if ModelConfig.from_json(path / "config.json") != config:
            raise SystemExit(f"{path} holds a checkpoint of another shape than the {preset} preset")
        return None
    print(f"writing the {preset} checkpoint to {path} (once) ...", flush=True)
    start = time.perf_counter()
    write_checkpoint(config, path, layout="hf", seed=0, progress=False)
    seconds = time.perf_counter() - start
    print(f"  written in {seconds:.0f} s", flush=True)
    return seconds


def peak_gbps(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "CPU", override
    name = torch.cuda.get_device_name(device)
    return name, override or next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def build_engine(args: argparse.Namespace):
    """A one-shard replica's engine: `make_executor` as cluster/replica.py calls it, a KV pool for the workload."""
    from gptoss_cluster.workers.engine import Engine, EngineConfig, KVCacheLayout
    from gptoss_cluster.workers.engine.ray_executor import make_executor

    executor = make_executor(str(args.checkpoint), 1, dtype=args.dtype, device=args.device.type)
    config, max_len, max_batch = executor.model_config, args.prompt_len + args.output_len, max(args.batches)
    # The pool holds every sequence of the largest batch whole (no preemption), and no more: allocating and zeroing
    # half the GPU's memory (the default on CUDA) would only cost time.
    need = KVCacheLayout.from_model_config(config, EngineConfig().block_size).blocks_needed(
        max_len, EngineConfig().max_num_batched_tokens)
    engine_config = EngineConfig(max_num_seqs=max_batch, max_model_len=max_len, num_blocks=max_batch * need + 16)
    return Engine(executor, config, engine_config)


def weight_bytes(model, batch: int, experts_per_layer: list[float]) -> float:
    """Bytes of weights one decode step of `batch` tokens reads: see the module docstring."""
    expert_parts = ("gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks", "down_scales", "down_bias")
    total = 0.0
    for name, buf in model.named_buffers():
        if name == "embedding":
            total += batch * buf[0].nbytes  # a lookup reads only the B rows
        elif name.rsplit(".", 1)[-1] not in expert_parts:
            total += buf.nbytes
    for layer, mlp in enumerate(model.mlp):
        per_expert = sum(getattr(mlp, part).nbytes for part in expert_parts) / mlp.gate_up_blocks.shape[0]
        total += experts_per_layer[layer] * per_expert
    return total


def kv_bytes(model, contexts: list[int]) -> float:
    """Bytes of K and V a decode step attends to, for sequences of these context lengths (the new token included)."""
    cfg = model.config
    attn = model.attention[0]
    per_token = 2 * attn.num_kv_heads * attn.head_dim * model.dtype.itemsize
    tokens = sum(min(c, cfg.sliding_window) if cfg.is_sliding(layer) else c
                 for layer in range(cfg.num_hidden_layers) for c in contexts)
    return float(tokens * per_token)


def decode_run(engine, batch: int, prompt_len: int, output_len: int, seed: int) -> dict:
    """Run one workload by hand-stepping the engine; the figures of its pure decode steps at full batch."""
    from gptoss_cluster.workers.sampling import SamplingParams

    model = engine.executor.model
    vocab = min(engine.model_config.vocab_size, 200_000)  # below harmony's special tokens
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)).tolist()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for ids in prompts:
        engine.submit(ids, params)
    times, distinct, kv = [], [], []
    while engine.has_unfinished_requests():
        contexts = [len(r.token_ids) for r in engine.requests.values()]  # the next token's context, itself included
        before = engine.stats()
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        after = engine.stats()
        if after.num_prefill_tokens != before.num_prefill_tokens or \
                after.num_decode_tokens - before.num_decode_tokens != batch:
            continue  # prefill, mixed or partial-batch step
        times.append(elapsed)
        kv.append(kv_bytes(model, contexts))
        if after.expert_counts is not None:
            distinct.append((after.expert_counts - before.expert_counts > 0).sum(dim=1).double())
    if not times:
        raise RuntimeError(f"batch {batch}: no pure decode step (raise --output-len)")
    return {"tok_s": batch * len(times) / sum(times), "step_ms": statistics.median(times) * 1e3,
            "steps": len(times), "kv_bytes": statistics.fmean(kv),
            "experts": torch.stack(distinct).mean(dim=0).tolist() if distinct else None}


def measure(engine, batch: int, args: argparse.Namespace, gbps: float | None) -> Row:
    model = engine.executor.model
    # Each run its own prompts, so that none starts from the prefix cache of the one before.
    decode_run(engine, batch, args.prompt_len, min(WARMUP_TOKENS, args.output_len), seed=3 * batch)
    served = decode_run(engine, batch, args.prompt_len, args.output_len, seed=3 * batch + 1)
    counts, model.expert_counts = model.expert_counts, None  # the engine's counting off ...
    try:
        uncounted = decode_run(engine, batch, args.prompt_len, args.output_len, seed=3 * batch + 2)
    finally:
        model.expert_counts = counts  # ... and back on
    experts = served["experts"]
    if experts is None:  # counting was off from the start (EngineConfig): assume uniform routing
        e, k = model.config.num_experts, model.config.experts_per_token
        experts = [e * (1 - (1 - k / e) ** batch)] * model.config.num_hidden_layers
    weights = weight_bytes(model, batch, experts)
    step_bytes = weights + served["kv_bytes"]
    roofline = batch * gbps * 1e9 / step_bytes if gbps else None
    return Row(batch=batch, tok_s=served["tok_s"], step_ms=served["step_ms"], decode_steps=served["steps"],
               experts_per_layer=statistics.fmean(experts), weight_bytes_per_step=weights,
               kv_bytes_per_step=served["kv_bytes"], roofline_tok_s=roofline,
               roofline_share=served["tok_s"] / roofline if roofline else None, tok_s_uncounted=uncounted["tok_s"])


def print_table(rows: list[Row]) -> None:
    print("| batch | decode tok/s | step ms (median) | steps timed | experts / layer | weights MB / step | "
          "KV MB / step | roofline tok/s | share of roofline | tok/s, expert counting off |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        roofline = f"{r.roofline_tok_s:.0f}" if r.roofline_tok_s else "n/a"
        share = f"{100 * r.roofline_share:.1f} %" if r.roofline_share else "n/a"
        print(f"| {r.batch} | {r.tok_s:.1f} | {r.step_ms:.2f} | {r.decode_steps} | {r.experts_per_layer:.2f} | "
              f"{r.weight_bytes_per_step / 1e6:.1f} | {r.kv_bytes_per_step / 1e6:.2f} | {roofline} | {share} | "
              f"{r.tok_s_uncounted:.1f} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    written_s = ensure_checkpoint(args.checkpoint, args.preset)
    if args.prepare:
        return 0
    device_name, gbps = peak_gbps(args.device, args.peak_gbps)
    start = time.perf_counter()
    engine = build_engine(args)
    load_s = time.perf_counter() - start
    model = engine.executor.model
    print(f"{args.preset} on {device_name} ({args.dtype}, {model.kernels.name} kernels), loaded in {load_s:.1f} s; "
          f"prompt {args.prompt_len} tokens, {args.output_len} output tokens, greedy; peak "
          f"{f'{gbps:.0f} GB/s' if gbps else 'n/a'}" + (" (smoke run: the figures mean nothing)" if args.smoke else ""),
          flush=True)
    rows = [measure(engine, batch, args, gbps) for batch in args.batches]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({
            "device": device_name, "peak_gbps": gbps, "preset": args.preset, "dtype": args.dtype,
            "kernels": model.kernels.name, "prompt_len": args.prompt_len, "output_len": args.output_len,
            "checkpoint_write_s": written_s, "load_s": load_s, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
