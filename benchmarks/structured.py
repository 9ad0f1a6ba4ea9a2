"""Structured outputs: decode throughput with and without a JSON-schema constraint, and grammar compile times.

Same engine, same process, interleaved rounds in ABBA order (free, constrained, constrained, free, ...): every
round submits `batch` chat requests at once and decodes exactly `--tokens` tokens each (free: EOS ignored;
constrained: a schema long enough that max_tokens cuts it), so both modes run the same number of steps at the same
batch size. The constraint covers the whole completion (reasoning budget 0): harmony header trie, then the schema's
grammar, whose strings with maxLength were the expensive part of mask filling (see `chain_bounded_repeats` in
workers/engine/structured.py).

    .venv/bin/python benchmarks/structured.py                     # tiny model (written to /tmp if missing)
    .venv/bin/python benchmarks/structured.py --batches 1,32 --rounds 3 --tokens 96

Prints tokens/s per round, the medians, constrained/free ratios, the engine's sampling time share, and the compile
time of tests/structured_cases.py's 20 schemas (cold compiler, then cached).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CHECKPOINT = Path(os.environ.get("TMPDIR", "/tmp")) / "gptoss-bench" / "tiny-hf"

# 16 objects with fixed-length strings: far longer than --tokens, so every constrained request decodes to the cut
LONG_SCHEMA = {"type": "array", "minItems": 16, "maxItems": 16, "items": {
    "type": "object", "properties": {"name": {"type": "string", "minLength": 8, "maxLength": 8},
                                     "note": {"type": "string", "maxLength": 24},
                                     "n": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["name", "note", "n"], "additionalProperties": False}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=96)
    args = p.parse_args()

    import torch

    from gptoss_cluster.workers.checkpoint import write_checkpoint
    from gptoss_cluster.workers.config import ModelConfig
    from gptoss_cluster.workers.engine import Engine, EngineConfig
    from gptoss_cluster.workers.engine.structured import Constraint, ResponseFormat, StructuredDecoding
    from gptoss_cluster.workers.harmony import get_tokenizer, render_chat
    from tests.structured_cases import SCHEMAS

    if not (args.checkpoint / "config.json").exists():
        write_checkpoint(ModelConfig.preset("tiny"), args.checkpoint, layout="hf", seed=0, progress=False)
    tok = get_tokenizer()
    batches = [int(b) for b in args.batches.split(",")]
    engine = Engine.from_checkpoint(args.checkpoint, dtype=torch.float32, tokenizer=tok, progress=False,
                                    config=EngineConfig(num_blocks=4096, max_model_len=2048,
                                                        max_num_seqs=max(batches)))
    prompt = render_chat([{"role": "user", "content": "List sixteen items as JSON."}])
    constraint = engine.prepare_constraint(Constraint(ResponseFormat("json_schema", json.dumps(LONG_SCHEMA)),
                                                      max_reasoning_tokens=0))
    stops = tok.stop_token_ids_for_chat

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread: the work done, whatever shares the cores
        return usage.ru_utime + usage.ru_stime

    def run(batch: int, constrained: bool, seed: int) -> tuple[float, float, float]:
        params = {"temperature": 1.0, "max_tokens": args.tokens, "ignore_eos": not constrained}
        requests = [(prompt, {**params, "seed": seed + i}, stops, constraint if constrained else None)
                    for i in range(batch)]
        before = engine.stats()
        t, cpu = time.perf_counter(), cpu_seconds()
        results = engine.generate(requests)
        elapsed, cpu = time.perf_counter() - t, cpu_seconds() - cpu
        after = engine.stats()
        assert all(len(r.token_ids) == args.tokens for r in results), [len(r.token_ids) for r in results]
        sample_share = (after.time_sample_s - before.time_sample_s) / elapsed
        return batch * args.tokens / elapsed, sample_share, 1e3 * cpu / (batch * args.tokens)

    run(2, True, 0)  # warm-up: allocations, xgrammar's caches
    run(2, False, 0)
    print(f"decode: {args.tokens} tokens per request, {args.rounds} interleaved rounds per mode, tiny model, fp32, "
          f"{os.cpu_count()} CPUs")
    summary = {}
    for batch in batches:
        rates: dict[bool, list[float]] = {False: [], True: []}
        cpu_ms: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            # ABBA order (free first in even rounds, constrained first in odd ones): a load that drifts over the run
            # on a shared box then favours neither mode
            for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                rate, share, per_token = run(batch, constrained, 1000 * r)
                rates[constrained].append(rate)
                cpu_ms[constrained].append(per_token)
                print(f"  batch {batch:3d} round {r} {'json-schema' if constrained else 'free       '} "
                      f"{rate:8.1f} tok/s  {per_token:7.2f} CPU-ms/token  (sampling {100 * share:4.1f}% of wall)")
        free, json_ = statistics.median(rates[False]), statistics.median(rates[True])
        free_cpu, json_cpu = statistics.median(cpu_ms[False]), statistics.median(cpu_ms[True])
        summary[batch] = (free, json_)
        paired = statistics.median(j / f for f, j in zip(rates[False], rates[True], strict=True))
        print(f"batch {batch}: free {free:.1f} tok/s, json-schema {json_:.1f} tok/s, constrained/free "
              f"{json_ / free:.3f} ({100 * (1 - json_ / free):+.1f}% slower; median of the rounds' own ratios "
              f"{paired:.3f}); CPU per token {free_cpu:.2f} vs {json_cpu:.2f} ms "
              f"({100 * (json_cpu / free_cpu - 1):+.1f}%)")

    # compile times: a fresh StructuredDecoding has an empty cache
    fresh = StructuredDecoding(tok, engine.model_config.vocab_size)
    cold, warm = [], []
    for schema in SCHEMAS:
        c = Constraint(ResponseFormat("json_schema", json.dumps(schema)))
        t = time.perf_counter()
        fresh.compile(c)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        fresh.compile(c)
        warm.append(time.perf_counter() - t)
    print(f"compile ({len(SCHEMAS)} schemas, cold): mean {1e3 * statistics.mean(cold):.1f} ms, median "
          f"{1e3 * statistics.median(cold):.1f} ms, max {1e3 * max(cold):.1f} ms; cached: mean "
          f"{1e6 * statistics.mean(warm):.0f} us")
    print("summary: " + ", ".join(f"batch {b}: {100 * (1 - j / f):+.1f}% slower constrained"
                                  for b, (f, j) in summary.items()))


if __name__ == "__main__":
    main()
