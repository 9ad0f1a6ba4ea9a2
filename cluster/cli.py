"""The `gptoss-cluster` command line.

Each subcommand is one `_register_*` function that adds its parser to the subparsers and sets `func` (a function of
the parsed namespace returning an exit code); add new commands to `COMMANDS`. Bad arguments and domain errors (bad
config, bad checkpoint, refused output directory) exit with code 2 and one line `gptoss-cluster: error: ...` on
stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gptoss_cluster.cluster.contract import REPLICA_TRANSPORTS, lora_name_problem
from gptoss_cluster.cluster.router.policies import ROUTING_POLICIES

PROG = "gptoss-cluster"


class UsageError(Exception):
    """A bad argument found after parsing: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage block.
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _byte_size(text: str) -> int:
    """'4G', '512M', '1048576', '1.5GiB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4G, 512M, 1048576)")
    value = float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(value)


# =================================================================================================== make-checkpoint
def _register_make_checkpoint(sub: Any) -> None:
    from gptoss_cluster.workers.config import PRESETS

    p = sub.add_parser(
        "make-checkpoint",
        help="write a checkpoint of deterministic random weights",
        description="Write a gpt-oss checkpoint with deterministic random weights (same seed, same bytes).",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default: tiny)")
    p.add_argument("--layout", choices=["hf", "original"], default="hf",
                   help="Hugging Face or original OpenAI tensor layout (default: hf)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output directory (created atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--max-shard-size", type=_byte_size, default=None,
                   help="largest safetensors file, e.g. 4G (default: one file below 2 GiB, else 4 GiB shards)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_make_checkpoint)


def _cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from gptoss_cluster.workers.checkpoint import write_checkpoint
    from gptoss_cluster.workers.config import ModelConfig

    config = ModelConfig.preset(args.preset)
    start = time.perf_counter()
    try:
        out = write_checkpoint(
            config, args.out, layout=args.layout, seed=args.seed, max_shard_bytes=args.max_shard_size,
            progress=not args.no_progress, overwrite=args.force,
        )
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(
        f"wrote {out} ({args.preset}, {args.layout} layout, seed {args.seed}): {len(files)} file(s), "
        f"{size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s"
    )
    return 0


# =================================================================================================== serve
def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535], got {value}")
    return value


def _int_at_least(minimum: int) -> Any:
    """An argparse type: an integer >= minimum (a clear message otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _lora_module(text: str) -> tuple[str, str]:
    """One --lora-modules item -> (name, path): `name=path`, or vLLM's JSON form `{"name": ..., "path": ...}`
    (its `base_model_name` is accepted and not needed: an adapter's parent is always the served model)."""
    if text.lstrip().startswith("{"):
        import json

        try:
            item = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({exc})") from None
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or \
                not isinstance(item.get("path"), str):
            raise argparse.ArgumentTypeError(f"expected {{\"name\": ..., \"path\": ...}}, got {text!r}")
        unknown = sorted(set(item) - {"name", "path", "base_model_name"})
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown key(s) {unknown} in {text!r}; known: name, path, "
                                             "base_model_name")
        name, path = item["name"], item["path"]
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected NAME=PATH or a JSON object, got {text!r}")
    problem = lora_name_problem(name)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r}: the path is empty")
    return name, path


def _register_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the serving cluster (local Ray on loopback, or $RAY_ADDRESS)",
        description="Start a Ray node on 127.0.0.1 (or join $RAY_ADDRESS), deploy the Router and ModelReplica "
                    "deployments through the Ray dashboard's Serve REST API, and serve gptoss.v1 over gRPC (and the "
                    "OpenAI-compatible HTTP API) until Ctrl-C / SIGTERM. Without --model: the embedded tiny "
                    "checkpoint (written once to $GPTOSS_CACHE_DIR/models/tiny, default "
                    "~/.cache/gptoss-cluster/models/tiny).",
    )
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--served-model-name", default=None, help="name reported by GetModelInfo (default: folder name)")
    p.add_argument("--replicas", type=_positive_int, default=1, help="ModelReplica replicas (default 1)")
    p.add_argument("--shards-per-replica", type=int, choices=[1, 2, 4, 8], default=1,
                   help="devices (ShardWorkers) per replica (default 1)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when Ray sees GPUs")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="default: bfloat16 (float32 for the embedded tiny model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the gRPC and HTTP servers bind (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=_port, default=50051, help="gRPC port (default 50051)")
    p.add_argument("--http-port", type=_port, default=8000,
                   help="OpenAI-compatible HTTP port (/v1/chat/completions, /v1/responses, ...), 0: off (default 8000)")
    p.add_argument("--metrics-port", type=_port, default=9400, help="Prometheus metrics port, 0: none (default 9400)")
    p.add_argument("--dashboard-port", type=_port, default=8265, help="Ray dashboard port (default 8265)")
    p.add_argument("--max-queued-requests", type=int, default=1024, help="router admission queue (default 1024)")
    p.add_argument("--stream-interval", type=_positive_int, default=1,
                   help="tokens per streamed delta after the first: larger sends fewer messages (default 1)")
    p.add_argument("--replica-transport", choices=REPLICA_TRANSPORTS, default="grpc",
                   help="how the routers' calls reach the replicas: Serve's gRPC transport or Ray actor tasks "
                        "(default grpc)")
    p.add_argument("--routing-policy", choices=ROUTING_POLICIES, default="prefix_affinity",
                   help="which replica serves a request: prefix_affinity (the replica whose prefix cache holds the "
                        "prompt's start, within a load bound), power_of_two or round_robin (default prefix_affinity)")
    p.add_argument("--max-ongoing-requests", type=_positive_int, default=256,
                   help="requests in flight per replica (default 256)")
    p.add_argument("--num-blocks", type=_positive_int, default=None, help="KV-cache blocks per replica")
    p.add_argument("--max-model-len", type=_positive_int, default=None, help="context length (default: model's)")
    p.add_argument("--lora-modules", type=_lora_module, nargs="+", action="extend", default=None,
                   metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) to serve; a request selects one by name (the OpenAI "
                        "`model`). Also vLLM's JSON form '{\"name\": ..., \"path\": ...}'")
    p.add_argument("--max-loras", type=_positive_int, default=4,
                   help="LoRA adapters resident at once on each shard (default 4)")
    p.add_argument("--max-lora-rank", type=_positive_int, default=16,
                   help="the largest LoRA rank accepted (default 16)")
    p.add_argument("--auth-token-file", type=Path, default=None,
                   help="require this bearer token (default: $GPTOSS_AUTH_TOKEN when set)")
    p.add_argument("--app-name", default="gptoss", help="Serve application name (default gptoss)")
    p.add_argument("--print-config", action="store_true", help="print the Serve config (YAML) and exit")
    p.set_defaults(func=_cmd_serve)


def _serve_config(args: argparse.Namespace) -> Any:
    from gptoss_cluster.cluster.app import AppConfig, AppConfigError, ensure_tiny_checkpoint, validate

    model = args.model
    if model is None:
        model = ensure_tiny_checkpoint()
    elif not model.is_dir():
        raise UsageError(f"--model {model}: not a directory")
    engine: dict[str, Any] = {}
    if args.num_blocks:
        engine["num_blocks"] = args.num_blocks
    if args.max_model_len:
        engine["max_model_len"] = args.max_model_len
    lora_modules: dict[str, str] = {}
    for name, path in args.lora_modules or ():
        if name in lora_modules:
            raise UsageError(f"--lora-modules: the adapter name {name!r} is given twice")
        if not Path(path).is_dir():
            raise UsageError(f"--lora-modules {name}={path}: not a directory")
        lora_modules[name] = str(Path(path).absolute())
    config = AppConfig(
        model=str(Path(model).absolute()), served_model_name=args.served_model_name or
        ("gptoss-tiny" if args.model is None else None), shards_per_replica=args.shards_per_replica,
        device=args.device, dtype=args.dtype or ("float32" if args.model is None else "bfloat16"),
        num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests, stream_interval=args.stream_interval,
        replica_transport=args.replica_transport, routing_policy=args.routing_policy, grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        engine=engine, grpc_host=args.host, metrics_host=args.host, lora_modules=lora_modules,
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        auth_token_file=str(args.auth_token_file.absolute()) if args.auth_token_file else None,
    )
    try:
        return validate(config)
    except AppConfigError as exc:
        raise UsageError(str(exc)) from None


def _cmd_serve(args: argparse.Namespace) -> int:
    import os
    import signal
    import tempfile
    import threading

    from gptoss_cluster.cluster.app import LocalCluster, app_config, serve_config, to_yaml

    if args.auth_token_file is not None and not args.auth_token_file.is_file():
        raise UsageError(f"--auth-token-file {args.auth_token_file}: no such file")
    config = _serve_config(args)
    if args.print_config:
        print(to_yaml(serve_config([app_config(config, app_name=args.app_name)])), end="")
        return 0
    env = {"GPTOSS_NO_PROGRESS": "1"}
    if config.metrics_port:
        # One scrape for the node: every process writes to this folder; the first to bind the port serves it.
        env["PROMETHEUS_MULTIPROC_DIR"] = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
            prefix="gptoss-metrics-")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster = LocalCluster(config, app_name=args.app_name, dashboard_port=args.dashboard_port, env_vars=env)
    log = lambda message: print(f"{PROG}: {message}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        cluster.start(log=log)
        if not stop.is_set():
            host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            print(f"serving {config.name} ({config.replicas} replica(s) x {config.shards_per_replica} shard(s), "
                  f"{config.device}, {config.dtype})\n"
                  f"  gRPC       {host}:{config.grpc_port}    try: {PROG} chat --address {host}:{config.grpc_port} "
                  f"\"Hello\"\n"
                  + (f"  HTTP       http://{host}:{config.http_port}/v1    (OpenAI-compatible: chat/completions, "
                     f"responses, completions, models)\n" if config.http_port else "")
                  + (f"  metrics    http://{host}:{config.metrics_port}/metrics\n" if config.metrics_port else "")
                  + f"  dashboard  {cluster.dashboard}    scale: {PROG} scale --replicas N --dashboard "
                    f"{cluster.dashboard}\n"
                  f"  ray        {cluster.gcs_address}    (RAY_ADDRESS for tools that join the cluster)\n"
                  f"Ctrl-C to stop.", flush=True)
        while not stop.wait(0.5):
            pass
        log("stopping: draining the routers, then shutting down")
        return 0
    except (TimeoutError, RuntimeError) as exc:
        _error(str(exc))
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cluster.close()


# =================================================================================================== gRPC clients
def _add_client_args(p: Any) -> None:
    p.add_argument("--address", type=_address, default=None, help="router address HOST:PORT (gRPC)")
    p.add_argument("--tls", action="store_true", help="use TLS (system roots, or --ca-cert)")
    p.add_argument("--ca-cert", type=Path, default=None, help="PEM root certificate(s) for TLS")
    p.add_argument("--timeout", type=float, default=None, help="request deadline in seconds")


def _add_sampling_args(p: Any, max_tokens_default: int | None) -> None:
    p.add_argument("--max-tokens", type=_positive_int, default=max_tokens_default, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: server's, 1.0)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    out = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
           "seed": args.seed, "stop": args.stop or None, "ignore_eos": args.ignore_eos or None}
    return {k: v for k, v in out.items() if v is not None}


def _client(args: argparse.Namespace) -> Any:
    from gptoss_cluster.cluster.client import Client

    roots = args.ca_cert.read_bytes() if args.ca_cert else None
    return Client(args.address, tls=args.tls, root_certificates=roots, timeout=args.timeout)


def _rpc_error(exc: Any) -> int:
    code = exc.code().name if hasattr(exc, "code") else "ERROR"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    _error(f"{code}: {details}")
    return 1


def _register_chat(sub: Any) -> None:
    p = sub.add_parser("chat", help="ask a running cluster (gRPC), streaming the answer",
                       description="Send one chat message to a router and stream the answer. The model's reasoning "
                                   "(analysis channel) is hidden unless --show-reasoning (dimmed on a terminal).")
    p.add_argument("message", help="the user message")
    _add_client_args(p)
    p.add_argument("--system", default=None, help="system / developer instructions")
    p.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default=None)
    p.add_argument("--show-reasoning", action="store_true", help="print the analysis channel too")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                       help="the answer is JSON following this JSON Schema file")
    shape.add_argument("--regex", default=None, help="the answer fully matches this regular expression")
    p.add_argument("--max-reasoning-tokens", type=_non_negative_int, default=None, metavar="N",
                   help="bound the analysis channel to N tokens (0: no reasoning at all)")
    p.add_argument("--adapter", default=None, metavar="NAME", help="a LoRA adapter the cluster serves (`lora list`)")
    _add_sampling_args(p, None)
    p.set_defaults(func=_cmd_chat)


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.regex is not None:
        if not args.regex:
            raise UsageError("--regex is empty")
        return {"type": "regex", "regex": args.regex}
    if args.json_schema is None:
        return None
    import json

    try:
        schema = json.loads(args.json_schema.read_text())
    except OSError as exc:
        raise UsageError(f"--json-schema {args.json_schema}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"--json-schema {args.json_schema}: not valid JSON: {exc}") from None
    return {"type": "json_schema", "json_schema": {"name": args.json_schema.stem, "schema": schema, "strict": True}}


def _cmd_chat(args: argparse.Namespace) -> int:
    import grpc

    from gptoss_cluster.cluster.client import CHANNEL_NAMES, FINISH_NAMES

    if args.address is None:
        raise UsageError("chat needs --address HOST:PORT (a running router, e.g. from `gptoss-cluster serve`)")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.message}]
    structured = {"response_format": _response_format(args), "max_reasoning_tokens": args.max_reasoning_tokens}
    tty = sys.stdout.isatty()
    dim, reset = ("\x1b[2m", "\x1b[0m") if tty else ("", "")
    out = sys.stdout
    last = None
    try:
        with _client(args) as client:
            for delta in client.chat(messages, reasoning_effort=args.reasoning_effort, adapter=args.adapter,
                                     **structured, **_sampling(args)):
                channel = CHANNEL_NAMES.get(delta.channel, "")
                if delta.HasField("tool_call"):
                    call = delta.tool_call
                    if call.name:
                        out.write(f"\n[tool call {call.name}] ")
                    out.write(call.arguments_delta)
                elif delta.text:
                    if channel == "analysis":
                        if args.show_reasoning:
                            out.write(f"{dim}{delta.text}{reset}")
                    else:
                        out.write(delta.text)
                out.flush()
                last = delta
    except grpc.RpcError as exc:
        print(file=out)
        return _rpc_error(exc)
    print(file=out)
    if last is not None:
        u = last.usage
        print(f"[{FINISH_NAMES.get(last.finish_reason, '?')}: {u.prompt_tokens} prompt + {u.completion_tokens} "
              f"completion tokens ({u.reasoning_tokens} reasoning)]", file=sys.stderr)
    return 0


def _register_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate offline (--model) or from a running cluster (--address)",
                       description="Complete a raw prompt: in this process from a checkpoint (--model DIR), or "
                                   "through a running router (--address HOST:PORT, gRPC Generate; --chat uses the "
                                   "harmony Chat call).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", type=Path, default=None, help="checkpoint directory (offline)")
    p.add_argument("--prompt", default=None, help="prompt text")
    p.add_argument("--token-ids", default=None, help="prompt as comma-separated token ids (instead of --prompt)")
    p.add_argument("--chat", action="store_true", help="treat --prompt as a user message (harmony chat)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="offline only")
    p.add_argument("--adapter", default=None, metavar="NAME",
                   help="--address: a LoRA adapter the cluster serves (`lora list`)")
    _add_client_args(p)
    _add_sampling_args(p, 16)
    p.set_defaults(func=_cmd_generate)


def _prompt_ids(args: argparse.Namespace) -> list[int] | None:
    if args.token_ids is None:
        return None
    try:
        return [int(t) for t in args.token_ids.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--token-ids must be comma-separated integers, got {args.token_ids!r}") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.address is None):
        raise UsageError("give --model DIR (offline) or --address HOST:PORT (a running router)")
    if (args.prompt is None) == (args.token_ids is None):
        raise UsageError("give --prompt TEXT or --token-ids IDS")
    if args.chat and args.prompt is None:
        raise UsageError("--chat needs --prompt")
    if args.model is not None:
        if args.adapter is not None:
            raise UsageError("--adapter needs --address (offline, use the Python LLM(lora_modules=...))")
        return _generate_offline(args)
    import grpc

    from gptoss_cluster.cluster.client import CHANNEL_NAMES, FINISH_NAMES

    last = None
    try:
        with _client(args) as client:
            if args.chat:
                stream = client.chat(args.prompt, adapter=args.adapter, **_sampling(args))
            else:
                ids = _prompt_ids(args)
                stream = client.generate(ids if ids is not None else args.prompt, adapter=args.adapter,
                                         **_sampling(args))
            for delta in stream:
                if args.chat and delta.text and CHANNEL_NAMES.get(delta.channel) == "analysis":
                    continue
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                last = delta
    except grpc.RpcError as exc:
        print()
        return _rpc_error(exc)
    print()
    if last is not None:
        print(f"[{FINISH_NAMES.get(last.finish_reason, '?')}: {last.usage.prompt_tokens} prompt + "
              f"{last.usage.completion_tokens} completion tokens]", file=sys.stderr)
    return 0


def _generate_offline(args: argparse.Namespace) -> int:
    from gptoss_cluster.workers.llm import LLM
    from gptoss_cluster.workers.sampling import SamplingParams

    if not args.model.is_dir():
        raise UsageError(f"--model {args.model}: not a directory")
    sampling = _sampling(args)
    sampling.pop("stop", None)
    try:
        params = SamplingParams(**sampling)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    llm = LLM(model=args.model, dtype=args.dtype, progress=False)
    ids = _prompt_ids(args)
    prompt: Any = [{"role": "user", "content": args.prompt}] if args.chat else (ids if ids is not None else
                                                                                 args.prompt)
    out = llm.generate([prompt], params)[0]
    if args.chat and out.messages:
        for message in out.messages:
            print(f"[{message.channel}] {message.text}")
    else:
        print(out.text)
    print(f"[{out.finish_reason}: {len(out.prompt_token_ids)} prompt + {len(out.token_ids)} completion tokens]",
          file=sys.stderr)
    return 0


def _register_scale(sub: Any) -> None:
    p = sub.add_parser("scale", help="change the ModelReplica replica count of a running cluster",
                       description="Set the number of ModelReplica replicas through the Ray dashboard's Serve REST "
                                   "API (PUT /api/serve/applications/), authenticated with Ray's token "
                                   "($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).")
    p.add_argument("--replicas", type=_positive_int, required=True, help="replicas wanted")
    p.add_argument("--dashboard", default="http://127.0.0.1:8265", help="Ray dashboard URL (default %(default)s)")
    p.add_argument("--app-name", default="gptoss", help="Serve application (default gptoss)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait until that many replicas run (default: return at once)")
    p.set_defaults(func=_cmd_scale)


def _cmd_scale(args: argparse.Namespace) -> int:
    from gptoss_cluster.cluster.app import DashboardError, scale

    try:
        entry = scale(args.replicas, address=args.dashboard, app_name=args.app_name, wait_s=args.wait)
    except DashboardError as exc:
        _error(str(exc))
        return 1
    except TimeoutError as exc:
        _error(str(exc))
        return 1
    print(f"{args.app_name}: ModelReplica num_replicas = {entry['num_replicas']}"
          + (" (running)" if args.wait else " (Serve is applying it)"))
    return 0


# =================================================================================================== lora
def _register_lora(sub: Any) -> None:
    p = sub.add_parser("lora", help="load, unload or list the LoRA adapters of a running cluster (gRPC Admin)",
                       description="Manage the LoRA adapters every ModelReplica serves, through a router's Admin "
                                   "service: each replica's result is printed. The bearer token comes from "
                                   "$GPTOSS_AUTH_TOKEN.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    load = actions.add_parser("load", help="register a PEFT adapter directory (as the replicas see it) on every "
                                           "replica")
    load.add_argument("name", help="what requests select it by (the OpenAI `model`)")
    load.add_argument("path", help="PEFT adapter directory: adapter_config.json + adapter_model.safetensors")
    unload = actions.add_parser("unload", help="forget an adapter on every replica")
    unload.add_argument("name")
    actions.add_parser("list", help="the adapters each replica serves")
    for action in actions.choices.values():
        _add_client_args(action)
    p.set_defaults(func=_cmd_lora)


def _cmd_lora(args: argparse.Namespace) -> int:
    import grpc

    if args.address is None:
        raise UsageError(f"lora {args.action} needs --address HOST:PORT of a running router")
    try:
        with _client(args) as client:
            if args.action == "list":
                listing = client.list_loras()
                for replica in listing.replicas:
                    names = ", ".join(f"{a.name} (rank {a.rank}, {a.path})" for a in replica.adapters)
                    print(f"{replica.replica_id}: {names or 'no adapters'}")
                return 0
            if args.action == "load":
                problem = lora_name_problem(args.name)
                if problem is not None:
                    raise UsageError(problem)
                response = client.load_lora(args.name, args.path)
            else:
                response = client.unload_lora(args.name)
    except grpc.RpcError as exc:
        return _rpc_error(exc)
    for result in response.replicas:
        print(f"{result.replica_id}: " + ("ok" if result.ok else f"{result.error_code}: {result.error}"))
    return 0 if all(r.ok for r in response.replicas) else 1


# =================================================================================================== bench
def _levels(text: str) -> list[int]:
    """'1,16,64' -> [1, 16, 64] (each >= 1)."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"every concurrency must be >= 1, got {text!r}")
    return levels


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _register_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="load a running cluster with streaming requests and print latency percentiles",
        description="Send streaming Generate requests to a router (random prompt token ids, exactly --output-len "
                    "tokens each, greedy, EOS ignored) at each concurrency level, closed loop, or as a Poisson "
                    "arrival process with --request-rate (at most the concurrency in flight), as `vllm bench serve` "
                    "does; print TTFT, inter-token and end-to-end latency percentiles and throughput per level. "
                    "The bearer token comes from $GPTOSS_AUTH_TOKEN.")
    _add_client_args(p)
    p.add_argument("--concurrency", type=_levels, default=[1, 16, 64], help="levels, e.g. 1,16,64 (the default)")
    p.add_argument("--request-rate", type=_non_negative_float, default=0.0,
                   help="requests per second, Poisson arrivals (default 0: closed loop)")
    p.add_argument("--num-requests", type=_positive_int, default=None,
                   help="requests per level (default: 4 x concurrency, at least 16)")
    p.add_argument("--input-len", type=_positive_int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--output-len", type=_positive_int, default=32, help="generated tokens (default 32)")
    p.add_argument("--seed", type=int, default=0, help="prompt and arrival seed (default 0)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure here")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from gptoss_cluster.cluster import bench

    if args.address is None:
        raise UsageError("bench needs --address HOST:PORT of a running router")
    roots = args.ca_cert.read_bytes() if args.ca_cert else None
    results: dict[str, Any] = {"address": args.address, "input_len": args.input_len, "output_len": args.output_len,
                               "request_rate": args.request_rate, "levels": {}}
    print(f"# {PROG} bench: {args.address}; prompts {args.input_len} tokens, outputs {args.output_len} tokens; "
          + (f"Poisson arrivals at {args.request_rate:g} requests/s" if args.request_rate else "closed loop"))
    print(bench.table_header("concurrency", cpu=False))
    for level in args.concurrency:
        n = args.num_requests or max(16, 4 * level)
        prompts = bench.workload(n, args.input_len, args.seed + level)
        pacing = bench.Pacing(rate=args.request_rate, seed=args.seed + level)
        try:
            records, wall_s = asyncio.run(bench.router_level(
                args.address, prompts, level, args.output_len, None, pacing, tls=args.tls, root_certificates=roots))
        except ConnectionError as exc:
            _error(str(exc))
            return 1
        summary = bench.summarize(records, wall_s)
        results["levels"][str(level)] = summary
        print(bench.format_row(str(level), summary, cpu=False), flush=True)
        if summary["errors"] == summary["requests"]:
            _error(f"every request failed at concurrency {level}: {summary.get('first_error')}")
            return 1
        if summary["errors"]:
            print(f"# {summary['errors']} of {summary['requests']} requests failed; the first: "
                  f"{summary['first_error']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


# =================================================================================================== main
COMMANDS: list[Callable[[Any], None]] = [_register_make_checkpoint, _register_generate, _register_serve,
                                          _register_chat, _register_scale, _register_bench, _register_lora]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Serve OpenAI's gpt-oss-20b / gpt-oss-120b.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad argument (2, message already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "func", None) is None:
        _error(f"choose a command (see '{PROG} --help')")
        return 2

    try:
        return int(args.func(args))
    except UsageError as exc:
        _error(str(exc))
        return 2
    except Exception as exc:
        if _is_domain_error(exc):
            _error(str(exc))
            return 2
        if isinstance(exc, OSError):
            _error(str(exc))
            return 1
        raise
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _is_domain_error(exc: BaseException) -> bool:
    """A bad config or checkpoint (exit code 2). Looked up lazily: the classes can only have been raised if their
    modules were imported, and importing workers.checkpoint costs torch's start-up (seconds) for commands such as
    `chat` that never touch a checkpoint."""
    for module, name in (("gptoss_cluster.workers.config", "ConfigError"),
                         ("gptoss_cluster.workers.checkpoint", "CheckpointError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
