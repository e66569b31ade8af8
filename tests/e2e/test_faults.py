"""Sidecars that hang or vanish: every route that needs one fails closed with 503 and a JSON
body (never a 500, never an empty body), and every route that needs none keeps answering."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import TEMPLATE, Gateway, new_gateway, start

UNAVAILABLE = {"error": "sidecar_unavailable", "message": "the gateway cannot check this request now; try again later"}


@pytest.fixture
def versions(tmp_path: Path) -> Iterator[Gateway]:
    running = new_gateway(tmp_path, TEMPLATE.with_name("versions.yaml"))
    start(running.stack)
    try:
        yield running
    finally:
        running.stack.stop()


def _sidecars(gateway: Gateway) -> int:
    [child] = [c for c in gateway.stack.children if c.name.startswith("sidecars@")]
    assert child.proc is not None
    return child.proc.pid


@pytest.mark.parametrize("fault", [signal.SIGSTOP, signal.SIGKILL], ids=["hung", "gone"])
def test_routes_that_need_a_sidecar_fail_closed_with_503_json(versions: Gateway, fault: int) -> None:
    base = f"http://127.0.0.1:{versions.ports['http']}"
    transform = {"api-version": "v1"}  # v1 is served by v3 through extproc
    assert httpx.post(f"{base}/widgets", headers=transform, json={"name": "x"}).status_code == 200
    group = _sidecars(versions)
    os.killpg(group, fault)  # the sidecar server and its workers: authz, ratelimit and extproc
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            wait_until(lambda: client.post("/widgets", headers=transform, json={}).status_code == 503, timeout=15)
            for reply in (
                client.post("/widgets", headers=transform, json={"name": "x"}),  # needs extproc
                client.get("/accounts/1"),  # needs authz
            ):
                assert reply.status_code == 503, reply.text
                assert reply.headers["content-type"] == "application/json"
                assert reply.json() == UNAVAILABLE
            # A version Envoy routes by itself needs no sidecar.
            assert client.post("/widgets", headers={"api-version": "v3"}, json={"name": "x"}).status_code == 200
    finally:
        if fault == signal.SIGSTOP:
            os.killpg(group, signal.SIGCONT)
