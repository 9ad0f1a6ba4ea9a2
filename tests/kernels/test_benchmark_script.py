"""benchmarks/kernels.py runs end to end (`--smoke`: tiny shapes through the interpreter), so that a GPU session spends
its time on figures, not on the script's bugs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


@pytest.mark.interpreter_only
def test_kernel_benchmark_smoke_run_writes_every_row(run_kernels, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("kernel_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kernel_benchmark", bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    moe = [(r["model"], r["tokens"]) for r in rows["moe"]]
    assert moe == [("20b", 1), ("20b", 3), ("120b", 1), ("120b", 3)]
    assert [r["context"] for r in rows["attention"]] == [40, 100]
    for row in rows["moe"] + rows["attention"]:  # the reference ran and agreed (asserted inside), bytes were counted
        assert row["MB"] > 0 and row["GBps"] > 0 and row["triton_us"] > 0 and row["speedup"] > 0
    assert all(1 <= r["experts_used"] <= 8 for r in rows["moe"])
