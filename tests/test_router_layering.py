"""How the router's code is layered: its process never loads torch, and its modules import no cycle.

Checked on the source (imports read with `ast`, those inside functions included) and, for torch, by importing every
module of cluster/router/ in a fresh interpreter and looking at `sys.modules`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUTER = ROOT / "cluster" / "router"
PACKAGE = "gptoss_cluster"


def _module_name(path: Path) -> str:
    return ".".join((PACKAGE, *path.relative_to(ROOT).with_suffix("").parts))


def _imports(path: Path) -> set[str]:
    """Every gptoss_cluster module `path` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            out.add(node.module)
            # `from gptoss_cluster.cluster.router import openai_convert as convert` names a module too
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if (ROOT / Path(*node.module.split(".")[1:]) / f"{a.name}.py").exists())
    return out


def _router_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROUTER.glob("*.py")) if p.name != "__init__.py"}


def test_importing_the_router_does_not_import_torch():
    """Every module of cluster/router/ (the gRPC and HTTP servers, the Serve deployment and request router, the
    test helpers) and the contract it shares with the replicas, imported in a fresh interpreter: no torch."""
    modules = [*_router_modules()]
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')\n"
            "                        or m.startswith('gptoss_cluster.kernels'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
