#!/usr/bin/env bash
# Regenerates the checked-in Python stubs from the .proto files (needs grpcio-tools).
# The checkout's root is mapped to gptoss_cluster/ so that the stubs import each other under the one import name
# the package installs as (gptoss_cluster.proto.gptoss.v1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$PYTHON" -m grpc_tools.protoc -I gptoss_cluster=. --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  gptoss_cluster/proto/gptoss/v1/gptoss.proto
cp "$out"/gptoss_cluster/proto/gptoss/v1/gptoss_pb2*.py* proto/gptoss/v1/
