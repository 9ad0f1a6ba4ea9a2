"""Load the gpt-oss-20b-shaped checkpoint and decode a few tokens: load time, peak RSS against size on disk, tokens/s.

    python benchmarks/load_20b.py [--checkpoint DIR] [--preset 20b|120b] [--tokens 8]

Writes the checkpoint once (deterministic random weights in the real HF layout, MXFP4 experts) when DIR does not
hold one, then measures in a fresh child process so that peak RSS is the load's alone.
Target: peak RSS <= 1.15x the checkpoint's size on disk (experts stay packed; nothing is held twice).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(checkpoint: str, tokens: int, dtype: str) -> dict:
    """Runs in the child: load through the checkpoint reader, then prefill a short prompt and decode greedily."""
    import torch

    from gptoss_cluster.workers.checkpoint import open_checkpoint
    from gptoss_cluster.workers.engine.ray_executor import DTYPES
    from gptoss_cluster.workers.model import GptOssModel

    start = time.perf_counter()
    with open_checkpoint(checkpoint) as reader:
        model = GptOssModel.from_checkpoint(reader, dtype=DTYPES[dtype], progress=False)
    load_s = time.perf_counter() - start
    peak_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    prompt = torch.tensor([200006, 1428, 200008, 12194])  # <|start|>user<|message|>Hi
    cache = model.new_kv_cache(len(prompt) + tokens)

    def step(ids: torch.Tensor) -> int:
        logits = model(ids, cache.positions(len(ids)), cache, torch.tensor([len(ids) - 1]))
        cache.advance(len(ids))
        return int(logits[0].argmax())

    start = time.perf_counter()
    token = step(prompt)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        token = step(torch.tensor([token]))
    decode_s = time.perf_counter() - start
    return {
        "load_s": load_s,
        "peak_rss_after_load_bytes": peak_after_load,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "prompt_tokens": len(prompt),
        "prefill_s": prefill_s,
        "decode_tokens": tokens,
        "decode_tokens_per_s": tokens / decode_s,
        "threads": torch.get_num_threads(),
    }


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "20b-hf"))
    parser.add_argument("--preset", default="20b", choices=["20b", "120b"])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(args.checkpoint, args.tokens, args.dtype)))
        return 0

    path = Path(args.checkpoint)
    if not (path / "config.json").exists():
        from gptoss_cluster.workers.checkpoint import write_checkpoint
        from gptoss_cluster.workers.config import ModelConfig

        print(f"writing the {args.preset} checkpoint to {path} (once) ...", flush=True)
        start = time.perf_counter()
        write_checkpoint(ModelConfig.preset(args.preset), path, layout="hf", seed=0)
        print(f"  written in {time.perf_counter() - start:.0f} s", flush=True)
    size = disk_bytes(path)
    child = subprocess.run([sys.executable, __file__, "--child", "--checkpoint", str(path), "--tokens",
                            str(args.tokens), "--dtype", args.dtype], capture_output=True, text=True,
                           env={**os.environ, "GPTOSS_NO_PROGRESS": "1"})
    if child.returncode:
        print(child.stderr, file=sys.stderr)
        return child.returncode
    result = json.loads(child.stdout.strip().splitlines()[-1])
    gib = 1024**3
    print(f"checkpoint        {path} ({size / gib:.2f} GiB on disk)")
    print(f"load time         {result['load_s']:.1f} s ({size / gib / result['load_s']:.2f} GiB/s)")
    print(f"peak RSS (load)   {result['peak_rss_after_load_bytes'] / gib:.2f} GiB = "
          f"{result['peak_rss_after_load_bytes'] / size:.3f}x disk (target <= 1.15x)")
    print(f"peak RSS (all)    {result['peak_rss_bytes'] / gib:.2f} GiB = {result['peak_rss_bytes'] / size:.3f}x disk")
    print(f"prefill           {result['prompt_tokens']} tokens in {result['prefill_s']:.2f} s")
    print(f"decode            {result['decode_tokens']} tokens at {result['decode_tokens_per_s']:.2f} tokens/s "
          f"({args.dtype}, torch reference kernels, {result['threads']} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
