"""The committed stubs of ``protos/`` are exactly what grpcio-tools makes of them (``make protos``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROTOS = ROOT / "protos"
PACKAGE = Path("sidegate/admin/v1")
GENERATED = ("keys_pb2.py", "keys_pb2.pyi", "keys_pb2_grpc.py")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stubs regenerated with the Makefile's `protos` flags, into a temp dir instead of the tree."""
    out = tmp_path_factory.mktemp("protos")
    argv = [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos"]
    argv += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    argv += [str(Path("protos") / PACKAGE / "keys.proto")]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return out / PACKAGE


def test_every_proto_is_the_one_the_makefile_compiles() -> None:
    assert sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto")) == [PACKAGE / "keys.proto"]


def test_protoc_makes_nothing_more(fresh: Path) -> None:
    assert sorted(p.name for p in fresh.iterdir()) == sorted(GENERATED)


@pytest.mark.parametrize("name", GENERATED)
def test_committed_stubs_match_a_fresh_protoc_run(fresh: Path, name: str) -> None:
    committed = (ROOT / PACKAGE / name).read_bytes()
    assert (fresh / name).read_bytes() == committed, f"{PACKAGE / name} is stale or edited by hand: run `make protos`"
