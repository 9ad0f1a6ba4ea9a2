"""Parallel overhead: decode step time of one replica split over G = 1, 2, 4 shards (RayExecutor + ShardWorkers,
torch.distributed), against the same model in this process, on the tiny checkpoint.

    .venv/bin/python benchmarks/parallel_overhead.py                       # CPU, gloo; writes the checkpoint if missing
    .venv/bin/python benchmarks/parallel_overhead.py --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/parallel_overhead.py --device cuda         # NCCL (needs as many GPUs as shards)

Configurations: `local` (LocalExecutor: the model in this process, no Ray), `ray G=1` (one ShardWorker: the Ray
round trip, no collectives), `ray G=2`, `ray G=4`. All stay up at once; every repeat runs each configuration in turn
(rotating the order), `--steps` decode steps each, so load on a shared machine hits them alike. A decode step is one
token for each of B sequences with `--context` tokens of KV cache (the same plan every step).

Per configuration the script also times the collectives on the shards themselves at the step's shapes: all_reduce
of the [B, hidden] activations (the model runs 2 per layer + 1 for the embedding) and the gather of the
[B, vocab/G] logits slices to rank 0, and reports the per-step collective estimate = (2L + 1) x all_reduce +
gather.

A decode step here is what the engine waits for: the executor's call, and where the executor returns logits (the
code before issue 13) the engine's greedy argmax over them on the host. Two more figures (issue 13):
- bytes returned per step across the Ray boundary: the pickled size of what rank 0's ShardWorker.execute returns
  at each batch (`--bytes-batch`), greedy and with 5 top logprobs on every row;
- the engine's host time per decode step with a zero-cost executor (`--host-batch`, full vocabulary): everything
  outside the executor call (scheduling, batch layout, sampling on the host or building the SamplingBatch, output
  processing), greedy and seeded top-p.

Run it against another checkout (the code before a change) with GPTOSS_TREE=/path/to/tree PYTHONPATH=/path/to/tree:
the figures are measured through the interfaces both contracts share.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("GPTOSS_TREE") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEFAULT_CHECKPOINT = Path(os.environ.get("TMPDIR", "/tmp")) / "gptoss-bench" / "tiny-hf"
SECTION = "## Parallel overhead (issue 5)"


def plans(layout, batch: int, context: int, vocab: int, seed: int = 0):
    """(prefill plan, decode plan) for `batch` sequences of `context` tokens; sequence b owns a run of blocks."""
    from gptoss_cluster.workers.engine import StepPlan

    bs = layout.block_size
    per_seq = -(-(context + 1) // bs)
    gen = torch.Generator().manual_seed(seed)
    table = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
    groups = len(layout.groups)

    def slots(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return table[seq, pos // bs].long() * bs + pos % bs

    seq = torch.arange(batch).repeat_interleave(context)
    pos = torch.arange(context).repeat(batch)
    prefill = StepPlan(
        token_ids=torch.randint(0, vocab, (batch * context,), generator=gen),
        positions=pos,
        query_start_loc=torch.arange(0, batch * context + 1, context, dtype=torch.int32),
        seq_lens=torch.full((batch,), context, dtype=torch.int32),
        block_tables=[table] * groups,
        slot_mappings=[slots(seq, pos)] * groups,
        logits_indices=torch.arange(context - 1, batch * context, context),
    )
    seq, pos = torch.arange(batch), torch.full((batch,), context)
    decode = StepPlan(
        token_ids=torch.randint(0, vocab, (batch,), generator=gen),
        positions=pos,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=torch.full((batch,), context + 1, dtype=torch.int32),
        block_tables=[table] * groups,
        slot_mappings=[slots(seq, pos)] * groups,
        logits_indices=torch.arange(batch),
    )
    return prefill, decode, batch * per_seq


def samples_on_executor() -> bool:
    """Whether the tree under test has the issue-13 contract (executors return SampledTokens, not logits)."""
    from gptoss_cluster.workers.engine import sampler

    return hasattr(sampler, "SampledTokens")


def decode_step(executor, plan):
    """One decode step as the engine waits for it: the executor's call, plus the host's greedy argmax where the
    executor returns logits."""
    if samples_on_executor():
        return lambda: executor.execute(plan)
    from gptoss_cluster.workers.engine.sampler import argmax_rows

    return lambda: argmax_rows(executor.execute(plan))


def with_logprobs(plan, top: int):
    """`plan` with every row asking for its sampled token's logprob and `top` more (the new contract only)."""
    import dataclasses

    from gptoss_cluster.workers.engine.sampler import SamplingBatch

    batch = SamplingBatch.greedy(plan.num_sampled)
    batch.logprob_rows, batch.max_logprobs = torch.arange(plan.num_sampled), top
    batch.argmax_rows = None  # rows with logprobs need their whole distribution
    return dataclasses.replace(plan, sampling=batch)


def returned_bytes(executor, plan) -> int:
    """Pickled size (protocol 5) of what rank 0's ShardWorker.execute returns for `plan`: what crosses the Ray
    boundary per step (every rank runs the step, as RayExecutor.execute does)."""
    import pickle

    import ray

    from gptoss_cluster.workers.shard import encode_plan

    payload = encode_plan(plan)
    out = ray.get([w.execute.remote(payload) for w in executor.workers])[0]
    return len(pickle.dumps(out, protocol=5))


def host_time_per_step(vocab: int, batch: int, sampling: str, steps: int, warmup: int = 3) -> dict[str, float]:
    """The engine's own time per decode step (everything but the executor call) with an executor that costs nothing:
    it returns a precomputed result every step (token ids under the new contract; under the old, logits [B, vocab],
    trained-model-like: a head of 64 tokens holding 99.8 % of the mass over noise, copied into a fresh tensor as a
    real executor's output is fresh memory, the copy counted as the executor's time). `batch` requests of 16 prompt
    tokens, all decoding, greedy or seeded top-p (temperature 1, top_p 0.9), no tokenizer (a replica's engine
    detokenizes nothing)."""
    from gptoss_cluster.workers.config import ModelConfig
    from gptoss_cluster.workers.engine import Engine, EngineConfig, Executor
    from gptoss_cluster.workers.sampling import SamplingParams

    new = samples_on_executor()

    class ZeroCost(Executor):
        def __init__(self) -> None:
            self.results: dict[int, object] = {}

        def kv_block_bytes(self, layout):
            return 1

        def available_kv_memory(self):
            return 1 << 40

        def initialize_cache(self, layout, num_blocks):
            pass

        def forward_logits(self, plan):
            rows = plan.logits_indices.shape[0]
            gen = torch.Generator().manual_seed(rows)
            logits = torch.randn(rows, vocab, generator=gen)
            logits[:, :64] += 15.0
            return logits

        def execute(self, plan, bitmask=None):
            rows = plan.logits_indices.shape[0]
            if rows not in self.results:
                if new:
                    from gptoss_cluster.workers.engine import SampledTokens

                    self.results[rows] = SampledTokens(torch.randint(0, vocab - 1, (rows,)))
                else:
                    self.results[rows] = self.forward_logits(plan)
            return self.results[rows] if new else self.results[rows].clone()

    config = ModelConfig.preset("tiny", vocab_size=vocab)
    engine_config = EngineConfig(block_size=16, num_blocks=batch * 16, max_num_seqs=batch,
                                 max_num_batched_tokens=max(8192, 16 * batch))
    engine = Engine(ZeroCost(), config, engine_config)
    for i in range(batch):
        params = (SamplingParams(temperature=0, max_tokens=warmup + steps + 4, ignore_eos=True) if sampling == "greedy"
                  else SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=warmup + steps + 4,
                                      ignore_eos=True))
        engine.submit([(7 * i + j) % (vocab - 1) for j in range(16)], params)
    engine.step()  # every prompt at once
    for _ in range(warmup):
        engine.step()
    walls, parts = [], []
    for _ in range(steps):
        before = engine.stats()
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
        after = engine.stats()
        assert after.last_step_tokens == batch, "not a pure decode step"
        walls.append(wall - (after.time_execute_s - before.time_execute_s))
        parts.append({k: getattr(after, k) - getattr(before, k) for k in ("time_schedule_s", "time_sample_s",
                                                                          "time_output_s")})
    return {"host_s": statistics.median(walls),
            **{k: statistics.median(p[k] for p in parts) for k in parts[0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--shards", default="1,2,4", help="shard counts run through Ray (comma separated)")
    parser.add_argument("--batch", default="1,8", help="sequences per decode step (comma separated)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per shard (and for `local`)")
    parser.add_argument("--results", type=Path, help="write the figures into this RESULTS.md section")
    parser.add_argument("--bytes-batch", default="64", help="batches at which to measure the bytes rank 0 returns")
    parser.add_argument("--host-batch", default="64,256",
                        help="batches at which to time the engine's host work per decode step (zero-cost executor)")
    parser.add_argument("--host-steps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()

    import ray

    from gptoss_cluster.workers.checkpoint import open_checkpoint, write_checkpoint
    from gptoss_cluster.workers.config import ModelConfig
    from gptoss_cluster.workers.engine import KVCacheLayout
    from gptoss_cluster.workers.engine.ray_executor import RayExecutor, connect_ray, make_executor

    if not (args.checkpoint / "config.json").exists():
        print(f"writing the tiny checkpoint to {args.checkpoint}", flush=True)
        write_checkpoint(ModelConfig.preset("tiny"), args.checkpoint, progress=False)
    with open_checkpoint(args.checkpoint) as reader:
        config = reader.config
    shard_counts = [int(g) for g in args.shards.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    torch.set_num_threads(args.threads)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        dropped = [g for g in shard_counts if g > gpus]
        shard_counts = [g for g in shard_counts if g <= gpus]
        if dropped:
            print(f"{gpus} GPU(s): skipping G = {dropped}", flush=True)
    load = os.getloadavg()
    connect_ray(num_cpus=max(8, sum(shard_counts) + 1), num_gpus=torch.cuda.device_count() or None)

    layout = KVCacheLayout.from_model_config(config, 16)
    bytes_batches = [int(b) for b in args.bytes_batch.split(",") if b]
    num_blocks = max(plans(layout, b, args.context, config.vocab_size)[2] for b in batches + bytes_batches)
    executors = {"local": make_executor(args.checkpoint, 1, args.dtype, args.device)}
    for g in shard_counts:
        executors[f"ray G={g}"] = RayExecutor(args.checkpoint, g, args.dtype, args.device,
                                              torch_threads=args.threads, count_expert_tokens=False)
    for executor in executors.values():
        executor.initialize_cache(layout, num_blocks)

    rows = []
    new = samples_on_executor()
    print(f"tree {ROOT} ({'sampling on the executor' if new else 'logits back to the engine'})", flush=True)
    extra: dict[str, list] = {"bytes": [], "host": []}
    try:
        ray_executors = {name: e for name, e in executors.items() if isinstance(e, RayExecutor)}
        for batch in bytes_batches:
            _, decode, _ = plans(layout, batch, args.context, config.vocab_size)
            for name, executor in ray_executors.items():
                sizes = {"greedy": returned_bytes(executor, decode)}
                if new:
                    sizes["logprobs 5"] = returned_bytes(executor, with_logprobs(decode, 5))
                for what, size in sizes.items():
                    extra["bytes"].append({"batch": batch, "configuration": name, "sampling": what, "bytes": size})
                    print(f"B={batch:<3} {name:<9} returned per step ({what}): {size:,} bytes", flush=True)
        for batch in [int(b) for b in args.host_batch.split(",") if b]:
            for sampling in ("greedy", "top-p"):
                host = host_time_per_step(config.vocab_size, batch, sampling, args.host_steps)
                extra["host"].append({"batch": batch, "sampling": sampling, **host})
                print(f"B={batch:<3} zero-cost executor, {sampling:<6}: engine host time per decode step "
                      f"{host['host_s'] * 1e3:7.2f} ms (schedule {host['time_schedule_s'] * 1e3:.2f}, sample "
                      f"{host['time_sample_s'] * 1e3:.2f}, output {host['time_output_s'] * 1e3:.2f})", flush=True)
        for batch in batches:
            prefill, decode, _ = plans(layout, batch, args.context, config.vocab_size)
            steps = {name: decode_step(executor, decode) for name, executor in executors.items()}
            for executor in executors.values():
                executor.execute(prefill)
                executor.execute(decode)
            per_rep: dict[str, list[float]] = {name: [] for name in executors}
            names = list(executors)
            for rep in range(args.reps):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    executor, times = executors[name], []
                    step = steps[name]
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        step()
                        times.append(time.perf_counter() - start)
                    per_rep[name].append(statistics.median(times))
            local = statistics.median(per_rep["local"])
            for name, executor in executors.items():
                step = statistics.median(per_rep[name])
                coll = {"all_reduce_s": 0.0, "gather_s": 0.0}
                if isinstance(executor, RayExecutor) and executor.num_shards > 1:
                    coll = executor.time_collectives(batch, iters=50)
                per_step = (2 * config.num_hidden_layers + 1) * coll["all_reduce_s"] + coll["gather_s"]
                rows.append((batch, name, step, min(per_rep[name]), max(per_rep[name]), step / local,
                             coll["all_reduce_s"], coll["gather_s"], per_step))
                print(f"B={batch:<3} {name:<9} step {step * 1e3:8.2f} ms  (reps {min(per_rep[name]) * 1e3:.2f}.."
                      f"{max(per_rep[name]) * 1e3:.2f})  x{step / local:5.2f} local  all_reduce "
                      f"{coll['all_reduce_s'] * 1e6:7.1f} us  gather {coll['gather_s'] * 1e6:7.1f} us  "
                      f"collectives/step {per_step * 1e3:6.2f} ms", flush=True)
    finally:
        for executor in executors.values():
            executor.shutdown()
        ray.shutdown()

    device = (torch.cuda.get_device_name(0) if args.device == "cuda"
              else f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})")
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {device}, torch {torch.__version__}, ray {ray.__version__}, "
              f"{backend}; tiny checkpoint ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
              f"{config.num_experts} experts, vocabulary {config.vocab_size}), {args.dtype}, {args.threads} torch "
              f"thread(s) per shard, context {args.context}, {args.steps} decode steps x {args.reps} interleaved "
              f"repeats (median of per-repeat medians); load average at start {load[0]:.1f}.")
    table = ["| B | configuration | decode step (ms) | repeats min..max (ms) | vs local | all_reduce (us) | "
             "logits gather (us) | collectives per step (ms) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for batch, name, step, lo, hi, ratio, ar, ga, per_step in rows:
        table.append(f"| {batch} | {name} | {step * 1e3:.2f} | {lo * 1e3:.2f}..{hi * 1e3:.2f} | {ratio:.2f} | "
                     f"{ar * 1e6:.0f} | {ga * 1e6:.0f} | {per_step * 1e3:.2f} |")
    print("\n" + header + "\n\n" + "\n".join(table))
    if args.json:
        import json

        steps = [dict(zip(("batch", "configuration", "step_s", "min_s", "max_s", "vs_local"), r[:6], strict=True))
                 for r in rows]
        args.json.write_text(json.dumps({"tree": str(ROOT), "samples_on_executor": new, "load": load,
                                         "steps": steps, **extra}, indent=2))
    if args.results:
        write_section(args.results, header, table, args)


def write_section(path: Path, header: str, table: list[str], args: argparse.Namespace) -> None:
    """Write this script's section of RESULTS.md: the CPU (gloo) or the CUDA (NCCL) subsection, whichever was
    measured, keeping the other one and the hand-written "Notes:" paragraph; every other section stays as it is."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    intro = ("`benchmarks/parallel_overhead.py`: decode step time of one replica whose model is split over G "
             "ShardWorker actors (RayExecutor, torch.distributed), against the model in the calling process "
             "(`local`). `ray G=1` isolates the Ray round trip (plan out, sampled tokens back; before issue 13 the "
             "float32 logits came back); G > 1 adds the collectives, timed on the shards at the step's shapes: "
             "(2 x layers + 1) all_reduces of [B, hidden] plus one gather of the [B, vocab/G] float32 logits to rank "
             "0 (since issue 13 only rows that need the whole distribution are gathered; greedy rows exchange a "
             "(value, id) pair per rank).")
    subsections = {"### CPU (gloo)": [], "### CUDA (NCCL)": []}
    notes: list[str] = []
    lines = text.splitlines()
    if SECTION in lines:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        current = None
        for line in lines[start + 1:end]:
            if line in subsections:
                current = line
            elif line == "Notes:":
                current = "notes"
            if current == "notes":
                notes.append(line)
            elif current is not None:
                subsections[current].append(line)
    else:
        lines.append("")
        start = end = len(lines)
    name = "### CUDA (NCCL)" if args.device == "cuda" else "### CPU (gloo)"
    subsections[name] = [name, "", f"Command: `.venv/bin/python benchmarks/parallel_overhead.py --device {args.device} "
                         f"--batch {args.batch} --shards {args.shards} --steps {args.steps} --reps {args.reps}`", "",
                         header, "", *table, ""]
    body = [SECTION, "", intro, ""]
    for sub in subsections.values():
        if sub:
            body += [*sub] if sub[-1] == "" else [*sub, ""]
    lines[start:end] = body + notes
    path.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {path} ({SECTION}, {name})")


if __name__ == "__main__":
    main()
