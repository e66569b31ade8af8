"""Shared fixtures: real processes on free ports, started, polled until ready, stopped in ``finally``.

Tests are tiered by folder (``tests/unit``, ``tests/tools``, ``tests/integration``,
``tests/e2e``); the folder sets the marker. ``tools`` runs our CLI and outside tools (ruff, mypy,
uv, envoy --mode validate, check-jsonschema, protoc) as subprocesses, so ``unit`` stays fast.
When a test fails, the logs of every process the fixtures started are
printed with its report.
"""

from __future__ import annotations

import os
import shutil
import socket
import string
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
TIERS = ("unit", "tools", "integration", "e2e")
# Property tests: a quick run in every tier run, a long one in ``make fuzz`` (HYPOTHESIS_PROFILE=fuzz).
settings.register_profile("quick", max_examples=60)
settings.register_profile("fuzz", max_examples=5_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))
# Log files of processes started by fixtures, printed when a test fails.
LOGS: list[Path] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = next((t for t in TIERS if f"tests/{t}/" in str(item.path).replace("\\", "/")), None)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and LOGS:
        for path in LOGS:
            if path.exists():
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-60:])
                report.sections.append((f"log {path.name}", tail))
    return report


_HANDED_OUT: set[int] = set()


class FakeClock:
    """Time that moves only when told: call it for ``now`` (seconds); the millisecond view is for
    the rate-limit algorithms, which count in integer milliseconds."""

    def __init__(self, now: float) -> None:
        self.now = now

    @classmethod
    def at_ms(cls, now_ms: int) -> FakeClock:
        return cls(now_ms / 1000)

    def __call__(self) -> float:
        return self.now

    @property
    def now_ms(self) -> int:
        return round(self.now * 1000)

    @now_ms.setter
    def now_ms(self, value: int) -> None:
        self.now = value / 1000

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def advance_ms(self, ms: int) -> int:
        self.now_ms += ms
        return self.now_ms


def free_port() -> int:
    """A port nothing listens on now, and never one this test run handed out before: the kernel
    may give a just-closed ephemeral port again, and two parts of one stack must not share one."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until(check: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout}s")
        time.sleep(0.05)


def render_config(template: Path, target: Path, **ports: Any) -> Path:
    """Fill ``$name`` placeholders of a gateway.yaml template and write it to ``target``."""
    target.write_text(string.Template(template.read_text()).substitute(ports))
    return target


class RedisServer:
    """A real redis-server on a free port, nothing kept on disk."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is missing: install it (make test does this as root)")
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*argv, "--logfile", str(self.log)])
        LOGS.append(self.log)
        wait_until(self.ping, what=f"redis on {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class GrpcServerProcess:
    """A sidecar server started as its own process (``argv`` on ``port``), logging to a file that
    joins the logs printed when a test fails; ready once ``service`` answers gRPC health."""

    def __init__(self, argv: list[str], port: int, log: Path, service: str, env: dict[str, str] | None = None) -> None:
        self.port, self.log, self.service = port, log, service
        self.handle = log.open("ab")
        self.proc = subprocess.Popen(argv, stdout=self.handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        LOGS.append(log)

    def wait_ready(self) -> None:
        from sidegate.probes import grpc_serving  # noqa: PLC0415 - only process tests need grpc

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log.name}: the server exited: {self.log.read_text()[-2000:]}")
            return grpc_serving(f"127.0.0.1:{self.port}", self.service)

        wait_until(ready, timeout=30, what=self.log.name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.handle.close()
