"""The stack over Unix sockets: Envoy reaches every sidecar worker on its own socket.

One sidecar server with two workers listens on ``<state>/sidecars-0.sock`` and
``sidecars-1.sock``. Envoy's sidecar clusters list both as endpoints, health-check each and
spread the calls over them, which its per-endpoint counters in admin ``/clusters`` show.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from sidegate.errors import StackError
from tests.conftest import wait_until
from tests.e2e.conftest import TEMPLATE, Gateway, new_gateway, start

CALLS = 40


@pytest.fixture(scope="module")
def uds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    running = new_gateway(tmp_path_factory.mktemp("uds"), TEMPLATE.with_name("uds.yaml"))
    running.stack.settings = replace(running.stack.settings, admin_port=0)
    start(running.stack)
    try:
        yield running
    finally:
        running.stack.stop()


def _endpoint_stats(gateway: Gateway, cluster: str) -> dict[str, dict[str, str]]:
    """Envoy's admin /clusters for ``cluster``: per endpoint address, its counters and flags."""
    text = httpx.get(f"http://127.0.0.1:{gateway.ports['admin']}/clusters").text
    hosts: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster and parts[1].startswith("/"):  # a pipe endpoint
            hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
    return hosts


def test_each_worker_listens_on_its_own_socket_and_envoy_spreads_calls(uds: Gateway) -> None:
    state = uds.stack.state_dir
    sockets = [state / "sidecars-0.sock", state / "sidecars-1.sock"]
    for path in sockets:
        assert path.is_socket()
        assert path.stat().st_mode & 0o777 == 0o600
    hosts = _endpoint_stats(uds, "sidegate_authz")
    assert sorted(hosts) == sorted(str(p) for p in sockets)
    wait_until(
        lambda: all(h.get("health_flags") == "healthy" for h in _endpoint_stats(uds, "sidegate_authz").values()),
        what="both worker sockets healthy in Envoy",
    )
    before = {host: int(stats.get("rq_total", "0")) for host, stats in _endpoint_stats(uds, "sidegate_authz").items()}
    with httpx.Client(base_url=f"http://127.0.0.1:{uds.ports['http']}") as client:
        for _ in range(CALLS):
            assert client.get("/locked").status_code == 401  # authz answered: over a socket
        assert client.get("/public/hello").status_code == 200
    after = {host: int(stats.get("rq_total", "0")) for host, stats in _endpoint_stats(uds, "sidegate_authz").items()}
    served = {host: after[host] - before[host] for host in after}
    assert sum(served.values()) >= CALLS
    assert all(count > 0 for count in served.values()), served  # each worker took a share


def test_sidecars_are_on_sockets_by_default_and_the_sockets_go_at_stop(tmp_path: Path) -> None:
    """A gateway.yaml with no sidecars section: `up` runs them on sockets in its state folder."""
    gateway = new_gateway(tmp_path, TEMPLATE.with_name("uds_default.yaml"))
    gateway.stack.settings = replace(gateway.stack.settings, admin_port=0)
    start(gateway.stack)
    try:
        assert (gateway.stack.state_dir / "sidecars-0.sock").is_socket()
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway.ports['http']}") as client:
            assert client.get("/locked").status_code == 401  # authz answered, over the socket
            assert client.get("/public/hello").status_code == 200
    finally:
        gateway.stack.stop()
    assert not [name for name in os.listdir(gateway.stack.state_dir) if name.endswith(".sock")]


def test_up_refuses_a_socket_in_use_or_too_long_with_one_line(tmp_path: Path) -> None:
    gateway = new_gateway(tmp_path, TEMPLATE.with_name("uds.yaml"))
    state = gateway.stack.state_dir
    state.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as taken:
        taken.bind(str(state / "sidecars-1.sock"))
        taken.listen()
        with pytest.raises(
            StackError, match=r"sidecar authz\+ratelimit\+extproc: unix:.*sidecars-1.sock is already in use"
        ):
            gateway.stack.preflight()
    deep = replace(gateway.stack.settings, state_dir=tmp_path / ("d" * 100))
    long = new_gateway(tmp_path, TEMPLATE.with_name("uds.yaml"))
    long.stack.settings = deep
    with pytest.raises(StackError, match="is longer than 107 bytes"):
        long.stack.preflight()
