"""The edge holds against paths and clients that try to slip past it: escaped slashes and dot
segments are normalized before routing, and a client that sends too slowly is cut with 408."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sidegate.compiler.bootstrap import CLIENT_HEADERS
from tests.e2e.conftest import TEMPLATE, Gateway, new_gateway, start
from tests.e2e.test_apikeys import create


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


# --- header limits: a client over them gets 431, and nothing the gateway adds makes a 500 ----


def _fillers(count: int, size: int = 1) -> dict[str, str]:
    return {f"x-filler-{i}": "v" * size for i in range(count)}


@pytest.fixture(scope="module")
def orders_key(gateway: Gateway) -> str:
    key, _ = create(gateway, "--consumer", "acme", "--scopes", "orders:read", "--plan", "gold")
    return key


def test_any_header_count_is_200_or_431_never_500(gateway: Gateway, orders_key: str) -> None:
    """Before, 84 to 94 extra headers on an authenticated route gave 500: authz's identity
    headers took Envoy's header map past its limit of 100 (ext_authz request_header_limits_reached)."""
    seen: dict[str, dict[int, int]] = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.ports['http']}") as http1, gateway.https() as http2:
        for name, client in (("HTTP/1.1", http1), ("HTTP/2", http2)):
            statuses = seen[name] = {}
            for count in range(70, CLIENT_HEADERS + 12):
                reply = client.get("/orders/1", headers={"x-api-key": orders_key} | _fillers(count))
                statuses[count] = reply.status_code
                if reply.status_code == 431:
                    assert reply.json()["error"] == "request_header_fields_too_large", reply.text
    for name, statuses in seen.items():
        assert set(statuses.values()) <= {200, 431}, (name, statuses)
        first = min(n for n, status in statuses.items() if status == 431)
        assert all((status == 431) == (n >= first) for n, status in statuses.items()), (name, statuses)
        assert 85 < first <= CLIENT_HEADERS, (name, first)  # every client header counts, pseudo ones too
    assert gateway.stat("http.http.ext_authz.request_header_limits_reached") == 0


def test_any_header_size_is_200_or_431_never_500(gateway: Gateway, orders_key: str) -> None:
    statuses = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.ports['http']}") as client:
        for size in range(58 * 1024, 62 * 1024, 128):
            reply = client.get("/orders/1", headers={"x-api-key": orders_key, "x-big": "v" * size})
            statuses[size] = reply.status_code
        # A body does not count against the header limit.
        body = client.post("/public/echo", headers={"x-big": "v" * (58 * 1024)}, content=b"x" * 200_000)
    assert set(statuses.values()) == {200, 431}, statuses
    assert body.status_code == 200


def test_the_codec_431_past_the_header_map_limit_has_a_json_body(gateway: Gateway) -> None:
    headers = "".join(f"x-filler-{i}: v\r\n" for i in range(CLIENT_HEADERS * 2))
    with socket.create_connection(("127.0.0.1", gateway.ports["http"]), timeout=5) as sock:
        sock.sendall(f"GET /public/a HTTP/1.1\r\nhost: gw\r\n{headers}connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 431"), data[:300]
    assert b'"request_header_fields_too_large"' in data
