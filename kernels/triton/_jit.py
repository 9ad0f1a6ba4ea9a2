"""How the Triton kernels are declared and launched: one kernel object, compiled on CUDA or interpreted on CPU.

`triton.jit` fixes interpreter-or-compiler when the decorator runs (at import). Our kernels must do both in one
process: the kernel tests run them through the interpreter (TRITON_INTERPRET=1, CPU tensors) while the Hopper compile
test builds cubins from the very same objects. `jit` returns a `JITFunction` (so `triton.compile(ASTSource(fn=...))`
and calls from other kernels work as usual) that decides at launch: interpreted while TRITON_INTERPRET is set,
compiled otherwise. A device-function call only ever reaches Python under the interpreter.

`launch` is the single launch point of every host wrapper; `record_launches` captures launches instead of running
them, which is how the compile test and the ptxas report learn the exact kernels, argument types and block sizes the
wrappers pick for a given shape (wrappers never read device values on the host, so they run on meta tensors).
`offload_launches` runs every launch on a GPU over device copies of its CPU tensors, which is how the kernel tests,
written for CPU tensors and the interpreter, run unchanged against the compiled kernels on a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import triton
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


def _interpreted_of(fn: JITFunction) -> InterpretedFunction:
    interpreted = fn.__dict__.get("_gptoss_interpreted")
    if interpreted is None:
        interpreted = fn.__dict__["_gptoss_interpreted"] = InterpretedFunction(fn.fn)
    return interpreted


def _call_interpreted(self: JITFunction, *args, **kwargs):
    return _interpreted_of(self)(*args, **kwargs)


_patch_lock = threading.RLock()


def _language_namespaces() -> list[Any]:
    """The modules and classes of triton.language whose members the interpreter swaps for interpreted versions."""
    import triton.language as tl

    return [tl, tl.core, tl.math, tl.core.tensor, tl.core.tensor_descriptor_base]


@contextlib.contextmanager
def _triton_language_restored() -> Iterator[None]:
    """Puts triton.language back as it was once an interpreted launch ends. The interpreter patches the language for
    each launch and undoes that, but a device-function call patches the namespaces of the called function's module
    and never undoes it (triton 3.9 `InterpretedFunction.__call__`); triton.language's own jit helpers (tl.sum,
    tl.max, ...) live in modules that see `triton.language.core`, so one interpreted kernel left `core.add`,
    `core.cast`, ... as interpreter lambdas, and a later `triton.compile` in the same process failed inside them."""
    saved = [(namespace, dict(vars(namespace))) for namespace in _language_namespaces()]
    try:
        yield
    finally:
        for namespace, members in saved:
            for name in [name for name in vars(namespace) if name not in members]:
                delattr(namespace, name)
            for name, member in members.items():
                if vars(namespace).get(name, _ABSENT) is not member:
                    setattr(namespace, name, member)


_ABSENT = object()


@contextlib.contextmanager
def _jit_calls_interpreted() -> Iterator[None]:
    """While an interpreted kernel runs, calls to any @triton.jit function (ours, and triton.language's own jit
    helpers such as tl.sum or tl.cdiv, which were built as compiler JITFunctions because TRITON_INTERPRET was unset
    when triton was imported) run through the interpreter. Outside a kernel JITFunction.__call__ only raises, so
    nothing else changes meaning."""
    with _patch_lock, _triton_language_restored():
        original = JITFunction.__call__
        JITFunction.__call__ = _call_interpreted
        try:
            yield
        finally:
            JITFunction.__call__ = original


class DualJITFunction(JITFunction):
    """A JITFunction that runs through Triton's interpreter whenever TRITON_INTERPRET is set at launch time."""

    def run(self, *args, grid, warmup, **kwargs):
        if knobs.runtime.interpret:
            with _jit_calls_interpreted():
                return _interpreted_of(self).run(*args, grid=grid, warmup=warmup, **kwargs)
        return super().run(*args, grid=grid, warmup=warmup, **kwargs)

    def __call__(self, *args, **kwargs):  # a device-function call: only reached when the caller is interpreted
        return _interpreted_of(self)(*args, **kwargs)


def jit(fn):
    return DualJITFunction(fn)


def interpreting() -> bool:
    return bool(knobs.runtime.interpret)


def runs_on_cpu_tensors() -> bool:
    """Whether the kernels take CPU tensors now: interpreted, or offloaded to a GPU (`offload_launches`)."""
    return interpreting() or getattr(_offload, "device", None) is not None


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or the interpreter (which runs on CPU tensors)."""
    if runs_on_cpu_tensors():
        return
    for t in tensors:
        if t.device.type not in ("cuda", "meta"):
            raise RuntimeError(
                f"Triton kernels run on CUDA tensors (got a {t.device.type} tensor); set TRITON_INTERPRET=1 to run "
                "them on CPU through the Triton interpreter, or use GPTOSS_KERNELS=torch"
            )


def dot_fp32(*tensors: torch.Tensor) -> bool:
    """Whether tl.dot gets float32 operands: always in the interpreter (its bf16 dot is broken), and for fp32 data."""
    return interpreting() or any(t.dtype == torch.float32 for t in tensors)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM: the shape the block-size heuristics are tuned for


# ---------------------------------------------------------------------------------------------------- launching
@dataclass
class Launch:
    """One kernel launch as a wrapper chose it: kernel, grid, arguments (positional, then constexpr keywords)."""

    kernel: JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    name: str = field(default="")


_recording = threading.local()
_offload = threading.local()


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within this block, `launch` appends to the yielded list instead of running anything."""
    launches: list[Launch] = []
    previous = getattr(_recording, "launches", None)
    _recording.launches = launches
    try:
        yield launches
    finally:
        _recording.launches = previous


@contextlib.contextmanager
def offload_launches(device: str | torch.device = "cuda") -> Iterator[None]:
    """Within this block `launch` runs each kernel on `device` over device copies of its CPU tensor arguments (whole
    storages, so views, strides and aliasing stay as they are) and copies those storages back after it; wrappers
    accept CPU tensors. The kernel tests use it to run against the compiled kernels on a GPU
    (GPTOSS_KERNEL_TEST_DEVICE=cuda); the interpreter honours it too, which is how it is tested on CPU."""
    previous = getattr(_offload, "device", None)
    _offload.device = torch.device(device)
    try:
        yield
    finally:
        _offload.device = previous


def _on_device(args: tuple[Any, ...], device: torch.device) -> tuple[tuple[Any, ...], list[tuple[Any, Any]]]:
    """`args` with every CPU tensor re-viewed onto a device copy of its storage (one copy per storage), and the
    (host, device) storage pairs to copy back."""
    copies: dict[int, tuple[Any, Any]] = {}
    moved = []
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.device.type == "cpu":
            host = arg.untyped_storage()
            pair = copies.get(host.data_ptr())
            if pair is None:
                pair = copies[host.data_ptr()] = (host, torch.UntypedStorage(host.nbytes(), device=device).copy_(host))
            arg = torch.empty(0, dtype=arg.dtype, device=device).set_(pair[1], arg.storage_offset(), arg.size(),
                                                                      arg.stride())
        moved.append(arg)
    return tuple(moved), list(copies.values())


def launch(kernel: JITFunction, grid: tuple[int, ...], *args: Any, num_warps: int = 4, num_stages: int = 2,
           **constexprs: Any) -> None:
    launches = getattr(_recording, "launches", None)
    if launches is not None:
        launches.append(Launch(kernel, grid, args, constexprs, num_warps, num_stages, kernel.fn.__name__))
        return
    if min(grid) <= 0:
        return
    device = getattr(_offload, "device", None)
    if device is None:
        kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        return
    args, storages = _on_device(args, device)
    kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
    for host, on_device in storages:
        host.copy_(on_device)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
