"""End-to-end fixtures: the whole stack (real Envoy, sidecars, echo upstream) on free ports."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from sidegate.cli.up import Stack
from sidegate.config import HostPort
from sidegate.settings import Settings
from tests.conftest import LOGS, free_port, render_config

TEMPLATE = Path(__file__).with_name("gateway.yaml")
PORTS = ("https", "http", "admin", "sidecars", "echo", "keyadmin")


@dataclass
class Gateway:
    """A running stack and the ports it was given."""

    stack: Stack
    ports: dict[str, int]

    @property
    def ca(self) -> Path:
        return self.stack.state_dir / "tls" / "ca.crt"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def https(self, **kwargs: object) -> httpx.Client:
        """A client that trusts the stack's development CA (HTTP/2 by ALPN unless told)."""
        options = {"verify": self.tls(), "http2": True} | kwargs
        return httpx.Client(base_url=f"https://127.0.0.1:{self.ports['https']}", **options)  # type: ignore[arg-type]

    def stat(self, name: str) -> int:
        """One counter from Envoy's admin /stats (0 when absent)."""
        text = httpx.get(f"http://127.0.0.1:{self.ports['admin']}/stats", params={"filter": f"^{name}$"}).text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0


def new_gateway(workdir: Path, template: Path = TEMPLATE, redis_url: str | None = None, **overrides: int) -> Gateway:
    """A stack (not started) for ``template`` with fresh ports; ``overrides`` pins some. With
    ``redis_url`` its keys and counters live in that Redis (and ``unix:`` sidecars get the
    workers gateway.yaml asks for: counters in memory would hold them to one)."""
    ports = {name: free_port() for name in PORTS} | overrides
    config = render_config(template, workdir / "gateway.yaml", **ports)
    settings = Settings(
        state_dir=workdir / "state", workers=1, grace=5.0, admin_port=ports["keyadmin"], redis_url=redis_url
    )
    echo = HostPort.model_validate(f"127.0.0.1:{ports['echo']}")
    stack = Stack(config, settings, echo=echo, log_dir=workdir / "logs")
    return Gateway(stack, ports)


def start(stack: Stack, timeout: float | None = None) -> None:
    """Start ``stack``; the logs of its processes join those printed when a test fails."""
    try:
        stack.start() if timeout is None else stack.start(timeout=timeout)
    finally:
        LOGS.extend(c.log_path for c in stack.children if c.log_path)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    running = new_gateway(tmp_path_factory.mktemp("stack"))
    start(running.stack)
    try:
        yield running
    finally:
        running.stack.stop()


@pytest.fixture(scope="session")
def https(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.https() as client:
        yield client


@pytest.fixture(scope="session")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.ports['http']}") as client:
        yield client


@pytest.fixture(scope="session")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A stack for tests/e2e/versions.yaml: versioned APIs."""
    running = new_gateway(tmp_path_factory.mktemp("versions"), TEMPLATE.with_name("versions.yaml"))
    start(running.stack)
    try:
        yield running
    finally:
        running.stack.stop()


@pytest.fixture(scope="session")
def client(versions: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{versions.ports['http']}") as http:
        yield http


class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """A real OTLP/gRPC trace receiver: keeps every span it is sent, with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                )
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(0)
