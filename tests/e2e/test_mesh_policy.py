"""The mesh's optional policies through real Envoys: east-west rate limits counted per calling
service, authz for calls that carry an end user's token, and one trace from the edge through
every service. One stack (tests/e2e/mesh_policy.yaml): orders, payments and inventory behind
their sidecar Envoys, the Python sidecars, and an OTLP collector in the test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import TEMPLATE, Collector, Gateway, new_gateway, start

SERVICES = ("orders", "payments", "inventory")
SECRET_ENV = "SIDEGATE_E2E_MESH_SECRET"
SECRET = "a mesh test secret, long enough for HS256 keys"
ISSUER = "http://127.0.0.1/shop-idp"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, collector: tuple[Collector, int]) -> Iterator[Gateway]:
    ports = {f"{s}_{part}": free_port() for s in SERVICES for part in ("app", "in", "out", "admin")}
    template = TEMPLATE.with_name("mesh_policy.yaml")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(SECRET_ENV, SECRET)  # the sidecars read it at start
        running = new_gateway(tmp_path_factory.mktemp("mesh-policy"), template, otlp=collector[1], **ports)
        start(running.stack, timeout=90)  # seven processes and four Envoys on a shared machine
    try:
        yield running
    finally:
        running.stack.stop()


@pytest.fixture(scope="module")
def edge(mesh: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{mesh.ports['http']}", timeout=10) as client:
        yield client


def _stat(admin_port: int, name: str) -> int:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/stats", params={"filter": f"^{name}$"}).text
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def _call(edge: httpx.Client, chain: str, **headers: str) -> dict[str, Any]:
    reply = edge.get("/shop/cart", headers={"x-mesh-call": chain, **headers})
    assert reply.status_code == 200, reply.text
    document: dict[str, Any] = reply.json()
    return document


def _token(scope: str, subject: str = "alice", secret: str = SECRET) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "shop", "sub": subject, "scope": scope, "iat": now, "exp": now + 300}
    return jwt.encode(claims, secret, algorithm="HS256")


# -- east-west rate limits -------------------------------------------------------------------


def test_a_caller_past_its_limit_gets_429_and_another_caller_does_not(mesh: Gateway, edge: httpx.Client) -> None:
    admin = mesh.ports["inventory_admin"]
    over = _stat(admin, "cluster.mesh_app.ratelimit.over_limit")
    # inventory takes 5 calls a minute from each caller. A fixed window may restart once while
    # this runs, so 11 calls from orders are more than two windows can admit.
    statuses = []
    for _ in range(11):
        statuses.append(_call(edge, "GET inventory/stock")["called"]["status"])
        if statuses[-1] != 200:
            break
    assert statuses[-1] == 429, statuses
    assert set(statuses[:-1]) <= {200}
    assert _stat(admin, "cluster.mesh_app.ratelimit.over_limit") == over + 1
    # payments is another caller, counted apart: its call to inventory still passes.
    payments = _call(edge, "POST payments/charge, GET inventory/stock")["called"]
    assert payments["status"] == 200
    assert payments["body"]["called"]["status"] == 200
    # And orders stays limited.
    assert _call(edge, "GET inventory/stock")["called"]["status"] == 429


# -- ext_authz for calls that carry an end user's token --------------------------------------


def test_an_end_users_token_on_a_mesh_call_is_checked_by_authz(mesh: Gateway, edge: httpx.Client) -> None:
    # orders passes the user's token on to payments; payments' sidecar asks authz about it.
    called = _call(edge, "POST payments/charge", authorization=f"Bearer {_token('payments:charge')}")["called"]
    assert called["status"] == 200, called
    seen = called["body"]["headers"]
    assert (seen["x-consumer-id"], seen["x-auth-method"]) == ("alice", "jwt")
    # The token lacks the scope payments asks for a POST: 403 from authz, through payments' sidecar.
    called = _call(edge, "POST payments/charge", authorization=f"Bearer {_token('orders:read')}")["called"]
    assert called["status"] == 403
    assert called["body"]["error"] == "insufficient_scope"
    # A token signed with another key: 401.
    forged = _token("payments:charge", secret="another secret of the same length as the real one")
    called = _call(edge, "POST payments/charge", authorization=f"Bearer {forged}")["called"]
    assert called["status"] == 401
    assert called["body"]["error"] == "invalid_token"
    # No token: orders calls payments for itself, and allow alone decides. No end user is named.
    called = _call(edge, "POST payments/charge", **{"x-consumer-id": "mallory"})["called"]
    assert called["status"] == 200
    assert "x-consumer-id" not in called["body"]["headers"]


# -- traces ----------------------------------------------------------------------------------


def _trace_id(headers: dict[str, str]) -> str:
    return headers["traceparent"].split("-")[1]


def test_one_trace_runs_from_the_edge_through_each_service(
    mesh: Gateway, edge: httpx.Client, collector: tuple[Collector, int]
) -> None:
    receiver, _ = collector
    orders = _call(edge, "POST payments/charge, GET inventory/stock")
    payments = orders["called"]["body"]
    inventory = payments["called"]["body"]
    assert payments["called"]["status"] == 200
    # Hop by hop, each service received the same trace, each time from a new parent span.
    hops = [orders["headers"], payments["headers"], inventory["headers"]]
    trace = _trace_id(hops[0])
    assert [_trace_id(h) for h in hops] == [trace] * 3
    assert len({h["traceparent"] for h in hops}) == 3
    # And every Envoy on the way exported its spans of that trace: the edge and each sidecar.
    wanted = {"sidegate-envoy", *(f"sidegate-envoy.{s}" for s in SERVICES)}
    deadline = time.monotonic() + 15  # Envoy flushes its spans every 5 s
    seen: set[str] = set()
    while time.monotonic() < deadline and seen != wanted:
        with receiver.lock:
            seen = {service for service, span in receiver.spans if span.trace_id.hex() == trace} & wanted
        time.sleep(0.2)
    assert seen == wanted, f"spans of trace {trace} came from {sorted(seen)}"
