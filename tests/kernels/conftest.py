"""Kernel tests: the Triton kernels against their torch references.

Here they run on CPU through Triton's interpreter; on a GPU machine `GPTOSS_KERNEL_TEST_DEVICE=cuda pytest
tests/kernels` runs the same tests against the kernels compiled for that GPU (`offload_launches`: every launch gets
device copies of its CPU tensors and copies them back). Interpreter or compiler is decided per launch
(kernels/triton/_jit.py), so these tests share one pytest process with the rest of the suite: tests that run kernels
request the `run_kernels` fixture (TRITON_INTERPRET=1, or the offload, for that test only); the Hopper compile test
runs with the interpreter off. Without triton installed the directory is skipped.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]

KERNEL_TEST_DEVICE = os.environ.get("GPTOSS_KERNEL_TEST_DEVICE", "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if KERNEL_TEST_DEVICE == "cpu":
        return
    skip = pytest.mark.skip(reason=f"checks the CPU interpreter path (GPTOSS_KERNEL_TEST_DEVICE={KERNEL_TEST_DEVICE})")
    for item in items:
        if "interpreter_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def run_kernels(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9's notice
    if KERNEL_TEST_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        yield
        return
    from gptoss_cluster.kernels.triton import offload_launches

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with offload_launches(KERNEL_TEST_DEVICE):
        yield


@pytest.fixture
def compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
