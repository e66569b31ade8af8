"""The committed stubs of ``protos/`` are exactly what grpcio-tools makes of them (``make protos``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROTOS = ROOT / "protos"
# Every .proto we own → the stubs `make protos` commits beside the Python package of the same path.
# `python -m sidegate.protoc` is grpcio-tools' protoc that also knows google/api/annotations.proto.
COMPILED = {
    Path("sidegate/admin/v1/keys.proto"): ("keys_pb2.py", "keys_pb2.pyi", "keys_pb2_grpc.py"),
    Path("sidegate/demo/v1/orders.proto"): ("orders_pb2.py", "orders_pb2.pyi", "orders_pb2_grpc.py"),
}
CASES = [(proto, name) for proto, names in COMPILED.items() for name in names]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stubs regenerated with the Makefile's `protos` flags, into a temp dir instead of the tree."""
    out = tmp_path_factory.mktemp("protos")
    argv = [sys.executable, "-m", "sidegate.protoc", "-Iprotos"]
    argv += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    argv += [str(Path("protos") / proto) for proto in COMPILED]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return out


def test_every_proto_is_the_one_the_makefile_compiles() -> None:
    assert sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto")) == sorted(COMPILED)
    makefile = (ROOT / "Makefile").read_text()
    for proto in COMPILED:
        assert f"protos/{proto}" in makefile


def test_protoc_makes_nothing_more(fresh: Path) -> None:
    made = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert made == sorted(proto.parent / name for proto, name in CASES)


@pytest.mark.parametrize(("proto", "name"), CASES, ids=[name for _, name in CASES])
def test_committed_stubs_match_a_fresh_protoc_run(fresh: Path, proto: Path, name: str) -> None:
    stub = proto.parent / name
    committed = (ROOT / stub).read_bytes()
    assert (fresh / stub).read_bytes() == committed, f"{stub} is stale or edited by hand: run `make protos`"
