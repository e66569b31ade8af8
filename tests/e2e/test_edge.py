"""The edge holds against paths and clients that try to slip past it: escaped slashes and dot
segments are normalized before routing, and a client that sends too slowly is cut with 408."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import TEMPLATE, Gateway, new_gateway, start


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """A GET with the request target exactly as given (no client library normalizes it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.mark.parametrize(
    "target",
    [
        "/public/..%2Forders/1",
        "/public/..%2forders/1",
        "/public/..%5Corders/1",
        "/public/..%5corders/1",
        "/public/%2E%2E/orders/1",
        "/public/%2e%2e%2Forders/1",
        "/public/./../orders/1",
    ],
)
def test_an_escaped_way_out_of_an_anonymous_route_is_routed_where_it_leads(gateway: Gateway, target: str) -> None:
    status, data = _raw_get(gateway.ports["http"], target)
    # /orders needs credentials: authz answers 401, and the echo never saw the request.
    assert status == 401, data[:400]
    assert b'"api_key_missing"' in data


def test_a_plain_anonymous_path_still_reaches_the_upstream(gateway: Gateway) -> None:
    status, data = _raw_get(gateway.ports["http"], "/public/a%20b")
    assert status == 200, data[:400]


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[Gateway]:
    """A stack whose plain-HTTP listener waits 1 s for a request's headers and 2 s for all of it."""
    template = tmp_path / "template.yaml"
    text = TEMPLATE.read_text()
    listener = "  - name: http\n    port: $http\n"
    assert listener in text
    template.write_text(text.replace(listener, listener + "    timeouts: {request_headers: 1s, request: 2s}\n"))
    running = new_gateway(tmp_path, template)
    start(running.stack)
    try:
        yield running
    finally:
        running.stack.stop()


def test_a_slow_upload_is_cut_with_408(impatient: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", impatient.ports["http"]), timeout=10) as sock:
        sock.sendall(b"POST /public/slow HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\n")
        start_time = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply and time.monotonic() - start_time < 8:
            try:
                sock.sendall(b"x")  # one byte at a time, far slower than the request timeout allows
            except OSError:
                break
            sock.settimeout(0.5)
            try:
                reply += sock.recv(65536)
            except TimeoutError:
                continue
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


def test_headers_that_never_end_are_cut_with_408(impatient: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", impatient.ports["http"]), timeout=10) as sock:
        sock.sendall(b"GET /public/slow HTTP/1.1\r\nhost: gw\r\n")  # and never the blank line
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
