"""Helpers to run the router without Ray: a replica that streams scripted tokens, and a server on a thread.

    with ServerThread() as st:
        address = st.start([ScriptedReplica(tokens=[...])], RouterSettings(host="127.0.0.1", port=0))
        ...  # any gRPC client against `address`

`ScriptedReplica` follows the replica streaming contract of `cluster.replica` (so `LocalBackend` can drive it):
it replays a fixed token sequence (or a function of the request), one token per `step_s`, and records what it was
asked for, so tests can force exact harmony sequences (tool calls, channels) and benchmarks can measure the
router's own overhead.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from workers.harmony import RETURN_ID

__all__ = ["ScriptedReplica", "ServerThread"]


class ScriptedReplica:
    """A fake replica core: streams `tokens` (or `tokens(request)`) as engine deltas, `step_s` apart."""

    def __init__(self, tokens: Sequence[int] | Callable[[dict[str, Any]], Sequence[int]] = (), *,
                 step_s: float = 0.0, replica_id: str | None = None, vocab_size: int = 201088,
                 context_length: int = 4096, max_ongoing_requests: int = 256, state: str = "RUNNING",
                 kv_blocks: int = 256, block_size: int = 16) -> None:
        self.tokens = tokens
        self.step_s = step_s
        self.replica_id = replica_id or f"scripted#{uuid.uuid4().hex[:8]}"
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.max_ongoing_requests = max_ongoing_requests
        self.state = state
        self.kv_blocks = kv_blocks
        self.block_size = block_size
        self.started: list[dict[str, Any]] = []  # requests in the order they began streaming
        self.live: dict[str, int] = {}  # request id -> blocks it holds
        self.aborted: list[str] = []
        self.requests_total = 0
        self.tokens_total = 0

    def _script(self, request: dict[str, Any]) -> list[int]:
        tokens = self.tokens(request) if callable(self.tokens) else self.tokens
        return list(tokens)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"accepted": True, "replica_id": self.replica_id}
        if self.state != "RUNNING":
            yield {"error": {"code": "UNAVAILABLE", "message": f"replica is {self.state.lower()}"}}
            return
        rid = str(request.get("request_id") or uuid.uuid4().hex)
        sampling = request.get("sampling") or {}
        max_tokens = int(sampling.get("max_tokens") or 16)
        ignore_eos = bool(sampling.get("ignore_eos"))
        eos = set(request.get("eos_token_ids") or (RETURN_ID,)) | set(sampling.get("stop_token_ids") or ())
        script = self._script(request)
        prompt = request.get("prompt_token_ids") or []
        deadline = request.get("deadline")
        self.requests_total += 1
        self.started.append(dict(request))
        self.live[rid] = -(-(len(prompt) + max_tokens) // self.block_size)
        done = False
        try:
            for i in range(max_tokens):
                if deadline is not None and time.time() >= deadline:
                    yield {"error": {"code": "DEADLINE_EXCEEDED", "message": "the deadline passed on the replica"}}
                    done = True
                    return
                if self.step_s:
                    await asyncio.sleep(self.step_s)
                token = script[i % len(script)] if script else 1000 + i
                self.tokens_total += 1
                stop = token in eos and not ignore_eos
                last = stop or i == max_tokens - 1
                yield {"token_ids": [token], "logprobs": None,
                       "finish_reason": ("stop" if stop else "length") if last else None,
                       "stop_reason": token if stop else None,
                       "usage": {"prompt_tokens": len(prompt), "completion_tokens": i + 1,
                                 "cached_prompt_tokens": 0} if last else None}
                if last:
                    done = True
                    return
        finally:
            self.live.pop(rid, None)
            if not done:
                self.aborted.append(rid)

    def abort(self, request_id: str) -> bool:
        return self.live.pop(request_id, None) is not None

    def stats(self) -> dict[str, Any]:
        used = sum(self.live.values())
        return {"replica_id": self.replica_id, "state": self.state, "num_running": len(self.live), "num_waiting": 0,
                "kv_usage": used / self.kv_blocks, "num_shards": 1, "kv_blocks_total": self.kv_blocks,
                "kv_blocks_free": self.kv_blocks - used, "prefix_cache_hits": 0, "prefix_cache_queries": 0,
                "max_ongoing_requests": self.max_ongoing_requests, "requests_total": self.requests_total,
                "tokens_total": self.tokens_total, "outstanding_tokens": 0}

    def model_info(self) -> dict[str, Any]:
        return {"model": "scripted", "num_layers": 1, "num_experts": 1, "experts_per_token": 1, "hidden_size": 1,
                "vocab_size": self.vocab_size, "context_length": self.context_length, "sliding_window": 128,
                "shards_per_replica": 1, "kv_block_size": self.block_size, "eos_token_id": RETURN_ID,
                "max_ongoing_requests": self.max_ongoing_requests}

    async def shutdown(self) -> None:
        return None


class ServerThread:
    """An asyncio loop on a daemon thread running one GptossServer over a LocalBackend."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gptoss-router-test", daemon=True)
        self.thread.start()
        self.server: Any = None
        self.backend: Any = None
        self.address: str | None = None

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, cores: Sequence[Any], settings: Any = None, metrics: Any = None, wait_ready: bool = True) -> str:
        from cluster.router.backend import LocalBackend
        from cluster.router.server import GptossServer, RouterSettings

        settings = settings or RouterSettings(host="127.0.0.1", port=0)

        async def start() -> str:
            self.backend = LocalBackend(cores)
            self.server = GptossServer(self.backend, settings, metrics)
            port = await self.server.start()
            if wait_ready:
                await self.server.wait_ready(30)
            return f"{settings.host}:{port}"

        self.address = self.run(start())
        return self.address

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop(0))
            self.server = None
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()
