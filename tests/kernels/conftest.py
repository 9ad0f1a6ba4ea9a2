"""Kernel tests: the Triton kernels against their torch references, on CPU through Triton's interpreter.

Interpreter or compiler is decided per launch (kernels/triton/_jit.py), so these tests share one pytest process with
the rest of the suite: tests that run kernels request the `interpreter` fixture (TRITON_INTERPRET=1 for that test
only); the Hopper compile test runs with it unset. Without triton installed the directory is skipped.
"""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9's notice


@pytest.fixture
def compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
