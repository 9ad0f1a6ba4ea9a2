"""Serving benchmark (in the spirit of `vllm bench serve`): a concurrency sweep of streaming requests against the
gRPC router, with TTFT / inter-token / end-to-end percentiles and throughput, and the router's added latency measured
against calling the engine directly in the same run.

Targets (three ways to get a server):

    # 1. in-process replica of the tiny model behind a router, both in a child process (default)
    .venv/bin/python benchmarks/serving.py --concurrency 1,16,64
    # 2. the router's own overhead: a scripted engine (fixed token cadence, no model) behind the router
    .venv/bin/python benchmarks/serving.py --engine scripted --step-ms 20 --concurrency 64
    # 3. a running cluster (gptoss-cluster serve / Helm); with --ray-app the replicas are also called directly
    #    through a Serve handle (this process joins the Ray cluster: run it on a cluster node)
    .venv/bin/python benchmarks/serving.py --address 127.0.0.1:50051 --ray-app gptoss --concurrency 1,16,64

Direct engine = the same requests sent straight to the replica core (modes 1, 2: in the server process, no gRPC;
mode 3: `ModelReplica.generate` through a Ray Serve handle, no router). Router = the gRPC Generate call from this
process. Both run at the same concurrency on the same prompts, one after the other, for every level; "added" is
router minus direct at each percentile. Workload: random prompt token ids (`--input-len`), exactly `--output-len`
generated tokens (EOS ignored), greedy. `--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CHECKPOINT = Path(os.environ.get("TMPDIR", "/tmp")) / "gptoss-bench" / "tiny-hf"


# ------------------------------------------------------------------------------------------------ statistics
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Record:
    """One request: arrival, token arrival times."""

    __slots__ = ("start", "times", "tokens", "error")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.tokens = 0
        self.error: str | None = None

    def got(self, n: int) -> None:
        if n:
            now = time.perf_counter()
            self.times.extend([now] * n)
            self.tokens += n


def summarize(records: list[Record], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and r.times]
    ttft = [(r.times[0] - r.start) * 1e3 for r in ok]
    itl = []
    for r in ok:
        # deltas with several tokens: spread their gap evenly, as the metrics do
        i = 1
        while i < len(r.times):
            j = i
            while j < len(r.times) and r.times[j] == r.times[i]:
                j += 1
            gap = (r.times[i] - r.times[i - 1]) * 1e3 / (j - i)
            itl.extend([gap] * (j - i))
            i = j
    e2e = [(r.times[-1] - r.start) * 1e3 for r in ok]
    tokens = sum(r.tokens for r in ok)
    out: dict[str, Any] = {"requests": len(records), "errors": len(records) - len(ok), "wall_s": wall_s,
                           "req_per_s": len(ok) / wall_s if wall_s else 0.0,
                           "output_tok_per_s": tokens / wall_s if wall_s else 0.0}
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl), ("e2e_ms", e2e)):
        out[name] = {"mean": statistics.fmean(values) if values else float("nan"),
                     **{f"p{q}": pct(values, q) for q in (50, 90, 99)}}
    errors = [r.error for r in records if r.error]
    if errors:
        out["first_error"] = errors[0]
    return out


async def run_level(send: Any, prompts: list[list[int]], concurrency: int) -> dict[str, Any]:
    """`send(prompt, record)` for every prompt, at most `concurrency` at once."""
    queue = list(prompts)
    records: list[Record] = []

    async def worker() -> None:
        while queue:
            prompt = queue.pop()
            record = Record()
            records.append(record)
            try:
                await send(prompt, record)
            except Exception as exc:  # noqa: BLE001 - a benchmark counts errors, it does not stop
                record.error = f"{type(exc).__name__}: {str(exc)[:200]}"

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(records, time.perf_counter() - start)


def workload(n: int, input_len: int, seed: int, vocab: int = 199_998) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(n)]


# ------------------------------------------------------------------------------------------------ server process
def _direct_sender(cores: list[Any], output_len: int) -> Any:
    """Requests straight into the replica cores (round robin), no router, no gRPC."""
    turn = [0]

    async def send(prompt: list[int], record: Record) -> None:
        core = cores[turn[0] % len(cores)]
        turn[0] += 1
        request = {"request_id": os.urandom(8).hex(), "prompt_token_ids": prompt,
                   "sampling": {"max_tokens": output_len, "ignore_eos": True, "temperature": 0.0}}
        async for item in core.generate(request):
            if "error" in item:
                raise RuntimeError(item["error"]["message"])
            record.got(len(item.get("token_ids") or ()))

    return send


def _server_process(conn: Any, engine: str, model: str, replicas: int, step_ms: float, num_blocks: int) -> None:
    os.environ.setdefault("GPTOSS_NO_PROGRESS", "1")
    from cluster.metrics import Metrics
    from cluster.router.backend import LocalBackend
    from cluster.router.server import GptossServer, RouterSettings

    async def main() -> None:
        if engine == "scripted":
            from cluster.router.testing import ScriptedReplica

            cores = [ScriptedReplica(step_s=step_ms / 1000, max_ongoing_requests=1024) for _ in range(replicas)]
        else:
            from cluster.replica import ReplicaCore, ReplicaSettings
            from workers.engine import LocalExecutor

            settings = ReplicaSettings(model=model, dtype="float32", max_ongoing_requests=1024,
                                       engine={"num_blocks": num_blocks, "max_num_seqs": 256})
            first = ReplicaCore(settings, replica_id="bench#r0")
            cores = [first] + [ReplicaCore(settings, replica_id=f"bench#r{i}", model_config=first.model_config,
                                           executor=LocalExecutor(first.executor.model, True))
                               for i in range(1, replicas)]
        server = GptossServer(LocalBackend(cores), RouterSettings(host="127.0.0.1", port=0, max_queued_requests=4096,
                                                                  health_interval_s=0.5), Metrics())
        port = await server.start()
        await server.wait_ready(60)
        conn.send(("ready", port))
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "stop":
                break
            _, prompts, concurrency, output_len = command
            conn.send(("result", await run_level(_direct_sender(cores, output_len), prompts, concurrency)))
        await server.stop(0)
        for core in cores:
            await core.shutdown()

    asyncio.run(main())


class LocalTarget:
    """A router + replica(s) in a child process; `direct` runs a level inside that process."""

    def __init__(self, engine: str, model: str, replicas: int, step_ms: float, num_blocks: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_server_process, args=(child, engine, model, replicas, step_ms, num_blocks),
                                daemon=True)
        self.proc.start()
        if not self.conn.poll(600):
            raise TimeoutError("the server process did not start")
        _, port = self.conn.recv()
        self.address = f"127.0.0.1:{port}"

    async def direct(self, prompts: list[list[int]], concurrency: int, output_len: int) -> dict[str, Any]:
        self.conn.send(("direct", prompts, concurrency, output_len))
        loop = asyncio.get_running_loop()
        _, result = await loop.run_in_executor(None, self.conn.recv)
        return result

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


class RayTarget:
    """A running cluster; `direct` calls ModelReplica.generate through a Serve handle (no router)."""

    def __init__(self, address: str, app: str | None) -> None:
        self.address = address
        self.handle = None
        if app:
            from cluster.app import ray_auth_token

            if ray_auth_token() and "RAY_AUTH_MODE" not in os.environ:
                os.environ["RAY_AUTH_MODE"] = "token"  # Ray only sends its token to an explicit address when told
            from ray import serve

            from workers.engine.ray_executor import connect_ray

            connect_ray(os.environ.get("RAY_ADDRESS") or "auto")  # keeps a loopback address on loopback
            self.handle = serve.get_deployment_handle("ModelReplica", app_name=app).options(stream=True)

    async def direct(self, prompts: list[list[int]], concurrency: int, output_len: int) -> dict[str, Any] | None:
        if self.handle is None:
            return None
        handle = self.handle

        async def send(prompt: list[int], record: Record) -> None:
            request = {"request_id": os.urandom(8).hex(), "prompt_token_ids": prompt,
                       "sampling": {"max_tokens": output_len, "ignore_eos": True, "temperature": 0.0}}
            async for item in handle.generate.remote(request):
                if "error" in item:
                    raise RuntimeError(item["error"]["message"])
                record.got(len(item.get("token_ids") or ()))

        return await run_level(send, prompts, concurrency)

    def close(self) -> None:
        return None


async def router_level(address: str, prompts: list[list[int]], concurrency: int, output_len: int,
                       token: str | None) -> dict[str, Any]:
    from cluster.client import AsyncClient

    # one HTTP/2 connection per 8 streams, as a fleet of clients would have (a single connection serializes
    # the setup of new streams behind the frames of all the others)
    clients = [AsyncClient(address, token=token) for _ in range(max(1, -(-concurrency // 8)))]
    turn = [0]
    try:
        async def send(prompt: list[int], record: Record) -> None:
            client = clients[turn[0] % len(clients)]
            turn[0] += 1
            last = None
            async for response in client.generate(prompt, max_tokens=output_len, ignore_eos=True, temperature=0):
                record.got(len(response.token_ids))
                last = response
            if last is None or last.usage.completion_tokens != output_len:
                raise RuntimeError(f"expected {output_len} tokens, got {record.tokens}")

        return await run_level(send, prompts, concurrency)
    finally:
        for client in clients:
            await client.close()


# ------------------------------------------------------------------------------------------------ main
def _row(label: str, s: dict[str, Any]) -> str:
    return (f"| {label} | {s['requests']} | {s['errors']} | {s['req_per_s']:.1f} | {s['output_tok_per_s']:.0f} | "
            f"{s['ttft_ms']['p50']:.1f} / {s['ttft_ms']['p90']:.1f} / {s['ttft_ms']['p99']:.1f} | "
            f"{s['itl_ms']['p50']:.2f} / {s['itl_ms']['p99']:.2f} | "
            f"{s['e2e_ms']['p50']:.0f} / {s['e2e_ms']['p99']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="a running router HOST:PORT (default: start one locally)")
    p.add_argument("--ray-app", default=None, help="with --address: Serve application to call directly")
    p.add_argument("--engine", choices=["tiny", "scripted"], default="tiny", help="local target's engine")
    p.add_argument("--model", default=None, help="checkpoint for --engine tiny (default: written once)")
    p.add_argument("--replicas", type=int, default=1, help="local replicas (default 1)")
    p.add_argument("--step-ms", type=float, default=20.0, help="scripted engine: ms per token (default 20)")
    p.add_argument("--num-blocks", type=int, default=4096, help="KV blocks per local replica")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated levels (default 1,16,64)")
    p.add_argument("--num-requests", type=int, default=0, help="requests per level (default: 4 x concurrency, "
                                                                    ">= 16)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=4, help="requests before measuring (default 4)")
    p.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    token = os.environ.get("GPTOSS_AUTH_TOKEN") or None

    if args.address:
        target: Any = RayTarget(args.address, args.ray_app)
        what = f"cluster at {args.address}"
    else:
        model = args.model
        if args.engine == "tiny" and model is None:
            from workers.checkpoint import write_checkpoint
            from workers.config import ModelConfig

            model = str(DEFAULT_CHECKPOINT)
            if not (DEFAULT_CHECKPOINT / "config.json").exists():
                write_checkpoint(ModelConfig.preset("tiny"), DEFAULT_CHECKPOINT, seed=0, progress=False)
        target = LocalTarget(args.engine, model or "", args.replicas, args.step_ms, args.num_blocks)
        what = (f"local router + {args.replicas} {args.engine} replica(s)"
                + (f" ({args.step_ms:g} ms/token)" if args.engine == "scripted" else " (float32, CPU)"))
    results: dict[str, Any] = {"target": what, "input_len": args.input_len, "output_len": args.output_len,
                               "levels": {}}
    print(f"# serving benchmark: {what}; prompts {args.input_len} tokens, outputs {args.output_len} tokens")
    print("| path @ concurrency | requests | errors | req/s | out tok/s | TTFT p50 / p90 / p99 ms | "
          "ITL p50 / p99 ms | E2E p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---|---|---|")

    async def sweep() -> None:
        warm = workload(args.warmup, args.input_len, args.seed + 99)
        if warm:
            await router_level(target.address, warm, len(warm), args.output_len, token)
            await target.direct(warm, len(warm), args.output_len)
        for level in levels:
            n = args.num_requests or max(16, 4 * level)
            prompts = workload(n, args.input_len, args.seed + level)
            direct = await target.direct(prompts, level, args.output_len)
            router = await router_level(target.address, prompts, level, args.output_len, token)
            entry: dict[str, Any] = {"router": router}
            if direct is not None:
                entry["direct"] = direct
                entry["added_ms"] = {k: {q: router[k][q] - direct[k][q] for q in ("p50", "p90", "p99")}
                                     for k in ("ttft_ms", "itl_ms", "e2e_ms")}
                print(_row(f"direct @ {level}", direct))
            print(_row(f"router @ {level}", router))
            if direct is not None:
                a = entry["added_ms"]["ttft_ms"]
                print(f"| router added TTFT @ {level} | | | | | {a['p50']:+.2f} / {a['p90']:+.2f} / "
                      f"{a['p99']:+.2f} | | |")
            results["levels"][str(level)] = entry

    try:
        asyncio.run(sweep())
    finally:
        target.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
