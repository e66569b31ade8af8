"""``sidegate up`` as a person runs it: serves, prints how to try it, stops everything it started."""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sidegate.cli.up import Child
from sidegate.errors import StackError
from tests.conftest import free_port, render_config, wait_until
from tests.e2e.conftest import PORTS, TEMPLATE, new_gateway


def _processes_mentioning(marker: str) -> list[str]:
    """PIDs whose command line names ``marker`` (a temp path only our children use)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                found.append(cmdline.parent.name)
        except OSError:
            continue
    return found


def _up(tmp_path: Path, ports: dict[str, int]) -> tuple[list[str], Path]:
    config = render_config(TEMPLATE, tmp_path / "gateway.yaml", **ports)
    argv = [
        sys.executable,
        "-m",
        "sidegate",
        "up",
        "--config",
        str(config),
        "--state-dir",
        str(tmp_path / "state"),
        "--echo",
        f"127.0.0.1:{ports['echo']}",
        "--workers",
        "1",
        "--admin-port",
        str(ports["keyadmin"]),
    ]
    return argv, config


@contextlib.contextmanager
def running_up(argv: list[str], out: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``sidegate up`` running, its output in ``out``, until its banner; stopped in the end."""
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        wait_until(lambda: "Ctrl-C stops everything." in out.read_text(), timeout=30, what="sidegate up")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


NEW_API = """  - name: added
    match: {prefix: /added}
    service: echo
    auth: {anonymous: true}
"""


def test_up_serves_prints_curl_lines_reloads_edits_and_stops_everything(tmp_path: Path) -> None:
    ports = {name: free_port() for name in PORTS}
    argv, config = _up(tmp_path, ports)
    out = tmp_path / "up.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Ctrl-C stops everything." in out.read_text(), timeout=30, what="sidegate up")
        banner = out.read_text()
        ca = tmp_path / "state" / "tls" / "ca.crt"
        https_line = f"curl --cacert {ca} https://127.0.0.1:{ports['https']}/public/hello"
        http_line = f"curl http://127.0.0.1:{ports['http']}/public/hello"
        assert https_line in banner
        assert http_line in banner
        for line in (https_line, http_line):  # the printed lines work as printed
            result = subprocess.run(
                [*line.split(), "-s", "-o", "/dev/null", "-w", "%{http_code}"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert result.stdout == "200", line
        reply = httpx.get(
            f"https://127.0.0.1:{ports['https']}/public/hello", verify=ssl.create_default_context(cafile=ca)
        )
        assert reply.json()["path"] == "/public/hello"
        assert len(_processes_mentioning(str(tmp_path))) >= 3  # up, sidecars, envoy (echo via its port)
        # an edit of gateway.yaml is picked up while up runs: a new anonymous API appears
        config.write_text(config.read_text().replace("apis:\n", "apis:\n" + NEW_API, 1))
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{ports['http']}/added/x").status_code == 200,
            timeout=10,
            what="the edited route",
        )
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    time.sleep(0.2)
    assert _processes_mentioning(str(tmp_path)) == []
    with socket.socket() as sock:  # the echo upstream is gone too
        assert sock.connect_ex(("127.0.0.1", ports["echo"])) != 0


def test_up_with_a_port_in_use_says_so_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = {name: free_port() for name in PORTS} | {"https": taken.getsockname()[1]}
        argv, _ = _up(tmp_path, ports)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == f"sidegate: listener https: 127.0.0.1:{ports['https']} is already in use"
    assert result.stdout == ""
    assert _processes_mentioning(str(tmp_path)) == []


def test_up_with_a_missing_cert_file_says_so(tmp_path: Path) -> None:
    ports = {name: free_port() for name in PORTS}
    argv, config = _up(tmp_path, ports)
    config.write_text(config.read_text().replace("tls: {}", "tls: {cert: /nonexistent.crt, key: /nonexistent.key}"))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == f"sidegate: {config}: listeners[0].tls.cert: cannot read /nonexistent.crt"


def test_a_child_dying_at_start_stops_the_rest(tmp_path: Path) -> None:
    gateway = new_gateway(tmp_path)
    stack = gateway.stack
    original = stack._children

    def with_a_dud(envoy_yaml: Path) -> list[Child]:
        dud = Child(
            "dud",
            [sys.executable, "-c", "import sys; print('dud: boom'); sys.exit(3)"],
            tmp_path / "dud.log",
            ready=lambda: False,
        )
        return [*original(envoy_yaml), dud]

    stack._children = with_a_dud  # type: ignore[method-assign]
    with pytest.raises(StackError, match=r"^dud exited at start \(status 3\): dud: boom$"):
        stack.start()
    assert all(not child.alive for child in stack.children)
    assert _processes_mentioning(str(tmp_path)) == []


def test_keys_and_up_share_the_store_of_gateway_yaml_and_the_banner_lists_every_port(tmp_path: Path) -> None:
    """No --state-dir, --echo, --admin-port or --metrics-port: gateway.yaml's state: and up:
    sections give them, to ``sidegate keys`` and ``sidegate up`` alike, each run from elsewhere."""
    ports = {name: free_port() for name in (*PORTS, "metrics")}
    (tmp_path / "conf").mkdir()
    config = render_config(TEMPLATE, tmp_path / "conf" / "gateway.yaml", **ports)
    config.write_text(
        config.read_text()
        + "state: {dir: state}\n"
        + f"up: {{echo: '127.0.0.1:{ports['echo']}', key_admin_port: {ports['keyadmin']}, "
        + f"metrics_port: {ports['metrics']}}}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sidegate = [sys.executable, "-m", "sidegate"]
    created = subprocess.run(
        [*sidegate, "keys", "--config", str(config), "create", "--consumer", "acme", "--scopes", "orders:read"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=elsewhere,
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert (tmp_path / "conf" / "state" / "pepper").exists()  # beside gateway.yaml, not in the cwd
    assert not (elsewhere / ".sidegate").exists()
    out = tmp_path / "up.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [*sidegate, "up", "--config", str(config), "--workers", "1"], stdout=sink, stderr=subprocess.STDOUT, cwd="/"
        )
    try:
        wait_until(lambda: "Ctrl-C stops everything." in out.read_text(), timeout=30, what="sidegate up")
        banner = out.read_text()
        for line in (
            f"  https://127.0.0.1:{ports['https']}   (listener https)",
            f"  http://127.0.0.1:{ports['http']}   (listener http)",
            f"  Envoy admin: http://127.0.0.1:{ports['admin']}",
            f"  sidecars authz, ratelimit, extproc: grpc://127.0.0.1:{ports['sidecars']}",
            f"  sidecar metrics (authz, ratelimit, extproc): http://127.0.0.1:{ports['metrics']}/metrics",
            f"  key admin API: grpc://127.0.0.1:{ports['keyadmin']}",
            f"  demo upstream (echo): http://127.0.0.1:{ports['echo']}",
        ):
            assert line in banner.splitlines(), (line, banner)
        assert key not in banner
        reply = httpx.get(f"http://127.0.0.1:{ports['http']}/orders/1", headers={"x-api-key": key}, timeout=10)
        assert reply.status_code == 200, reply.text
        assert reply.json()["headers"]["x-consumer-id"] == "acme"
        metrics = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10)
        assert metrics.status_code == 200
        for port in (ports["keyadmin"], ports["echo"]):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # each printed endpoint is open
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    assert key not in out.read_text()
