"""torch.distributed for one replica's shards: the `Collective` the model calls, and process-group setup/teardown.

Rank r of G runs `init_process_group(r, G, master_addr, master_port)` (the RayExecutor finds the address and a free
port on rank 0's node and calls it on every rank at once), then builds its `GptOssModel` shard with the returned
`TorchDistributedCollective`. NCCL when CUDA is present, gloo otherwise. Every collective carries a timeout
(`timeout_s`), so a dead or stuck peer makes the survivors' collectives fail within seconds instead of hanging: gloo
raises (at once when the peer's connection closes, after `timeout_s` when it merely stops answering); NCCL's watchdog
aborts the communicator after `timeout_s` (async error handling).

No Ray in here: the module is the torch side only.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0


def default_backend(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (bound then released: the caller should use it at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def interface_of(ip: str) -> str | None:
    """The network interface holding IPv4 address `ip` (Linux), or None."""
    try:
        wanted = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if wanted.version != 4:
        return None
    for _, name in socket.if_nameindex():
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # SIOCGIFADDR: the interface's IPv4 address, bytes 20..24 of the ifreq answer.
            answer = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            if socket.inet_ntoa(answer[20:24]) == str(wanted):
                return name
    return None


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, backend: str | None = None,
                       timeout_s: float = DEFAULT_TIMEOUT_S, device: torch.device | str = "cpu",
                       local_ip: str | None = None) -> TorchDistributedCollective:
    """Join the default process group of one replica's G shards; returns the collective over it.

    `local_ip`: this rank's node address; gloo / NCCL sockets are bound to its interface (unless
    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set), so a replica on loopback stays on loopback.
    """
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed process group")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    backend = backend or default_backend(device)
    if local_ip:
        iface = interface_of(local_ip)
        if iface is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    kwargs = {}
    if backend == "nccl":
        # A peer that never arrives fails the collective (and this rank) after timeout_s instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    host = f"[{master_addr}]" if ":" in master_addr else master_addr
    dist.init_process_group(backend, init_method=f"tcp://{host}:{master_port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return TorchDistributedCollective()


def destroy_process_group() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a group whose peers died may fail to tear down cleanly
            dist.destroy_process_group()


class TorchDistributedCollective:
    """`workers.model.Collective` over a torch.distributed group: all_reduce (SUM) and all_gather along a dim.

    `gather_dst`: when set, `all_gather` materializes the full tensor on that rank only (a `gather`, not an
    all-gather: the vocab-parallel logits are needed where they are sampled, nowhere else); the other ranks get an
    uninitialized tensor of the full shape.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, gather_dst: int | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.gather_dst = gather_dst

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place when `tensor` is contiguous); returns the sum."""
        if self.world_size == 1:
            return tensor
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, in rank order."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        if self.gather_dst is None:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor, group=self.group)
            return torch.cat(parts, dim=dim)
        if self.rank == self.gather_dst:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.gather(tensor, parts, dst=self.gather_dst, group=self.group)
            return torch.cat(parts, dim=dim)
        dist.gather(tensor, None, dst=self.gather_dst, group=self.group)
        shape = list(tensor.shape)
        shape[dim] *= self.world_size
        return tensor.new_empty(shape)
