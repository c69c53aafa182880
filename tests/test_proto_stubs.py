"""The committed gRPC stubs are exactly what `make proto` would generate from proto/kiln/v1/kiln.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

GENERATED = ("kiln_pb2.py", "kiln_pb2.pyi", "kiln_pb2_grpc.py")


def test_regenerating_stubs_changes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "proto" / "kiln" / "v1"
    src.mkdir(parents=True)
    shutil.copy(ROOT / "proto/kiln/v1/kiln.proto", src / "kiln.proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
         "proto/kiln/v1/kiln.proto"],
        cwd=tmp_path, check=True,
    )
    for name in GENERATED:
        fresh = (src / name).read_text()
        committed = (ROOT / "proto/kiln/v1" / name).read_text()
        assert fresh == committed, f"proto/kiln/v1/{name} is stale: run `make proto` and commit the result"
