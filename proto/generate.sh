#!/usr/bin/env bash
# Regenerates the checked-in Python stubs from the .proto files (needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. proto/gptoss/v1/gptoss.proto
