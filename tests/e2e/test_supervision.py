"""``sidegate up`` heals itself: a child that dies is started again, routes that need no sidecar
keep answering meanwhile, and only a child that keeps dying stops the stack, with one line."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.conftest import free_port, wait_until
from tests.e2e.conftest import PORTS
from tests.e2e.test_up import _processes_mentioning, _up, running_up


def _pid_of(marker: str, word: str) -> int | None:
    """The PID of our child whose command line names ``marker`` and ``word`` (not a worker)."""
    for pid in _processes_mentioning(marker):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if word in cmdline and not any("spawn_main" in part for part in cmdline):
            return int(pid)
    return None


def _stream(url: str, stop: threading.Event, statuses: Counter[object]) -> None:
    with httpx.Client(timeout=2) as client:
        while not stop.is_set():
            try:
                statuses[client.get(url).status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            time.sleep(0.005)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_up_restarts_a_dead_sidecar_server_and_a_dead_envoy(tmp_path: Path) -> None:
    ports = {name: free_port() for name in PORTS}
    argv, _config = _up(tmp_path, ports)
    out = tmp_path / "up.out"
    base = f"http://127.0.0.1:{ports['http']}"
    with running_up(argv, out) as proc:
        statuses: Counter[object] = Counter()
        stop = threading.Event()
        steady = threading.Thread(target=_stream, args=(f"{base}/public/hello", stop, statuses))
        steady.start()
        try:
            time.sleep(0.3)
            server = _pid_of(str(tmp_path), "serve")
            assert server is not None
            os.kill(server, signal.SIGKILL)
            wait_until(lambda: _pid_of(str(tmp_path), "serve") not in (None, server), timeout=15, what="a new server")
            wait_until(lambda: _status(f"{base}/orders") == 401, timeout=20, what="authz answering again")
            time.sleep(0.3)
        finally:
            stop.set()
            steady.join(10)
        # The anonymous route needs no sidecar: it answered throughout.
        assert statuses == Counter({200: statuses[200]}), statuses
        assert statuses[200] > 50
        envoy = _pid_of(str(tmp_path), "-c")
        assert envoy is not None
        os.kill(envoy, signal.SIGKILL)
        wait_until(lambda: _status(f"{base}/public/hello") == 200, timeout=20, what="Envoy serving again")
        assert _pid_of(str(tmp_path), "-c") != envoy
        assert proc.poll() is None  # up never stopped
        text = out.read_text()
        assert "sidecars@" in text
        assert "exited (status -9); starting it again" in text
        assert "envoy exited (status -9); starting it again" in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    time.sleep(0.2)
    assert _processes_mentioning(str(tmp_path)) == []


def test_a_child_that_keeps_dying_stops_up_with_one_line(tmp_path: Path) -> None:
    ports = {name: free_port() for name in PORTS}
    argv, _config = _up(tmp_path, ports)
    out = tmp_path / "up.out"
    with running_up(argv, out) as proc:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            envoy = _pid_of(str(tmp_path), "-c")
            if envoy is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(envoy, signal.SIGKILL)
            time.sleep(0.05)
        assert proc.wait(30) == 1
        said = [line for line in out.read_text().splitlines() if "keeps exiting" in line]
        assert said == ["sidegate: envoy keeps exiting (6 exits within 60 s, last status -9); stopping the stack"]
    time.sleep(0.2)
    assert _processes_mentioning(str(tmp_path)) == []
