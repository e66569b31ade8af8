"""Protobuf descriptor sets from ``.proto`` files, with grpcio-tools' protoc.

``google/api/annotations.proto`` and ``google/api/http.proto`` (the ``google.api.http`` REST
mappings) are not shipped as ``.proto`` sources by any package we depend on, but their
compiled descriptors are (``xds-protos`` ships ``google.api.annotations_pb2``). This module
hands those descriptors to protoc with ``--descriptor_set_in``, so a ``.proto`` that imports
them compiles without vendoring googleapis. The well-known types (``google/protobuf/*``) come
from grpcio-tools' own include folder.

    python -m sidegate.protoc -Iprotos --python_out=. … FILE.proto   # protoc, knowing google/api
    sidegate descriptors -I protos -o orders.pb FILE.proto             # a descriptor set

Used by the Makefile's ``protos`` target, by ``sidegate descriptors`` and by the config
loader (gRPC translations given as ``protos``).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2


class ProtoError(Exception):
    """protoc refused the files, or a descriptor set cannot be read."""


@functools.cache
def google_api_set() -> bytes:
    """A FileDescriptorSet of google/api/{http,annotations}.proto and their import."""
    files = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, http_pb2, annotations_pb2):
        module.DESCRIPTOR.CopyToProto(files.file.add())
    return files.SerializeToString()


def _well_known() -> str:
    import grpc_tools  # noqa: PLC0415 - a build tool: only imported by what compiles .proto files

    return str(Path(grpc_tools.__file__).parent / "_proto")


def protoc(argv: Sequence[str], timeout: float = 60.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run grpcio-tools' protoc with ``argv``, google/api and the well-known types importable."""
    with tempfile.TemporaryDirectory(prefix="sidegate-protoc-") as tmp:
        google = Path(tmp) / "google-api.pb"
        google.write_bytes(google_api_set())
        command = [sys.executable, "-m", "grpc_tools.protoc", f"--descriptor_set_in={google}"]
        command += [*argv, f"-I{_well_known()}"]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)


def _stamp(paths: Sequence[Path]) -> tuple[tuple[str, int], ...]:
    stamps = []
    for path in paths:
        try:
            stamps.append((str(path), path.stat().st_mtime_ns))
        except OSError:
            stamps.append((str(path), -1))
    return tuple(stamps)


def compile_set(
    protos: Sequence[Path], proto_path: Sequence[Path], cwd: Path | None = None
) -> descriptor_pb2.FileDescriptorSet:
    """The FileDescriptorSet (with every import) of ``protos``; ``ProtoError`` with protoc's words.

    Relative paths are read from ``cwd`` (default: this process's), and errors name them so.
    """
    base = Path() if cwd is None else cwd
    for path in protos:
        if not (base / path).is_file():
            raise ProtoError(f"cannot read {path}")
    stamps = _stamp([base / p for p in protos])
    data = _compile(tuple(str(p) for p in protos), tuple(str(p) for p in proto_path), str(base.absolute()), stamps)
    return descriptor_pb2.FileDescriptorSet.FromString(data)


@functools.lru_cache(maxsize=32)
def _compile(protos: tuple[str, ...], proto_path: tuple[str, ...], cwd: str, _stamps: object) -> bytes:
    with tempfile.TemporaryDirectory(prefix="sidegate-descriptors-") as tmp:
        out = Path(tmp) / "set.pb"
        argv = [f"-I{p}" for p in proto_path]
        argv += ["--include_imports", f"--descriptor_set_out={out}", *protos]
        result = protoc(argv, cwd=Path(cwd))
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()] or ["protoc failed"]
            raise ProtoError(lines[0])
        return out.read_bytes()


def read_set(path: Path, name: str | None = None) -> descriptor_pb2.FileDescriptorSet:
    """A descriptor set file; errors call it ``name`` (default: its path)."""
    name = name or str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProtoError(f"cannot read {name}: {exc.strerror}") from None
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(data)
    except Exception:  # protobuf's DecodeError, or worse for random bytes
        raise ProtoError(f"{name} is not a FileDescriptorSet (protoc --include_imports --descriptor_set_out)") from None
    if not files.file:
        raise ProtoError(f"{name} holds no files")
    return files


def service_set(
    descriptor: str | None, protos: Sequence[str], proto_path: Sequence[str], base: Path
) -> descriptor_pb2.FileDescriptorSet:
    """A gateway.yaml ``grpc:`` section's descriptors: its ``descriptor`` set file, or its ``protos``
    compiled with ``proto_path`` (default: ``base``, the gateway.yaml's folder) as imports."""
    if descriptor is not None:
        return read_set(base / descriptor, descriptor)
    include = [Path(p) for p in proto_path] or [Path()]
    return compile_set([Path(p) for p in protos], include, cwd=base)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sidegate.protoc ARGS``: protoc with google/api importable."""
    result = protoc(list(sys.argv[1:] if argv is None else argv))
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
