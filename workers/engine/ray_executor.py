"""RayExecutor: one replica's G ShardWorker actors (one device each) behind the `Executor` interface, and the
`make_executor` factory the replica and the offline LLM call.

    executor = make_executor("/ckpt/gpt-oss-120b", num_shards=4, device="cuda",
                             placement_group=ray.util.get_current_placement_group())  # bundles 1..4 hold the shards
    engine = Engine(executor, executor.model_config, EngineConfig())

Placement: given a placement group (a Serve replica's own: bundle 0 holds the replica, bundles 1..G one device each),
shard r goes into bundle `bundle_offset + r` and asks for exactly that bundle's resources. Without one (the offline
LLM) the executor creates a group of G bundles ({"GPU": 1, "CPU": 1} or {"CPU": cpus_per_shard}) with
`placement_strategy` (PACK by default: one node when it fits; STRICT_SPREAD / SPREAD when a model does not fit one
node), after checking that the cluster has the devices at all, and removes it on shutdown.

Start-up: rank 0 reports its node IP and a free port on it, every rank joins the torch.distributed group there (NCCL
on CUDA, gloo otherwise) and reads only its slices of the checkpoint. Per step the plan (with its SamplingBatch) is
pickled once (about a kilobyte, numpy arrays) and sent to every rank in one round of calls; the ranks sample
together (rows that need the whole distribution gathered to rank 0, plain greedy rows vocab-parallel) and rank 0
alone returns the `SampledTokens` (token ids, logprobs only for rows that asked: O(rows) bytes), the others None.
A step with constrained rows waits for their token bitmasks before it is sent (they travel with the plan, to rank 0).
Async scheduling (`submit`): step N + 1 is sent before step N's tokens are back; each shard runs the steps in the
order sent and fills step N + 1's placeholder rows from the tokens it sampled in step N (rank 0 sends them to the
other ranks), so the round trip through Ray overlaps the shards' compute.
`forward_logits` is the separate call that returns rank 0's float32 logits rows instead.

Failure: any shard that dies, raises, or overruns `step_timeout_s` turns the step into a `ShardFailure` naming the
shard; the whole group is torn down at once (every actor killed: survivors may sit in a collective waiting for the
dead peer; the placement group removed if this executor made it), and the executor stays failed. `check_health()`
raises when any shard is dead or unresponsive.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from gptoss_cluster.workers.config import ModelConfig
from gptoss_cluster.workers.engine.executor import BitmaskSource, Executor, LocalExecutor, StepPlan
from gptoss_cluster.workers.engine.kv_cache import KVCacheLayout
from gptoss_cluster.workers.engine.sampler import SampledTokens
from gptoss_cluster.workers.lora.adapter import LoraError, LoraSource
from gptoss_cluster.workers.model import ShardSpec
from gptoss_cluster.workers.parallel import DEFAULT_TIMEOUT_S, default_backend
from gptoss_cluster.workers.shard import ShardWorker, decode, encode, encode_plan

logger = logging.getLogger(__name__)
T = TypeVar("T")

PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "auto": torch.bfloat16}


class ShardFailure(RuntimeError):
    """A shard of the replica died, failed or stopped answering; the replica's shards are gone."""


# ---------------------------------------------------------------------------------------------------- helpers
def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A model dtype given by name (DTYPES) or as torch.float32 / torch.bfloat16; the offline LLM checks with it too."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    return dtype


def read_model_config(model_path: str | os.PathLike[str]) -> ModelConfig:
    from gptoss_cluster.workers.checkpoint import open_checkpoint

    with open_checkpoint(model_path) as reader:
        return reader.config


def check_num_shards(config: ModelConfig, num_shards: int) -> None:
    """Refuse a shard count the model cannot be split into (before anything starts)."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    try:
        ShardSpec(0, num_shards).validate(config)
    except ValueError as exc:
        raise ValueError(
            f"num_shards={num_shards} cannot split {config.name or 'this model'}: {exc}; the shard count must divide "
            f"the {config.num_key_value_heads} KV heads, the {config.num_experts} experts and the "
            f"{config.vocab_size} vocabulary entries") from None


@contextlib.contextmanager
def _loopback_ray():
    """Keep a Ray node started (or joined) on 127.0.0.1 on loopback.

    Ray replaces a loopback --node-ip-address with the host's routable IP (and binds its servers there) unless its
    cluster mode is off; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 turns it off, for this process (the constant, read at
    import) and the Ray processes it spawns (the environment, inherited).
    """
    from ray._private import ray_constants

    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved_env, saved_const = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def _have_ray_token() -> bool:
    """Whether a Ray auth token is at hand where Ray looks: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def _token_auth_for_explicit_address() -> None:
    """Ray sends its token to an explicitly named cluster only when RAY_AUTH_MODE says so; with a token at hand and
    no mode set, say so (as cluster/app.py does), so joining a token-auth cluster just works."""
    if "RAY_AUTH_MODE" in os.environ or not _have_ray_token():
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()  # sets RAY_AUTH_MODE=token and refreshes Ray's cached config
    except ImportError:
        os.environ["RAY_AUTH_MODE"] = "token"


def connect_ray(address: str | None = None, num_cpus: int | None = None, **init_kwargs: Any) -> bool:
    """Make sure this process is connected to Ray: nothing when it already is; join `address` (or $RAY_ADDRESS);
    otherwise start a local Ray on loopback (no dashboard, token auth on; a start that fails, as Ray's does when its
    dashboard misses the start-up timeout on a loaded machine, is cleaned up and tried once more). Returns True when
    this call connected (the caller owns the connection and may `ray.shutdown()` it)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    init_kwargs.setdefault("logging_level", logging.WARNING)
    if address and address != "local":
        _token_auth_for_explicit_address()
        ctx = _loopback_ray() if _is_loopback(address) else contextlib.nullcontext()
        with ctx:
            ray.init(address=address, **init_kwargs)
        return True
    init_kwargs.setdefault("include_dashboard", False)

    def start() -> bool:
        with _loopback_ray():
            ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, **init_kwargs)
        return True

    return start_local_ray(start)


LOCAL_START_ATTEMPTS = 2


def start_local_ray(start: Callable[[], T]) -> T:
    """`start()`, which starts Ray processes on this machine; when it raises, kill the processes it left behind and
    call it once more. A loaded machine sometimes starves a new node past one of Ray's start-up timeouts (the
    dashboard's, the raylet's registration with the GCS), and Ray raises without a node that `ray.shutdown` could
    stop: the half-started processes (GCS, raylet, reaper) are this process's new descendants."""
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        started_before = _child_pids()
        try:
            return start()
        except Exception as e:  # noqa: BLE001 - Ray raises bare Exception for a node that did not come up
            _kill_new_children(started_before)
            if attempt == LOCAL_START_ATTEMPTS:
                raise
            logger.warning("starting a local Ray node failed (%s); trying once more", e)
    raise AssertionError("unreachable")


def _child_pids() -> set[int]:
    """This process's descendants, from /proc (Linux; elsewhere an empty set: nothing is cleaned up)."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    descendants, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parent_of.items() if ppid in frontier} - descendants
        descendants |= frontier
    return descendants


def _kill_new_children(before: set[int]) -> None:
    """Kill the processes a failed `ray.init` left behind (it raises without its node, so `ray.shutdown` cannot)."""
    import signal

    for pid in _child_pids() - before:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _fits(capacity: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of `bundle` fit into `capacity`."""
    counts = [int(capacity.get(k, 0.0) // v) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 1 << 30


def _fmt_resources(res: dict[str, float], keys: tuple[str, ...] = ("CPU", "GPU")) -> str:
    return ", ".join(f"{res.get(k, 0):g} {k}" for k in keys)


def check_cluster_fits(num_shards: int, bundle: dict[str, float], strategy: str) -> None:
    """Refuse at once when the cluster could never hold `num_shards` bundles with `strategy` (its total capacity,
    not what is free right now: busy devices may free up; the placement group wait covers that)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [_fits(n.get("Resources", {}), bundle) for n in nodes]
    total = ray.cluster_resources()
    want = {k: v * num_shards for k, v in bundle.items()}
    if strategy == "STRICT_PACK":
        ok, where = max(per_node, default=0) >= num_shards, "on one node"
    elif strategy == "STRICT_SPREAD":
        ok, where = sum(1 for c in per_node if c >= 1) >= num_shards, "on as many distinct nodes"
    else:
        ok, where = sum(per_node) >= num_shards, "in the cluster"
    if not ok:
        keys = tuple(sorted(set(bundle) | {"CPU", "GPU"}))
        nodes_desc = "; ".join(f"node {n['NodeManagerAddress']}: {_fmt_resources(n.get('Resources', {}), keys)}"
                               for n in nodes)
        raise RuntimeError(
            f"{num_shards} shards need {num_shards} × {{{_fmt_resources(bundle, tuple(bundle))}}} "
            f"({_fmt_resources(want, tuple(want))}) {where} (placement {strategy}), but the cluster has "
            f"{_fmt_resources(total, keys)} in all ({len(nodes)} node(s): {nodes_desc})")


# ---------------------------------------------------------------------------------------------------- executor
class RayExecutor(Executor):
    """G ShardWorker actors, one per device, running one replica's steps. See the module docstring."""

    def __init__(self, model_path: str | os.PathLike[str], num_shards: int, dtype: str | torch.dtype = torch.bfloat16,
                 device: str = "cpu", placement_group: Any = None, placement_strategy: str = "PACK",
                 bundle_offset: int = 1, *, cpus_per_shard: float = 1.0, kernels: str | None = None,
                 count_expert_tokens: bool = True, backend: str | None = None,
                 collective_timeout_s: float = DEFAULT_TIMEOUT_S, step_timeout_s: float = 600.0,
                 start_timeout_s: float = 120.0, load_timeout_s: float = 3600.0,
                 placement_timeout_s: float = 60.0, health_timeout_s: float = 10.0,
                 torch_threads: int | None = None, ray_address: str | None = None, max_loras: int = 4,
                 max_lora_rank: int = 16) -> None:
        # Everything that can be refused is refused before any actor or placement group exists.
        self.model_path = str(Path(model_path).absolute())
        self.dtype = as_dtype(dtype)
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"got {placement_strategy!r}")
        if isinstance(bundle_offset, bool) or not isinstance(bundle_offset, int) or bundle_offset < 0:
            raise ValueError(f"bundle_offset must be a non-negative integer, got {bundle_offset!r}")
        if not cpus_per_shard >= 0:
            raise ValueError(f"cpus_per_shard must be >= 0, got {cpus_per_shard!r}")
        self.model_config = read_model_config(self.model_path)
        check_num_shards(self.model_config, num_shards)
        self.num_shards, self.device = num_shards, device
        self.placement_strategy = placement_strategy
        self.backend = backend or default_backend(device)
        self.step_timeout_s, self.health_timeout_s = step_timeout_s, health_timeout_s
        self.num_kv_heads = self.model_config.num_key_value_heads // num_shards  # per rank
        self.workers: list[Any] = []
        self.node_infos: list[dict[str, Any]] = []
        self.placement_group: Any = None
        self.owns_placement_group = False
        self.failure: ShardFailure | None = None
        self._closed = False
        self._counting = count_expert_tokens
        self._waiter: ThreadPoolExecutor | None = None  # collects submitted steps' results, in order (`submit`)

        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # Connected here (no Ray yet: the offline LLM) -> shutdown() disconnects. A Ray started here gets at least
        # a logical CPU per shard (plus one), however few cores the machine has.
        self.owns_ray = connect_ray(ray_address, num_cpus=max(os.cpu_count() or 1,
                                                               math.ceil(num_shards * cpus_per_shard) + 1))
        try:
            bundle = {"GPU": 1.0, "CPU": 1.0} if device == "cuda" else {"CPU": float(cpus_per_shard)}
            if placement_group is None:
                check_cluster_fits(num_shards, bundle, placement_strategy)
                bundle_offset = 0
            else:
                specs = placement_group.bundle_specs
                last = bundle_offset + num_shards - 1
                if len(specs) <= last:
                    raise ValueError(f"{num_shards} shards need bundles {bundle_offset}..{last} of the placement "
                                     f"group, which has {len(specs)} bundle(s)")
                if device == "cuda":
                    short = [b for b in range(bundle_offset, last + 1) if specs[b].get("GPU", 0) < 1]
                    if short:
                        raise ValueError(f"device='cuda' needs one GPU in each shard bundle; bundle(s) {short} of the "
                                         "placement group have none")
            self.bundle_offset = bundle_offset
            if placement_group is None:
                placement_group = self._create_placement_group(bundle, placement_timeout_s)
            else:
                self._wait_ready(placement_group, placement_timeout_s, "the given placement group")
            self.placement_group = placement_group
            specs = placement_group.bundle_specs
            actor_cls = ray.remote(concurrency_groups={"health": 1})(ShardWorker)
            for r in range(num_shards):
                spec = specs[bundle_offset + r]
                self.workers.append(actor_cls.options(
                    num_cpus=spec.get("CPU", 0.0), num_gpus=spec.get("GPU", 0.0), max_restarts=0, max_task_retries=0,
                    allow_out_of_order_execution=False,  # steps run in the order sent: `submit` relies on it
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group, placement_group_bundle_index=bundle_offset + r,
                        placement_group_capture_child_tasks=False),
                ).remote(r, num_shards, device, torch_threads))
            self.node_infos = self._gather([w.node_info.remote() for w in self.workers], start_timeout_s,
                                           "starting the shard actors")
            master_addr = self.node_infos[0]["ip"]
            port = self._gather([self.workers[0].free_port.remote(master_addr)], start_timeout_s, "finding a port")[0]
            self._gather([w.init_process_group.remote(master_addr, port, self.backend, collective_timeout_s,
                                                      info["ip"])
                          for w, info in zip(self.workers, self.node_infos, strict=True)],
                         start_timeout_s, f"joining the {self.backend} process group at {master_addr}:{port}")
            self.load_reports = self._gather(
                [w.load.remote(self.model_path, self.dtype, kernels, count_expert_tokens, max_loras, max_lora_rank)
                 for w in self.workers],
                load_timeout_s, f"loading {self.model_path}")
        except BaseException:
            self._teardown()
            if self.owns_ray:
                ray.shutdown()
            raise
        self.rank0_ip, self.master_port = master_addr, port

    # ------------------------------------------------------------------------------------------------ placement
    def _create_placement_group(self, bundle: dict[str, float], timeout_s: float) -> Any:
        from ray.util.placement_group import placement_group

        pg = placement_group([dict(bundle) for _ in range(self.num_shards)], strategy=self.placement_strategy,
                             name=f"gptoss-shards-{os.getpid()}-{id(self):x}")
        self.placement_group, self.owns_placement_group = pg, True
        self._wait_ready(pg, timeout_s, f"a placement group of {self.num_shards} × {bundle} "
                                        f"({self.placement_strategy})")
        return pg

    @staticmethod
    def _wait_ready(pg: Any, timeout_s: float, what: str) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            raise RuntimeError(f"{what} was not placed within {timeout_s:g} s: the cluster has "
                               f"{_fmt_resources(ray.cluster_resources())} in all, "
                               f"{_fmt_resources(ray.available_resources())} free") from None

    # ------------------------------------------------------------------------------------------------ calls
    def _gather(self, refs: list[Any], timeout_s: float, what: str) -> list[Any]:
        """ray.get of one call per shard; any failure (death, exception, timeout) kills the group and raises."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        try:
            return ray.get(refs, timeout=timeout_s)
        except (RayError, GetTimeoutError) as exc:
            failure = self._diagnose(refs, exc, timeout_s, what)
            self._fail(failure)
            raise failure from exc

    def _diagnose(self, refs: list[Any], exc: BaseException, timeout_s: float, what: str) -> ShardFailure:
        """Name the shard at fault: a dead one first (its peers' collectives fail because of it), then one that
        raised, else the first that never answered."""
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

        g = self.num_shards
        if isinstance(exc, GetTimeoutError):
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        else:  # give the other shards' outcomes a moment to arrive (the dead peer's may trail its peers' errors)
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
        ready_set = set(ready)
        died, raised, silent = [], [], []
        for rank, ref in enumerate(refs):
            if ref not in ready_set:
                silent.append(rank)
                continue
            try:
                ray.get(ref, timeout=0)
            except (RayActorError, ActorDiedError) as err:
                died.append((rank, err))
            except RayTaskError as err:
                raised.append((rank, err))
            except Exception as err:  # noqa: BLE001 - anything else is this shard's failure too
                raised.append((rank, err))
        rank_of = {w._actor_id.hex(): r for r, w in enumerate(self.workers)}
        if isinstance(exc, (RayActorError, ActorDiedError)) and not died:
            rank = rank_of.get(getattr(exc, "actor_id", None) or "", 0)
            died.append((rank, exc))
        if died:
            rank, err = died[0]
            return ShardFailure(f"shard {rank} of {g} died while {what}: {_first_line(err)}")
        if raised:
            rank, err = raised[0]
            return ShardFailure(f"shard {rank} of {g} failed while {what}: {_first_line(err)}")
        return ShardFailure(f"shard(s) {silent} of {g} did not answer within {timeout_s:g} s while {what}")

    def _fail(self, failure: ShardFailure) -> None:
        if self.failure is None:
            self.failure = failure
            logger.error("%s; killing all %d shards", failure, self.num_shards)
        self._teardown()

    def _check_usable(self) -> None:
        if self.failure is not None:
            raise ShardFailure(f"this replica's shards are gone: {self.failure}")
        if self._closed:
            raise RuntimeError("the executor was shut down")

    # ------------------------------------------------------------------------------------------------ Executor
    def kv_block_bytes(self, layout: KVCacheLayout) -> int:
        """One block id's bytes on one rank: its own KV heads only (every rank holds the same number)."""
        return layout.block_bytes(self.num_kv_heads, self.model_config.head_dim, self.dtype)

    def device_type(self) -> str:
        return self.device

    def available_kv_memory(self) -> int:
        """The most constrained device's free bytes. GPUs are per shard; on CPU the shards sharing a node share its
        memory, so a node's free memory is split between them."""
        self._check_usable()
        free = self._gather([w.available_kv_memory.remote() for w in self.workers], self.health_timeout_s * 6,
                            "reading free memory")
        if self.device == "cuda":
            return min(free)
        per_node = Counter(info["node_id"] for info in self.node_infos)
        return min(f // per_node[info["node_id"]] for f, info in zip(free, self.node_infos, strict=True))

    def initialize_cache(self, layout: KVCacheLayout, num_blocks: int) -> None:
        self._check_usable()
        self.kv_bytes = self._gather([w.initialize_cache.remote(layout, num_blocks) for w in self.workers],
                                     self.step_timeout_s, f"allocating {num_blocks} KV blocks")

    def execute(self, plan: StepPlan, bitmask: BitmaskSource = None) -> SampledTokens:
        """Every rank runs the step (one round of calls, the plan pickled once); rank 0 samples and its
        SampledTokens come back."""
        return decode(self._gather(self._send(plan, bitmask), self.step_timeout_s, "running a step")[0])

    def submit(self, plan: StepPlan, bitmask: BitmaskSource = None) -> Future:
        """Send the step to every rank now, before the steps sent earlier are done, and return a Future of its
        SampledTokens. Each shard runs its caller's calls in order, so the step queues behind the previous one
        there and its placeholder rows take the tokens the shards sampled last (`LocalExecutor.run_step`): the
        previous step's way back and this step's way out overlap the shards' compute. A constrained step's bitmask
        is awaited here, before it goes. One waiter thread collects the results in order; a step that fails kills
        the shards (ShardFailure, as `execute`), so every step sent behind it fails too, with the same diagnosis."""
        refs = self._send(plan, bitmask)
        if self._waiter is None:
            self._waiter = ThreadPoolExecutor(1, thread_name_prefix="gptoss-ray-steps")
        return self._waiter.submit(self._collect, refs)

    def _send(self, plan: StepPlan, bitmask: BitmaskSource) -> list[Any]:
        """One round of `execute` calls (the plan pickled once; the bitmask to rank 0 only); their refs."""
        workers = self.workers  # (a failure on the waiter thread empties the list after it sets `failure`)
        self._check_usable()
        if isinstance(bitmask, Future):
            bitmask = bitmask.result()
        payload = encode_plan(plan)
        mask = None if bitmask is None else encode(bitmask)
        return [workers[0].execute.remote(payload, mask)] + [w.execute.remote(payload) for w in workers[1:]]

    def _collect(self, refs: list[Any]) -> SampledTokens:
        """On the waiter thread: a submitted step's SampledTokens (rank 0's)."""
        if self.failure is not None:  # a step before it failed and took the shards with it
            raise ShardFailure(f"this replica's shards are gone: {self.failure}")
        if self._closed:
            raise RuntimeError("the executor was shut down")
        return decode(self._gather(refs, self.step_timeout_s, "running a step")[0])

    def forward_logits(self, plan: StepPlan) -> torch.Tensor:
        """Every rank runs the step's forward; rank 0's float32 logits rows come back (verification)."""
        self._check_usable()
        payload = encode_plan(plan)
        logits = self._gather([w.forward_logits.remote(payload) for w in self.workers], self.step_timeout_s,
                              "running a forward")[0]
        # Large results arrive as read-only views of Ray's object store.
        return torch.from_numpy(logits if logits.flags.writeable else logits.copy())

    def expert_counts(self) -> torch.Tensor | None:
        if not self._counting or self.failure is not None or self._closed:
            return None
        return self._gather([self.workers[0].expert_counts.remote()], self.health_timeout_s * 6,
                            "reading expert counts")[0]

    # ------------------------------------------------------------------------------------------------ LoRA
    def add_lora(self, slot: int, source: LoraSource) -> None:
        """Every shard loads its slices of the adapter into `slot` (queued behind the steps sent before). A bad
        adapter raises LoraError with the shard's message and leaves the slot empty on every shard; the shards
        stay up (only a shard that dies or overruns is a ShardFailure)."""
        self._check_usable()
        errors = self._gather([w.add_lora.remote(slot, source) for w in self.workers], self.step_timeout_s,
                              f"loading LoRA adapter {source.name!r}")
        failed = [(rank, error) for rank, error in enumerate(errors) if error is not None]
        if failed:
            self.remove_lora(slot)  # no shard keeps a half-loaded adapter
            rank, error = failed[0]
            raise LoraError(error if self.num_shards == 1 else f"{error} (shard {rank} of {self.num_shards})")

    def remove_lora(self, slot: int) -> None:
        self._check_usable()
        self._gather([w.remove_lora.remote(slot) for w in self.workers], self.step_timeout_s,
                     f"unloading LoRA slot {slot}")

    def lora_bytes(self) -> int:
        """The most loaded shard's resident adapter bytes."""
        if self.failure is not None or self._closed:
            return 0
        return max(self._gather([w.lora_bytes.remote() for w in self.workers], self.health_timeout_s * 6,
                                "reading LoRA bytes"))

    # ------------------------------------------------------------------------------------------------ health
    def check_health(self) -> None:
        """Raise ShardFailure when any shard is dead or does not answer within `health_timeout_s` (the ping runs
        in its own thread of the actor, so a long step does not delay it)."""
        self._check_usable()
        self._gather([w.ping.options(concurrency_group="health").remote() for w in self.workers],
                     self.health_timeout_s, "answering a health check")

    def memory_reports(self) -> list[dict[str, Any]]:
        """Per rank: experts held (bytes), weights, KV pools, RSS (see ShardWorker.memory_report)."""
        self._check_usable()
        return self._gather([w.memory_report.options(concurrency_group="health").remote() for w in self.workers],
                            self.health_timeout_s * 6, "reporting memory")

    def time_collectives(self, rows: int, iters: int = 50) -> dict[str, float]:
        """Seconds per all_reduce ([rows, hidden]) and per logits gather ([rows, vocab/G] to rank 0), the slowest
        rank's figure (benchmarks)."""
        self._check_usable()
        times = self._gather([w.time_collectives.remote(rows, iters) for w in self.workers], self.step_timeout_s,
                             "timing collectives")
        return {k: max(t[k] for t in times) for k in times[0]}

    @property
    def node_ids(self) -> list[str | None]:
        return [info["node_id"] for info in self.node_infos]

    # ------------------------------------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Kill every shard actor, remove the placement group this executor created, and disconnect from Ray when
        this executor connected (it found no Ray: the offline LLM's case). Idempotent."""
        import ray

        self._closed = True
        self._teardown()
        if self._waiter is not None:
            self._waiter.shutdown(wait=False)
        if self.owns_ray and ray.is_initialized():
            self.owns_ray = False
            ray.shutdown()

    def _teardown(self) -> None:
        import ray

        workers, self.workers = self.workers, []
        if workers and ray.is_initialized():
            for w in workers:
                with contextlib.suppress(Exception):
                    ray.kill(w, no_restart=True)
            _wait_dead(workers, timeout_s=10.0)
        pg, self.placement_group = self.placement_group, None
        if pg is not None and self.owns_placement_group and ray.is_initialized():
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(pg)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self.workers or (self.owns_placement_group and self.placement_group is not None):
                self._teardown()


def _wait_dead(workers: list[Any], timeout_s: float) -> None:
    """Until every killed actor is reported dead (so Ray's state shows no live shard once shutdown returns)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    pending = list(workers)
    while pending and time.monotonic() < deadline:
        still = []
        for w in pending:
            try:
                ray.get(w.ping.options(concurrency_group="health").remote(), timeout=0.5)
                still.append(w)
            except RayActorError:
                pass
            except GetTimeoutError:
                still.append(w)
            except Exception:  # noqa: BLE001 - any other error: it is not serving
                pass
        pending = still
        if pending:
            time.sleep(0.05)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    # RayTaskError text starts with "ray::ShardWorker.execute() (pid=..., ...)"; its cause is in the last lines.
    cause = getattr(err, "cause", None)
    if cause is not None and not isinstance(cause, type(err)):
        text = f"{type(cause).__name__}: {cause}".strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


# ---------------------------------------------------------------------------------------------------- factory
def make_executor(model_path: str | os.PathLike[str], num_shards: int = 1, dtype: str | torch.dtype = torch.bfloat16,
                  device: str = "cpu", placement_group: Any = None, placement_strategy: str = "PACK",
                  **kwargs: Any) -> Executor:
    """LocalExecutor (the model in this process) for one shard, RayExecutor for more.

    Both carry `.model_config` (the checkpoint's ModelConfig, for `Engine(executor, executor.model_config, ...)`).
    kwargs: `count_expert_tokens`, `kernels` (a GPTOSS_KERNELS name), `max_loras`, `max_lora_rank` for both; the
    RayExecutor keywords
    (`bundle_offset`, `cpus_per_shard`, timeouts, ...) for G > 1, ignored for G = 1.
    """
    if num_shards == 1:
        from gptoss_cluster.kernels.dispatch import select_kernels
        from gptoss_cluster.workers.checkpoint import open_checkpoint
        from gptoss_cluster.workers.model import GptOssModel

        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        dtype = as_dtype(dtype)
        with open_checkpoint(model_path) as reader:
            model = GptOssModel.from_checkpoint(reader, dtype=dtype, kernels=select_kernels(device,
                                                                                            kwargs.get("kernels")),
                                                device=device, progress=kwargs.get("progress", False))
        executor = LocalExecutor(model, kwargs.get("count_expert_tokens", True), max_loras=kwargs.get("max_loras", 4),
                                 max_lora_rank=kwargs.get("max_lora_rank", 16))
        executor.model_config = model.config
        return executor
    kwargs.pop("progress", None)
    return RayExecutor(model_path, num_shards, dtype, device, placement_group, placement_strategy, **kwargs)
