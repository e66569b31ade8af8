"""The service mesh through real Envoys: the edge, and orders, payments and inventory (demo echo
services) each behind its own sidecar Envoy on loopback, talking mTLS with SPIFFE identities."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidegate import devcerts, meshcerts
from sidegate.config import Gateway as GatewayConfig
from tests.conftest import free_port
from tests.e2e.conftest import TEMPLATE, Gateway, new_gateway, start
from tests.e2e.test_apikeys import create

SERVICES = ("orders", "payments", "inventory")
CHAIN = "POST payments/charge, GET inventory/stock"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    ports = {f"{s}_{part}": free_port() for s in SERVICES for part in ("app", "in", "out", "admin")}
    running = new_gateway(tmp_path_factory.mktemp("mesh"), TEMPLATE.with_name("mesh.yaml"), **ports)
    start(running.stack, timeout=90)  # seven processes and four Envoys on a shared machine
    try:
        yield running
    finally:
        running.stack.stop()


@pytest.fixture(scope="module")
def edge(mesh: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{mesh.ports['http']}", timeout=10) as client:
        yield client


def _config(mesh: Gateway) -> GatewayConfig:
    return mesh.stack.gateway


def _peer(headers: dict[str, str]) -> str:
    """The caller's identity as the callee's sidecar told the service (x-forwarded-client-cert)."""
    fields = dict(part.split("=", 1) for part in headers["x-forwarded-client-cert"].split(";"))
    return fields["URI"]


def _stat(admin_port: int, name: str) -> int:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/stats", params={"filter": f"^{name}$"}).text
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def test_an_allowed_chain_works_and_each_service_sees_its_caller(edge: httpx.Client) -> None:
    reply = edge.get("/shop/cart", headers={"x-mesh-call": CHAIN})
    assert reply.status_code == 200, reply.text
    orders = reply.json()
    payments = orders["called"]
    inventory = payments["body"]["called"]
    assert (payments["status"], inventory["status"]) == (200, 200)
    assert _peer(orders["headers"]) == "spiffe://test.local/gateway"
    assert _peer(payments["body"]["headers"]) == "spiffe://test.local/orders"
    assert _peer(inventory["body"]["headers"]) == "spiffe://test.local/payments"
    assert (payments["body"]["method"], payments["body"]["path"]) == ("POST", "/charge")
    assert (inventory["body"]["method"], inventory["body"]["path"]) == ("GET", "/stock")


def test_a_disallowed_call_is_403_from_the_callees_sidecar(mesh: Gateway, edge: httpx.Client) -> None:
    admin = mesh.ports["payments_admin"]
    denied = _stat(admin, "http.inbound_payments.rbac.denied")
    # orders may call payments, but only POST /charge: GET /refund reaches payments' sidecar.
    called = edge.get("/shop/cart", headers={"x-mesh-call": "GET payments/refund"}).json()["called"]
    assert called["status"] == 403
    assert called["body"]["error"] == "mesh_forbidden"
    assert _stat(admin, "http.inbound_payments.rbac.denied") == denied + 1
    # A path is matched on segments: /charge allows /charge and /charge/…, never /chargeback.
    called = edge.get("/shop/cart", headers={"x-mesh-call": "POST payments/chargeback"}).json()["called"]
    assert called["status"] == 403
    # Normalized first: /charge/../refund is /refund.
    called = edge.get("/shop/cart", headers={"x-mesh-call": "POST payments/charge/../refund"}).json()["called"]
    assert called["status"] == 403


def test_a_service_with_no_rule_to_the_callee_is_refused_by_its_own_sidecar(edge: httpx.Client) -> None:
    # inventory may call nobody: its sidecar has no route to orders.
    reply = edge.get("/shop/cart", headers={"x-mesh-call": "GET inventory/stock, GET orders/cart"}).json()
    inner = reply["called"]["body"]["called"]
    assert inner["status"] == 403
    assert inner["body"]["error"] == "mesh_unknown_service"


def test_identity_headers_count_only_from_the_gateway(mesh: Gateway, edge: httpx.Client) -> None:
    key, _ = create(mesh, "--consumer", "acme")
    reply = edge.get("/account/7", headers={"x-api-key": key, "x-mesh-call": "POST payments/charge"})
    assert reply.status_code == 200
    orders = reply.json()
    assert orders["headers"]["x-consumer-id"] == "acme"  # from authz, through the gateway's mTLS
    payments = orders["called"]["body"]
    # orders passed x-consumer-id on (the echo does), but orders is not the gateway.
    assert orders["called"]["status"] == 200
    assert "x-consumer-id" not in payments["headers"]
    assert "x-auth-method" not in payments["headers"]


def _client_cert(folder: Path, ca_key: Any, ca_cert: x509.Certificate, identity: str) -> tuple[Path, Path]:
    key, cert = devcerts.issue(
        ca_key,
        ca_cert,
        names=[x509.UniformResourceIdentifier(identity)],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        lifetime=dt.timedelta(hours=1),
        now=dt.datetime.now(dt.UTC),
    )
    devcerts.write(folder / "client.key", devcerts.pem_key(key), secret=True)
    devcerts.write(folder / "client.crt", devcerts.pem_cert(cert))
    return folder / "client.crt", folder / "client.key"


def _ask(port: int, context: ssl.SSLContext | None) -> bytes:
    """Send one HTTP request to 127.0.0.1:``port`` (TLS with ``context``); the first bytes back,
    b"" when the connection is closed or the handshake refused."""
    request = b"GET /cart HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            if context is None:
                raw.sendall(request)
                return raw.recv(64)
            with context.wrap_socket(raw) as tls:
                tls.sendall(request)
                return tls.recv(64)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


def _context(ca: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # a SPIFFE certificate names a URI, no host
    context.load_verify_locations(ca)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def test_an_inbound_listener_refuses_plaintext_no_certificate_and_another_ca(mesh: Gateway, tmp_path: Path) -> None:
    port = mesh.ports["orders_in"]
    ca = meshcerts.load_ca(_config(mesh), mesh.stack.state_dir)
    ca_file = meshcerts.mesh_dir(mesh.stack.state_dir) / "ca.crt"
    good = _client_cert(tmp_path, ca.key, ca.cert, "spiffe://test.local/gateway")
    assert _ask(port, _context(ca_file, good)).startswith(b"HTTP/1.1 200")  # the control: it answers
    assert _ask(port, None) == b""  # plaintext
    assert _ask(port, _context(ca_file, None)) == b""  # TLS without a client certificate
    other_key, other_cert = devcerts.new_ca("Another CA", dt.datetime.now(dt.UTC))
    (tmp_path / "other").mkdir()
    forged = _client_cert(tmp_path / "other", other_key, other_cert, "spiffe://test.local/gateway")
    assert _ask(port, _context(ca_file, forged)) == b""  # the right name from the wrong CA


def _serials(admin_port: int) -> set[str]:
    certs = httpx.get(f"http://127.0.0.1:{admin_port}/certs").json()["certificates"]
    return {c["serial_number"] for entry in certs for c in entry.get("cert_chain", [])}


def test_a_certificate_rotation_under_load_loses_no_request(mesh: Gateway, edge: httpx.Client) -> None:
    admins = [mesh.ports["admin"], *(mesh.ports[f"{s}_admin"] for s in SERVICES)]
    before = [_serials(port) for port in admins]
    results: list[tuple[int, int]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{mesh.ports['http']}", timeout=10) as client:
            while not stop.is_set():
                reply = client.get("/shop/cart", headers={"x-mesh-call": CHAIN})
                inner = reply.json().get("called", {}).get("status", 0) if reply.status_code == 200 else 0
                results.append((reply.status_code, inner))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        renewed = meshcerts.ensure(_config(mesh), mesh.stack.state_dir, force=True)
        assert sorted(renewed) == sorted(["gateway", *SERVICES])
        deadline = time.monotonic() + 20
        while any(_serials(port) & old for port, old in zip(admins, before, strict=True)):
            assert time.monotonic() < deadline, "Envoy did not load the new certificates"
            time.sleep(0.1)
        time.sleep(1.0)  # and keep the load on the new certificates for a while
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert len(results) > 20, "too little load to say anything"
    assert [r for r in results if r != (200, 200)] == []
