"""The serving load generator: streaming Generate calls against a router at a given concurrency or request rate,
with TTFT / inter-token / end-to-end percentiles and throughput (in the spirit of `vllm bench serve`).

`gptoss-cluster bench --address HOST:PORT` runs it against a running cluster; benchmarks/serving.py builds its
router-versus-direct comparisons on the same pieces.

    records, wall_s = asyncio.run(router_level("127.0.0.1:50051", workload(64, 64, seed=0), 16, 32, token=None))
    print(table_header("concurrency", cpu=False), format_row("16", summarize(records, wall_s), cpu=False), sep="\n")
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

CONNECT_TIMEOUT_S = 10.0


# ------------------------------------------------------------------------------------------------ statistics
def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Record:
    """One request: its start and the arrival time of each of its tokens."""

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


def summarize(records: list[Record], wall_s: float, cpu: dict[str, float] | None = None) -> dict[str, Any]:
    """Counts, throughput and TTFT / ITL / E2E (ms: mean, p50, p90, p99) of one level; `cpu`: CPU seconds per
    process over the level, reported per request."""
    ok = [r for r in records if r.error is None and r.times]
    ttft = [(r.times[0] - r.start) * 1e3 for r in ok]
    itl = []
    for r in ok:
        # deltas with several tokens: spread their gap evenly, as the router's metrics do
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
    out["cpu_ms_per_request"] = {k: v * 1e3 / max(1, len(records)) for k, v in (cpu or {}).items()}
    errors = [r.error for r in records if r.error]
    if errors:
        out["first_error"] = errors[0]
    return out


def table_header(label: str, cpu: bool = True) -> str:
    """The markdown header of `format_row`'s table; `label` names the first column."""
    head = f"| {label} | requests | errors | req/s | out tok/s | TTFT p50 / p90 / p99 ms | ITL p50 / p99 ms | " \
        "E2E p50 / p99 ms |"
    rule = "|---|---:|---:|---:|---:|---|---|---|"
    if cpu:
        head, rule = head + " CPU ms/request: router process / client |", rule + "---|"
    return f"{head}\n{rule}"


def format_row(label: str, s: dict[str, Any], cpu: bool = True) -> str:
    """One markdown row for a `summarize` result (`cpu`: with its CPU per request column)."""
    row = (f"| {label} | {s['requests']} | {s['errors']} | {s['req_per_s']:.1f} | {s['output_tok_per_s']:.0f} | "
           f"{s['ttft_ms']['p50']:.1f} / {s['ttft_ms']['p90']:.1f} / {s['ttft_ms']['p99']:.1f} | "
           f"{s['itl_ms']['p50']:.2f} / {s['itl_ms']['p99']:.2f} | "
           f"{s['e2e_ms']['p50']:.0f} / {s['e2e_ms']['p99']:.0f} |")
    if cpu:
        per_request = s.get("cpu_ms_per_request") or {}
        row += (f" {per_request.get('server', float('nan')):.2f} / "
                f"{per_request.get('client', float('nan')):.2f} |")
    return row


# ------------------------------------------------------------------------------------------------ load
Sender = Callable[[list[int], Record], Awaitable[None]]


class Pacing(NamedTuple):
    """When requests start. Closed loop (rate 0): `concurrency` workers, worker i starting after
    i * stagger_s / concurrency, each sending its next request when the last one ended. Open loop (rate > 0): Poisson
    arrivals at `rate` requests/s (the same times for every path: seeded), at most `concurrency` in flight (later
    arrivals wait for a slot; their TTFT counts from arrival), as `vllm bench serve --request-rate`."""

    stagger_s: float = 0.0
    rate: float = 0.0
    seed: int = 0


CLOSED_LOOP = Pacing()  # all at once, closed loop


async def run_level(send: Sender, prompts: list[list[int]], concurrency: int,
                    pacing: Pacing = CLOSED_LOOP) -> tuple[list[Record], float]:
    """`send(prompt, record)` for every prompt, paced by `pacing`. Returns the records and the wall time."""
    records: list[Record] = []

    async def one(prompt: list[int], record: Record) -> None:
        try:
            await send(prompt, record)
        except Exception as exc:  # noqa: BLE001 - a benchmark counts errors, it does not stop
            record.error = f"{type(exc).__name__}: {str(exc)[:200]}"

    start = time.perf_counter()
    if pacing.rate > 0:
        rng = random.Random(pacing.seed)
        slots = asyncio.Semaphore(concurrency)

        async def arrive(prompt: list[int], at: float) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            record = Record()
            records.append(record)
            async with slots:
                await one(prompt, record)

        times = list(itertools.accumulate(rng.expovariate(pacing.rate) for _ in prompts))
        await asyncio.gather(*(arrive(prompt, at) for prompt, at in zip(prompts, times, strict=True)))
        return records, time.perf_counter() - start
    queue = list(prompts)

    async def worker(i: int) -> None:
        if pacing.stagger_s:
            await asyncio.sleep(i * pacing.stagger_s / concurrency)
        while queue:
            record = Record()
            records.append(record)
            await one(queue.pop(), record)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return records, time.perf_counter() - start


def workload(n: int, input_len: int, seed: int, vocab: int = 199_998) -> list[list[int]]:
    """`n` prompts of `input_len` random token ids below `vocab` (o200k's ordinary tokens end at 199,998)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(n)]


async def router_level(address: str, prompts: list[list[int]], concurrency: int, output_len: int,
                       token: str | None, pacing: Pacing = CLOSED_LOOP, *, tls: bool = False,
                       root_certificates: bytes | None = None) -> tuple[list[Record], float]:
    """Stream a Generate call per prompt (exactly `output_len` tokens, EOS ignored, greedy) against the router at
    `address`. Raises ConnectionError when the router cannot be reached within CONNECT_TIMEOUT_S."""
    from gptoss_cluster.cluster.client import AsyncClient

    # one HTTP/2 connection per 8 streams, as a fleet of clients would have (a single connection serializes
    # the setup of new streams behind the frames of all the others)
    clients = [AsyncClient(address, token=token, tls=tls, root_certificates=root_certificates)
               for _ in range(max(1, -(-concurrency // 8)))]
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

        # connect first: channel setup is not part of any request's TTFT
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await asyncio.gather(*(c.channel.channel_ready() for c in clients))
        except TimeoutError:
            raise ConnectionError(f"no router answers at {address} (waited {CONNECT_TIMEOUT_S:g} s)") from None
        return await run_level(send, prompts, concurrency, pacing)
    finally:
        for client in clients:
            await client.close()
