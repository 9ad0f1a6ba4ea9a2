"""gptoss-cluster: serving gpt-oss-20b / gpt-oss-120b on Ray (see README.md).

One import name for the whole project: `gptoss_cluster.workers` (model, checkpoints, engine, offline API),
`gptoss_cluster.kernels` (torch reference + Triton), `gptoss_cluster.cluster` (router, replica, CLI) and
`gptoss_cluster.proto` (the gRPC stubs). The short form: `from gptoss_cluster import LLM, SamplingParams`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# The repository keeps cluster/, workers/, kernels/ and proto/ at its top; the wheel installs them inside this package.
# Run from a checkout (the editable install, or a script in the repository) they sit beside this folder instead, so the
# checkout's root joins this package's search path. None of them is an importable top-level package there (no
# __init__.py), so a checkout on sys.path never shadows another distribution's `kernels`, `proto`, `cluster`, `workers`.
_HERE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT = os.path.dirname(_HERE)
if not os.path.isdir(os.path.join(_HERE, "workers")) and os.path.isfile(os.path.join(_CHECKOUT, "workers", "llm.py")):
    __path__.append(_CHECKOUT)

# Lazy exports: `import gptoss_cluster.workers.harmony` should not pay for loading the model code.
_EXPORTS = {
    "LLM": "gptoss_cluster.workers.llm",
    "CompletionOutput": "gptoss_cluster.workers.llm",
    "SamplingParams": "gptoss_cluster.workers.sampling",
    "ModelConfig": "gptoss_cluster.workers.config",
    "EngineConfig": "gptoss_cluster.workers.engine.config",  # LLM(engine_config=...): max_loras, max_lora_rank, ...
    "AdapterInfo": "gptoss_cluster.workers.lora.adapter",
    "LoraError": "gptoss_cluster.workers.lora.adapter",  # a bad or unsupported adapter
    "LoraNotFoundError": "gptoss_cluster.workers.lora.adapter",  # a request named an unregistered adapter
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gptoss_cluster' has no attribute {name!r}")
