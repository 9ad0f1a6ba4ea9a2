"""Model, checkpoint I/O, tokenizer/harmony and the offline API. Runs without Ray or the cluster package."""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports: `import workers.harmony` should not pay for loading the model code.
_EXPORTS = {
    "LLM": "workers.llm",
    "CompletionOutput": "workers.llm",
    "SamplingParams": "workers.sampling",
    "ModelConfig": "workers.config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
