"""Offline throughput: our engine against transformers' `generate` (static batches) and transformers' continuous
batching, same checkpoint, same workload, interleaved runs, each run in its own process (for its peak RSS).

Workload: N requests (default 64) of random prompt ids, prompt and output lengths drawn uniformly from 16..256
(fixed seed), exact output lengths (EOS ignored), greedy (or `--sampling top-p`: temperature 1, top_p 0.9, request i
seeded with i), float32, all submitted at once.

    .venv/bin/python benchmarks/offline_throughput.py                      # writes the tiny checkpoint if missing
    .venv/bin/python benchmarks/offline_throughput.py --reps 3 --modes engine,hf-cb --profile
    .venv/bin/python benchmarks/offline_throughput.py --modes engine --num-blocks 0   # the engine's own KV sizing
    .venv/bin/python benchmarks/offline_throughput.py --modes engine,engine-ray1,engine-ray2 \
        --trees before=/tmp/before,after=.                                 # the engine behind Ray, two checkouts

Mode `engine-serial` is the engine with `EngineConfig(async_scheduling=False)` (the serial step loop): against
`engine` it measures async scheduling, and the two runs' token digests show whether their outputs are identical.
Mode `engine-lora4` is the engine with the requests spread round-robin over 4 LoRA adapters of rank 16 (PEFT
adapters on q/k/v/o and both expert parameters of every layer, written once next to the checkpoint with peft, a test
extra): against `engine` (every request on the base) it measures the cost of serving adapters, and prints each resident
adapter's bytes.
Modes `engine-ray1` / `engine-ray2` run the same engine with its model split over 1 or 2 ShardWorker actors
(RayExecutor, gloo, a local Ray started by the run). `--trees NAME=PATH,...` runs every mode from each checkout in
turn (interleaved: each repeat runs every tree and mode once), so a change is measured against the code before it
in one run.

Prints one line per run (throughput, peak RSS, the engine's KV blocks), then medians, ratios, the engine's step-time
breakdown (scheduling + batch layout, model forward, sampling, output processing) and the fraction of the unembedding
ceiling reached (fp32 unembedding of every output token at the matmul rate measured on this machine in the same
process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("GPTOSS_TREE") or Path(__file__).resolve().parents[1])  # the checkout under test
# benchmarks/kernels.py would shadow the `kernels` package transformers imports: this folder leaves sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

DEFAULT_CHECKPOINT = Path(os.environ.get("TMPDIR", "/tmp")) / "gptoss-bench" / "tiny-hf"
MODES = ("engine", "hf-static", "hf-cb", "engine-ray1", "engine-ray2", "engine-serial", "engine-lora4")
RAY_SHARDS = {"engine-ray1": 1, "engine-ray2": 2}
DEFAULT_BLOCKS = 4096


def workload(num_requests: int, lo: int, hi: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        prompt_len, output_len = rng.randint(lo, hi), rng.randint(lo, hi)
        out.append(([rng.randrange(vocab) for _ in range(prompt_len)], output_len))
    return out


LORA_ADAPTERS, LORA_RANK = 4, 16


def lora_adapter_paths(checkpoint: str) -> list[str]:
    return [str(Path(checkpoint).with_name(Path(checkpoint).name + f"-lora-r{LORA_RANK}") / f"adapter{i}")
            for i in range(LORA_ADAPTERS)]


def write_lora_adapters(checkpoint: str) -> None:
    """PEFT's own adapters (rank 16 on q/k/v/o and both expert parameters, every layer, seeded random A and B) for
    mode engine-lora4, written once."""
    paths = lora_adapter_paths(checkpoint)
    if all((Path(p) / "adapter_model.safetensors").exists() for p in paths):
        return
    import peft
    import torch

    for i, path in enumerate(paths):
        model = peft.get_peft_model(load_hf(checkpoint), peft.LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.02)
        model.save_pretrained(path)
        print(f"wrote LoRA adapter {path}", flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> float:
    """CPU time of this process, every thread (user + system): the work done, whatever else shares the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def unembed_rate(hidden: int, vocab: int, rows: int) -> float:
    """GFLOP/s of a [rows, hidden] x [hidden, vocab] fp32 matmul (the unembedding of one decode step)."""
    import torch

    w = torch.randn(vocab, hidden)
    h = torch.randn(rows, hidden)
    torch.nn.functional.linear(h, w)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.nn.functional.linear(h, w)
        best = min(best, time.perf_counter() - t)
    return 2 * rows * hidden * vocab / best / 1e9


# ---------------------------------------------------------------------------------------------------- workers
def run_engine(args, requests) -> dict:
    import torch

    from gptoss_cluster.workers.engine import Engine, EngineConfig
    from gptoss_cluster.workers.sampling import SamplingParams

    config = EngineConfig(block_size=16, num_blocks=args.num_blocks or None, max_num_seqs=args.num_requests,
                          max_num_batched_tokens=args.max_batched_tokens, enable_prefix_caching=True,
                          async_scheduling=args.worker != "engine-serial",
                          # (only when asked: a --trees checkout from before LoRA has no such fields)
                          **(dict(max_loras=LORA_ADAPTERS, max_lora_rank=LORA_RANK)
                             if args.worker == "engine-lora4" else {}))
    if args.worker in RAY_SHARDS:
        from gptoss_cluster.workers.engine.ray_executor import RayExecutor

        executor = RayExecutor(args.checkpoint, RAY_SHARDS[args.worker], torch.float32, "cpu",
                               torch_threads=args.threads or None)
        engine = Engine(executor, executor.model_config, config)
    else:
        engine = Engine.from_checkpoint(args.checkpoint, dtype=torch.float32, config=config, progress=False)
    # warm-up: one short request (first-call allocations, thread pools)
    engine.generate([([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))])
    loras = None
    if args.worker == "engine-lora4":
        for i, path in enumerate(lora_adapter_paths(args.checkpoint)):
            engine.add_lora(f"adapter{i}", path)
        loras = [f"adapter{i % LORA_ADAPTERS}" for i in range(len(requests))]
    engine.kv.reset_prefix_cache()
    before = engine.stats()
    if args.sampling == "top-p":
        batch = [(ids, SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=n, ignore_eos=True))
                 for i, (ids, n) in enumerate(requests)]
    else:
        batch = [(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)) for ids, n in requests]
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t, cpu = time.perf_counter(), cpu_seconds()
    results = engine.generate(batch, lora=loras) if loras else engine.generate(batch)
    elapsed, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    if profiler is not None:
        profiler.disable()
    stats = engine.stats()
    if args.worker in RAY_SHARDS:
        engine.executor.shutdown()
    assert [len(r.token_ids) for r in results] == [n for _, n in requests], "output lengths differ"
    out = {
        "output_tokens": sum(n for _, n in requests),
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "steps": stats.num_steps - before.num_steps,
        "kv_blocks": stats.kv_blocks_total,
        "time_schedule_s": stats.time_schedule_s - before.time_schedule_s,
        "time_execute_s": stats.time_execute_s - before.time_execute_s,
        "time_sample_s": stats.time_sample_s - before.time_sample_s,
        "time_output_s": stats.time_output_s - before.time_output_s,
        "preemptions": stats.num_preemptions,
        "lora_resident": getattr(stats, "lora_resident", 0),
        "lora_bytes_per_adapter": (engine.executor.lora_bytes() / stats.lora_resident
                                   if getattr(stats, "lora_resident", 0) else 0),
        # the same digest in two modes: the same tokens (async against serial scheduling, say)
        "tokens_digest": hashlib.sha256(json.dumps([r.token_ids for r in results]).encode()).hexdigest()[:16],
    }
    if profiler is not None:
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(args.profile_lines)
        out["profile"] = buf.getvalue()
    model_config = engine.model_config
    out["unembed_gflops"] = unembed_rate(model_config.hidden_size, model_config.vocab_size, 64)
    return out


def load_hf(path: str):
    import torch
    import transformers

    model = transformers.GptOssForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager")
    return model.eval()


def run_hf_static(args, requests) -> dict:
    import torch

    model = load_hf(args.checkpoint)
    pad = model.config.pad_token_id
    with torch.inference_mode():  # warm-up
        model.generate(torch.tensor([[1, 2, 3, 4]]), do_sample=False, max_new_tokens=2, min_new_tokens=2)
    t, cpu = time.perf_counter(), cpu_seconds()
    useful = wasted = 0
    with torch.inference_mode():
        for start in range(0, len(requests), args.hf_batch):
            chunk = requests[start:start + args.hf_batch]
            width = max(len(ids) for ids, _ in chunk)
            # left padding; every row runs to the batch's longest output, each request keeps its own length
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (ids, _) in enumerate(chunk):
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                mask[i, width - len(ids):] = 1
            longest = max(n for _, n in chunk)
            out = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=longest,
                                 min_new_tokens=longest, pad_token_id=pad)
            assert out.shape[1] - width == longest
            useful += sum(n for _, n in chunk)
            wasted += sum(longest - n for _, n in chunk)
    elapsed, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    return {"output_tokens": useful, "seconds": elapsed, "cpu_seconds": cpu, "padded_tokens_discarded": wasted}


def run_hf_cb(args, requests) -> dict:
    import torch
    import transformers
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = transformers.GptOssForCausalLM.from_pretrained(
        args.checkpoint, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="paged|eager").eval()
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in requests), eos_token_id=-1,
                                  pad_token_id=model.config.pad_token_id)
    # The same KV capacity as the engine's pool (its pages hold 256 tokens; left alone it takes 90 % of free memory);
    # against the engine's own sizing (--num-blocks 0), the default pool of 4096 blocks.
    pages = -(-(args.num_blocks or DEFAULT_BLOCKS) * 16 // 256)
    cb_config = ContinuousBatchingConfig(max_batch_tokens=args.max_batched_tokens, num_blocks=pages,
                                         auto_switch_to_flash=False, use_cuda_graph=False, use_async_batching=False)
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    manager.start()
    try:
        # warm-up
        manager.add_request([1, 2, 3, 4], request_id="warmup", max_new_tokens=2, eos_token_id=-1)
        while True:
            result = manager.get_result(timeout=60)
            if result is not None and result.is_finished():
                break
        t, cpu = time.perf_counter(), cpu_seconds()
        for i, (ids, n) in enumerate(requests):
            manager.add_request(ids, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        lengths = {}
        while len(lengths) < len(requests):
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("transformers' continuous batching stopped answering")
            if result.is_finished():
                lengths[result.request_id] = len(result.generated_tokens)
        elapsed, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    finally:
        manager.stop(block=True, timeout=60)
    assert [lengths[f"r{i}"] for i in range(len(requests))] == [n for _, n in requests], "output lengths differ"
    return {"output_tokens": sum(lengths.values()), "seconds": elapsed, "cpu_seconds": cpu}


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from gptoss_cluster.workers.config import ModelConfig

    vocab = ModelConfig.from_json(Path(args.checkpoint) / "config.json").vocab_size
    requests = workload(args.num_requests, args.min_len, args.max_len, args.seed, min(vocab, 200000))
    run = {"hf-static": run_hf_static, "hf-cb": run_hf_cb}.get(args.worker, run_engine)
    result = run(args, requests)
    result["mode"] = args.worker
    result["tok_s"] = result["output_tokens"] / result["seconds"]
    result["tok_per_cpu_s"] = result["output_tokens"] / result["cpu_seconds"]
    result["peak_rss_mib"] = peak_rss_mib()
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=DEFAULT_BLOCKS,
                        help="KV blocks of 16 tokens (0: the engine sizes its pool itself, as LLM(...) does)")
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="cProfile the engine run(s)")
    parser.add_argument("--profile-lines", type=int, default=25)
    parser.add_argument("--json", help="also write every run's figures to this file")
    parser.add_argument("--sampling", choices=("greedy", "top-p"), default="greedy")
    parser.add_argument("--trees", default="", help="NAME=PATH,...: run every mode from each of these checkouts")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            parser.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if not (Path(args.checkpoint) / "config.json").exists():
        from gptoss_cluster.workers.checkpoint import write_checkpoint
        from gptoss_cluster.workers.config import ModelConfig

        print(f"writing the tiny checkpoint to {args.checkpoint}", flush=True)
        write_checkpoint(ModelConfig.preset("tiny"), args.checkpoint, layout="hf", seed=0, progress=False)

    if "engine-lora4" in modes:
        write_lora_adapters(args.checkpoint)

    runs: list[dict] = []
    passthrough = ["--checkpoint", args.checkpoint, "--num-requests", str(args.num_requests), "--min-len",
                   str(args.min_len), "--max-len", str(args.max_len), "--seed", str(args.seed), "--hf-batch",
                   str(args.hf_batch), "--num-blocks", str(args.num_blocks), "--max-batched-tokens",
                   str(args.max_batched_tokens), "--threads", str(args.threads),
                   "--profile-lines", str(args.profile_lines), "--sampling", args.sampling]
    # Every mode runs with the same allocator settings: glibc would otherwise mmap / munmap (and page-fault) each
    # step's ~50 MB logits tensor afresh; keeping such blocks in the heap is the usual CPU-inference tuning.
    # One arena: a thread's own arena (async scheduling runs the steps on a worker thread) is made of 64 MiB heaps, so
    # a logits tensor bigger than what is left there can be mmap-ed afresh each step whatever the threshold says.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str(1 << 31),
               MALLOC_ARENA_MAX="1")
    trees = dict(item.split("=", 1) for item in args.trees.split(",") if item) or {"": str(ROOT)}
    labels = []
    for rep in range(args.reps):
        for tree, path in trees.items():
            path = str(Path(path).resolve())
            # Ray's workers import from the working directory first: the run starts in the checkout it measures.
            tree_env = dict(env, GPTOSS_TREE=path, PYTHONPATH=path) if tree else env
            for mode in modes:  # interleaved: machine speed drifts between runs
                label = f"{mode}@{tree}" if tree else mode
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, *passthrough]
                if args.profile and mode == "engine" and rep == 0:
                    cmd.append("--profile")
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=path, env=tree_env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    print(f"[{label} run {rep}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                    continue
                result = json.loads(line[len("RESULT "):])
                result["rep"], result["mode"], result["sampling"] = rep, label, args.sampling
                runs.append(result)
                if label not in labels:
                    labels.append(label)
                blocks = f"  {result['kv_blocks']} KV blocks" if "kv_blocks" in result else ""
                print(f"[rep {rep}] {label:9s} {result['tok_s']:8.1f} output tok/s  {result['seconds']:7.1f} s  "
                      f"{result['tok_per_cpu_s']:7.1f} tok/CPU-s  peak RSS {result['peak_rss_mib']:7.0f} MiB{blocks}",
                      flush=True)
                if "profile" in result:
                    print(result.pop("profile"), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    report(runs, labels)


def report(runs: list[dict], modes: list[str]) -> None:
    def med(mode: str, key: str) -> float | None:
        values = [r[key] for r in runs if r["mode"] == mode and key in r]
        return statistics.median(values) if values else None

    print("\nmedian over runs:")
    for mode in modes:
        if med(mode, "tok_s") is not None:
            print(f"  {mode:9s} {med(mode, 'tok_s'):8.1f} output tok/s  {med(mode, 'tok_per_cpu_s'):7.1f} tok/CPU-s  "
                  f"peak RSS {med(mode, 'peak_rss_mib'):7.0f} MiB")
    for label in modes:  # the engine behind Ray against the same engine in process: same checkout, same repeat
        mode, _, tree = label.partition("@")
        base = f"engine@{tree}" if tree else "engine"
        pairs = [r["tok_s"] / b["tok_s"] for r in runs if r["mode"] == label
                 for b in runs if b["mode"] == base and b["rep"] == r["rep"]]
        if mode == "engine-serial" and pairs:  # async over serial scheduling
            pairs = [1 / p for p in pairs]
            same = {r.get("tokens_digest") for r in runs if r["mode"] in (label, base)}
            print(f"  {base} (async scheduling) / {label}: {statistics.median(pairs):.2f}x (per rep "
                  f"{', '.join(f'{p:.2f}x' for p in pairs)}); tokens {'identical' if len(same) == 1 else 'DIFFER'}")
        if mode == "engine-lora4" and pairs:
            per_adapter = med(label, "lora_bytes_per_adapter")
            print(f"  {label} / {base}: {statistics.median(pairs):.2f}x (per rep "
                  f"{', '.join(f'{p:.2f}x' for p in pairs)}); {med(label, 'lora_resident'):.0f} adapters resident, "
                  f"{per_adapter / 2**20:.2f} MiB each")
        if mode in RAY_SHARDS and pairs:
            print(f"  {label} / {base}: {statistics.median(pairs):.2f}x (per rep "
                  f"{', '.join(f'{p:.2f}x' for p in pairs)})")
    engine = med("engine", "tok_s")
    hf = [m for m in ("hf-static", "hf-cb") if med(m, "tok_s") is not None]
    if engine is not None and hf:
        for m in hf:
            print(f"  engine / {m}: {engine / med(m, 'tok_s'):.2f}x wall-clock, "
                  f"{med('engine', 'tok_per_cpu_s') / med(m, 'tok_per_cpu_s'):.2f}x per CPU-second")
        best = max(hf, key=lambda m: med(m, "tok_s"))
        print(f"  engine / best transformers mode ({best}): {engine / med(best, 'tok_s'):.2f}x")
        # paired ratios (same rep: the runs next to each other in time)
        for m in hf:
            pairs = [e["tok_s"] / h["tok_s"] for e in runs if e["mode"] == "engine"
                     for h in runs if h["mode"] == m and h["rep"] == e["rep"]]
            if pairs:
                print(f"  paired engine / {m} per rep: {', '.join(f'{p:.2f}x' for p in pairs)}")
    if engine is not None:
        parts = {k: med("engine", k) for k in ("time_schedule_s", "time_execute_s", "time_sample_s",
                                                 "time_output_s")}
        total = sum(parts.values())
        print("\nengine step time breakdown (median run):")
        for k, v in parts.items():
            print(f"  {k[5:-2]:10s} {v:7.2f} s  {100 * v / total:5.1f} %")
        print(f"  overhead outside the model forward: {100 * (1 - parts['time_execute_s'] / total):.1f} %")
        rate = med("engine", "unembed_gflops")
        from gptoss_cluster.workers.config import ModelConfig

        cfg = ModelConfig.preset("tiny")
        ceiling = rate * 1e9 / (2 * cfg.hidden_size * cfg.vocab_size)
        print(f"\nunembedding ceiling at the measured {rate:.1f} GFLOP/s (64-row fp32 matmul): {ceiling:.0f} tok/s; "
              f"engine reaches {100 * engine / ceiling:.0f} %")


if __name__ == "__main__":
    main()
