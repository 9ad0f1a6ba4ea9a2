#!/usr/bin/env bash
# Installs gptoss-cluster into the Python given as $PYTHON (default: python3).
# One script for every install: the Makefile (into .venv), CI, and the container images.
#   scripts/install.sh            the product
#   scripts/install.sh --test     the product plus the test extra (pytest, ruff, transformers as the oracle)
set -euo pipefail
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
# torch first, pinned: the project's torch range is satisfied by it, so nothing pulls a multi-GB CUDA build over it.
"$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION}"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
