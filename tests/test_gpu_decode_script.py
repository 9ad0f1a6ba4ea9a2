"""benchmarks/gpu_decode.py and benchmarks/gpu_session.sh run end to end on CPU (`--smoke`: the tiny preset), so that
the first GPU session spends its minutes on figures, not on the scripts' bugs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_decode.py"


def check_rows(figures: dict) -> None:
    rows = figures["rows"]
    assert [r["batch"] for r in rows] == [1, 64]
    for row in rows:
        assert row["tok_s"] > 0 and row["tok_s_uncounted"] > 0 and row["step_ms"] > 0 and row["decode_steps"] > 0
        assert row["weight_bytes_per_step"] > 0 and row["kv_bytes_per_step"] > 0
        assert row["roofline_tok_s"] is None and row["roofline_share"] is None  # no bandwidth figure for a CPU
    # one token reads 4 experts per layer (top-4); 64 tokens read more of the tiny model's 8, so more weight bytes
    assert rows[0]["experts_per_layer"] == 4
    assert 4 < rows[1]["experts_per_layer"] <= 8
    assert rows[1]["weight_bytes_per_step"] > rows[0]["weight_bytes_per_step"]
    assert figures["device"] == "CPU" and figures["preset"] == "tiny"


def test_gpu_decode_smoke_run_writes_both_batches(checkpoints, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_decode", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_decode", bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "decode.json"
    assert bench.main(["--smoke", "--checkpoint", str(checkpoints["tiny-hf"]), "--json", str(out)]) == 0
    check_rows(json.loads(out.read_text()))
    table = capsys.readouterr().out
    assert "| 1 |" in table and "| 64 |" in table and "n/a" in table


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="kernels.py --smoke needs triton")
def test_gpu_session_smoke_mode_runs_every_stage(tmp_path):
    """The device call's script, as CI can run it: writes the checkpoint in the background, runs the kernel benchmark
    and the decode benchmark, and leaves their figures in $OUT."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PY": sys.executable,
           "GPTOSS_DECODE_CHECKPOINT": str(tmp_path / "tiny-hf")}  # absent: the background writer makes it
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "writing the tiny checkpoint" in (out / "checkpoint.log").read_text()
    check_rows(json.loads((out / "decode.json").read_text()))
    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["moe"] and kernels["attention"]
