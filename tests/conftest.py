"""Shared fixtures: small checkpoints in both real layouts, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GPTOSS_NO_PROGRESS", "1")
# Tracing follows the OTEL_* variables (cluster.tracing), and cluster.app passes them on to every deployment: a
# collector configured in the developer's shell must not change what the tests see. The tests that trace set theirs.
for _key in [k for k in os.environ if k.startswith("OTEL_")]:
    del os.environ[_key]

from gptoss_cluster.workers.checkpoint import write_checkpoint  # noqa: E402
from gptoss_cluster.workers.config import ModelConfig  # noqa: E402

# A second small shape, different in every dimension the first one fixes: odd layer count, MHA-ish GQA ratio,
# head_dim 64, top-3 of 6 experts, a 32-token window.
TINY_B = ModelConfig.preset(
    "tiny", num_hidden_layers=3, hidden_size=256, intermediate_size=128, head_dim=64, num_attention_heads=4,
    num_key_value_heads=2, num_experts=6, experts_per_token=3, sliding_window=32,
)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{'tiny-hf', 'tiny-original', 'tinyb-hf'}: the same seed in both layouts, and a second shape."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {
        "tiny-hf": write_checkpoint(ModelConfig.preset("tiny"), root / "tiny-hf", layout="hf", seed=0,
                                    progress=False),
        "tiny-original": write_checkpoint(ModelConfig.preset("tiny"), root / "tiny-original", layout="original",
                                          seed=0, progress=False),
        "tinyb-hf": write_checkpoint(TINY_B, root / "tinyb-hf", layout="hf", seed=1, progress=False),
    }
    return {name: Path(path) for name, path in paths.items()}


# The engine tests' model: 2 layers of the tiny shape over a 4096-token vocabulary, float32 (exact comparisons).
SMALL_VOCAB = 4096
SMALL_EOS = SMALL_VOCAB - 1


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory):
    from gptoss_cluster.workers.checkpoint import open_checkpoint
    from gptoss_cluster.workers.model import GptOssModel

    config = ModelConfig.preset("tiny", num_hidden_layers=2, vocab_size=SMALL_VOCAB, eos_token_id=SMALL_EOS,
                                pad_token_id=SMALL_EOS - 1)
    path = write_checkpoint(config, tmp_path_factory.mktemp("ckpt") / "tiny2", progress=False)
    with open_checkpoint(path) as reader:
        return GptOssModel.from_checkpoint(reader, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """2 shared cores: OpenMP spinning under contention costs far more than it gains on matrices this small."""
    from helpers import torch_threads

    with torch_threads(1):
        yield
