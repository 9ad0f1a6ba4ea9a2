"""One import name: the wheel and the editable install put cluster/, workers/, kernels/ and proto/ under
`gptoss_cluster`, and neither shadows another distribution's top-level package (Hugging Face's `kernels`, which
transformers 5 imports) from any working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_FOLDERS = ("cluster", "workers", "kernels", "proto")

# Run in a fresh interpreter: transformers' hub_kernels imports `kernels` (Hugging Face's), and our package imports
# and runs (the harmony tokenizer, then the model on a tiny checkpoint). Prints where each module came from.
CHECK = """
import json, sys
import transformers.integrations.hub_kernels
import kernels
import gptoss_cluster
from gptoss_cluster import LLM, SamplingParams
from gptoss_cluster.kernels import dispatch
from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2_grpc
llm = LLM(model=sys.argv[1], dtype="float32")
out = llm.generate([[200006, 1428, 200008]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
print(json.dumps({"hf_kernels": kernels.__file__, "package": gptoss_cluster.__file__, "dispatch": dispatch.__file__,
                  "tokens": len(out.token_ids)}))
"""


def _check(python: str, cwd: Path, checkpoint: Path, pythonpath: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([python, "-c", CHECK, str(checkpoint)], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_module_folder_is_a_listed_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {"gptoss_cluster"}
    for top in TOP_FOLDERS:
        for path in (ROOT / top).rglob("*.py"):
            parts = path.parent.relative_to(ROOT).parts
            folders |= {".".join(("gptoss_cluster", *parts[:depth])) for depth in range(1, len(parts) + 1)}
    assert folders == listed
    assert {name: config["package-dir"][name] for name in config["package-dir"]} == {
        "gptoss_cluster": "gptoss_cluster", **{f"gptoss_cluster.{top}": top for top in TOP_FOLDERS}}
    # a top-level folder with an __init__.py would be a regular package `kernels` (...) wherever the checkout is on
    # sys.path (python run from the checkout), shadowing the other distribution of that name
    assert not [top for top in TOP_FOLDERS if (ROOT / top / "__init__.py").exists()]


@pytest.mark.parametrize("where", ["elsewhere", "checkout"])
def test_editable_install_beside_huggingface_kernels(checkpoints, tmp_path, where):
    pytest.importorskip("transformers")
    cwd = ROOT if where == "checkout" else tmp_path
    found = _check(sys.executable, cwd, checkpoints["tiny-hf"])
    assert Path(found["hf_kernels"]).parent != ROOT / "kernels", found  # Hugging Face's, not ours
    assert "site-packages" in Path(found["hf_kernels"]).parts, found
    assert Path(found["dispatch"]) == ROOT / "kernels" / "dispatch.py"
    assert found["tokens"] == 4


def test_wheel_installs_one_top_level_package(checkpoints, tmp_path):
    pytest.importorskip("transformers")
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
        "checkpoints"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(wheels), str(source)], check=True, timeout=300,
                   cwd=tmp_path)
    (wheel,) = wheels.glob("gptoss_cluster-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"gptoss_cluster", wheel.name.split("-py")[0] + ".dist-info"}
    for module in ("workers/llm.py", "cluster/cli.py", "kernels/dispatch.py", "proto/gptoss/v1/gptoss_pb2.py",
                   "kernels/triton/moe.py", "workers/engine/engine.py", "cluster/router/server.py"):
        assert f"gptoss_cluster/{module}" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/entry_points.txt").decode()
    assert "gptoss-cluster = gptoss_cluster.cluster.cli:main" in entry_points

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True, timeout=300)
    # PYTHONPATH comes before site-packages: a top-level `kernels` in the wheel would shadow Hugging Face's here
    found = _check(sys.executable, tmp_path, checkpoints["tiny-hf"], pythonpath=target)
    assert not found["hf_kernels"].startswith(str(target)) and "site-packages" in Path(found["hf_kernels"]).parts
    assert Path(found["package"]).parent == target / "gptoss_cluster"
    assert Path(found["dispatch"]) == target / "gptoss_cluster" / "kernels" / "dispatch.py"
    assert found["tokens"] == 4
