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
    modules = [*_router_modules(), f"{PACKAGE}.cluster.contract", f"{PACKAGE}.cluster.token_channel"]
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')\n"
            "                        or m.startswith('gptoss_cluster.kernels'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle among the graph's modules, each as the modules on it (depth-first search)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt in graph and not state.get(nxt):
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node)
    return found


def test_the_router_modules_import_no_cycle():
    modules = _router_modules()
    graph = {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the check itself works


def test_router_and_replica_meet_only_in_the_contract():
    """No module of cluster/router/ imports cluster/replica.py, nor the other way round; what they share is
    cluster/contract.py (and the replica's side of the token channel, which speaks it)."""
    replica = f"{PACKAGE}.cluster.replica"
    for name, path in _router_modules().items():
        assert replica not in _imports(path), name
    router_imports = {m for m in _imports(ROOT / "cluster" / "replica.py") if m.startswith(f"{PACKAGE}.cluster.router")}
    assert router_imports == set()
    assert f"{PACKAGE}.cluster.contract" in _imports(ROOT / "cluster" / "replica.py")
    assert f"{PACKAGE}.cluster.contract" in _imports(ROUTER / "core.py")


def test_routing_policies_need_no_ray():
    """The policies are plain objects (tested without Ray); only the Serve adapter imports Ray."""
    source = (ROUTER / "policies.py").read_text()
    tree = ast.parse(source)
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(m == "ray" or m.startswith("ray.") for m in imported), imported
    assert _imports(ROUTER / "policies.py") == set()  # nothing of ours either: a leaf
