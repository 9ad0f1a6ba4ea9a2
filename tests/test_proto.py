"""The checked-in stubs are exactly what the .proto generates, and the API has the contracted services."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("gptoss_pb2.py", "gptoss_pb2.pyi", "gptoss_pb2_grpc.py")


def test_stubs_match_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    (tmp_path / "proto/gptoss/v1").mkdir(parents=True)
    shutil.copy(ROOT / "proto/gptoss/v1/gptoss.proto", tmp_path / "proto/gptoss/v1/gptoss.proto")
    # As proto/generate.sh runs it: the root mapped to gptoss_cluster/, the package's one import name.
    (tmp_path / "out").mkdir()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "gptoss_cluster=.", "--python_out=out",
                    "--pyi_out=out", "--grpc_python_out=out", "gptoss_cluster/proto/gptoss/v1/gptoss.proto"],
                   cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "out/gptoss_cluster/proto/gptoss/v1" / name).read_text()
        assert fresh == (ROOT / "proto/gptoss/v1" / name).read_text(), f"{name} is stale: run proto/generate.sh"


def test_services_and_methods():
    from gptoss_cluster.proto.gptoss.v1 import gptoss_pb2

    services = gptoss_pb2.DESCRIPTOR.services_by_name
    inference = {m.name: (m.client_streaming, m.server_streaming) for m in services["Inference"].methods}
    assert inference == {"Generate": (False, True), "Chat": (False, True), "Tokenize": (False, False),
                         "GetModelInfo": (False, False)}
    assert [m.name for m in services["Admin"].methods] == ["ListReplicas", "LoadLoraAdapter", "UnloadLoraAdapter",
                                                           "ListLoraAdapters"]
    assert gptoss_pb2.DESCRIPTOR.package == "gptoss.v1"
