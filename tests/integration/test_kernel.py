"""The server kernel with real processes: health, graceful drain, workers sharing one port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ROOT, free_port, wait_until
from tests.integration import slow_sidecar

CONFIG = ROOT / "examples" / "gateway.yaml"
IN_FLIGHT = 20


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    log = tmp_path / "slow.log"
    proc = _start([sys.executable, "-m", "tests.integration.slow_sidecar", str(CONFIG), str(port), "5"], log)
    try:
        wait_until(lambda: "ready" in log.read_text(), what="slow sidecar")
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def _calls_across_sigterm(proc: subprocess.Popen[bytes], port: int) -> tuple[list[object], object]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        calls = [asyncio.ensure_future(stub.Check(external_auth_pb2.CheckRequest())) for _ in range(IN_FLIGHT)]
        await asyncio.sleep(slow_sidecar.DELAY / 3)  # all in flight, none finished
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        health = health_pb2_grpc.HealthStub(channel)
        try:
            after: object = (await health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)).status
        except grpc.aio.AioRpcError as exc:
            after = exc.code()
        results = await asyncio.gather(*calls, return_exceptions=True)
    return results, after


def test_sigterm_lets_in_flight_calls_finish(slow_server: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    proc, port, _ = slow_server
    results, after = asyncio.run(_calls_across_sigterm(proc, port))
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert all(r.status.code == 0 for r in results)  # type: ignore[attr-defined]
    assert after != health_pb2.HealthCheckResponse.SERVING  # draining: no longer SERVING
    assert proc.wait(10) == 0


def test_workers_share_one_port_and_stop_together(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "sidegate", "serve", "--config", str(CONFIG), "--port", str(port), "--workers", "2"]
    argv += ["--sidecars", "authz,extproc"]  # memory counters refuse two workers: no ratelimit here
    proc = _start(argv, log)
    try:
        wait_until(lambda: '"msg":"serving"' in log.read_text(), what="two workers")
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        workers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=2
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert log.read_text().count('"msg":"stopped"') == 2
    finally:
        if proc.poll() is None:
            proc.terminate()  # the supervisor stops its workers
            proc.wait(15)


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "sidegate", "serve", "--config", str(CONFIG), "--port", str(port), "--workers", "2"]
    argv += ["--sidecars", "authz,extproc"]  # memory counters refuse two workers: no ratelimit here
    proc = _start(argv, log)
    workers: list[str] = []
    try:
        wait_until(lambda: '"msg":"serving"' in log.read_text(), what="two workers")
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        workers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2
        proc.kill()  # no chance to stop them
        proc.wait()
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=15, what="orphans gone")
        assert log.read_text().count("the supervising process is gone") == 2
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def test_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "authz", "--config", str(CONFIG), "--port", str(port), "--workers", "1"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"authz: cannot listen on 127.0.0.1:{port} (address in use or not local)"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["echo", "demo-grpc"])
def test_the_demo_upstreams_stop_at_once_on_sigterm(command: str, tmp_path: Path) -> None:
    """As PID 1 in a container nothing stops a process on SIGTERM but its own handler: without one,
    `docker compose stop` waits out its grace period and kills it (exit 137)."""
    port = free_port()
    log = tmp_path / f"{command}.log"
    proc = _start([sys.executable, "-m", "sidegate", command, "--port", str(port)], log)
    try:
        wait_until(lambda: _listening(port), what=command)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# Two workers of the sidecars that keep no counters in memory (those refuse a second worker).
TWO_WORKERS = [sys.executable, "-m", "sidegate", "serve", "--sidecars", "authz,extproc", "--config", str(CONFIG)]
TWO_WORKERS += ["--workers", "2"]


def _workers_of(supervisor: int) -> list[str]:
    children = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True).stdout.split()
    return [pid for pid in children if "spawn_main" in _cmdline(pid)]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _serving(port: int) -> bool:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def test_a_dead_worker_is_replaced_and_the_server_keeps_serving(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    argv = [*TWO_WORKERS, "--port", str(port)]
    proc = _start(argv, log)
    try:
        wait_until(lambda: '"msg":"serving"' in log.read_text(), what="two workers")
        first = _workers_of(proc.pid)
        assert len(first) == 2
        os.kill(int(first[0]), signal.SIGKILL)
        wait_until(lambda: len(set(_workers_of(proc.pid)) - set(first)) == 1, timeout=20, what="a new worker")
        assert proc.poll() is None  # the server never stopped
        wait_until(lambda: _serving(port), timeout=20, what="health")
        assert "worker died: starting another" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)


def test_workers_that_keep_dying_end_the_server_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    argv = [*TWO_WORKERS, "--port", str(port)]
    proc = _start(argv, log)
    try:
        wait_until(lambda: '"msg":"serving"' in log.read_text(), what="two workers")
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            for pid in _workers_of(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.05)
        assert proc.wait(15) == 1
        assert "workers keep dying (6 exits within 60 s): stopping the server" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _workers_of(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _serving_at(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def test_workers_listen_on_a_unix_socket_each(tmp_path: Path) -> None:
    """--socket: one socket per worker (0600), health on each, a stale file replaced, a killed
    worker's replacement back on the same path, and every file gone after SIGTERM."""
    folder = tmp_path / "run"
    folder.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(folder / "sidecars-1.sock"))
    stale.close()  # a socket file nobody listens on, as a SIGKILLed worker leaves it
    log = tmp_path / "serve.log"
    proc = _start([*TWO_WORKERS, "--socket", str(folder / "sidecars.sock")], log)
    paths = [folder / "sidecars-0.sock", folder / "sidecars-1.sock"]
    try:
        wait_until(lambda: '"msg":"serving"' in log.read_text(), what="two workers")
        for path in paths:
            assert path.is_socket()
            assert path.stat().st_mode & 0o777 == 0o600
            assert _serving_at(f"unix:{path}")
        first = _workers_of(proc.pid)
        os.kill(int(first[1]), signal.SIGKILL)
        wait_until(lambda: len(set(_workers_of(proc.pid)) - set(first)) == 1, timeout=20, what="a new worker")
        wait_until(lambda: all(_serving_at(f"unix:{p}") for p in paths), timeout=20, what="both sockets")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert sorted(os.listdir(folder)) == []
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)


def test_a_unix_socket_someone_listens_on_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "authz.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as taken:
        taken.bind(str(tmp_path / "authz-0.sock"))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "authz", "--config", str(CONFIG), "--socket", str(path), "--workers", "1"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    assert done.returncode != 0
    assert f"cannot listen on unix:{tmp_path / 'authz-0.sock'}" in done.stderr


def test_a_unix_socket_path_too_long_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120 + ".sock")
    done = subprocess.run(
        [sys.executable, "-m", "authz", "--config", str(CONFIG), "--socket", str(path), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode != 0
    assert "bytes (choose a shorter path)" in done.stderr


SOCKET_GROUP = 4242  # a group that Envoy's user is in and the server's user may give files to
ENVOY_UID = 65534  # nobody: an Envoy that runs as another user than the sidecars
SYSTEM_PYTHON = "/usr/bin/python3"  # one that user can run (the venv's may live in a private home)


def _connects_as_another_user(path: Path, groups: list[int]) -> str:
    """ "ok", or the error a process of uid ``ENVOY_UID`` in ``groups`` gets connecting to ``path``."""
    code = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('ok')"
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", code, str(path)],
        user=ENVOY_UID,
        group=ENVOY_UID,
        extra_groups=groups,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON), reason="acts as another user: root only")
def test_a_socket_group_lets_an_envoy_of_another_user_in_that_group_connect() -> None:
    """--socket-group: the sockets are 0660 and owned by that group, and their folder, made when
    missing, is 0750 and owned by it too. A process of another user connects when it is in the
    group and is refused when it is not; without the setting the sockets stay 0600."""
    top = Path(tempfile.mkdtemp(prefix="sg-group-", dir="/tmp"))
    top.chmod(0o755)  # the other user must reach the folder the server makes below
    folder = top / "run"
    log = top / "serve.log"
    argv = [sys.executable, "-m", "sidegate", "serve", "--sidecars", "authz,extproc", "--config", str(CONFIG)]
    proc = _start([*argv, "--workers", "1", "--socket", str(folder / "sidecars.sock"), "--socket-group", "4242"], log)
    path = folder / "sidecars-0.sock"
    try:
        wait_until(lambda: '"msg":"serving"' in log.read_text(), what="the server on a socket")
        assert (path.stat().st_mode & 0o777, path.stat().st_gid) == (0o660, SOCKET_GROUP)
        assert (folder.stat().st_mode & 0o777, folder.stat().st_gid) == (0o750, SOCKET_GROUP)
        assert _connects_as_another_user(path, [SOCKET_GROUP]) == "ok"
        assert "Permission denied" in _connects_as_another_user(path, [])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        plain = _start([*argv, "--workers", "1", "--socket", str(folder / "plain.sock")], log)
        try:
            wait_until((folder / "plain-0.sock").exists, what="the server without a group")
            assert (folder / "plain-0.sock").stat().st_mode & 0o777 == 0o600
            assert "Permission denied" in _connects_as_another_user(folder / "plain-0.sock", [SOCKET_GROUP])
        finally:
            plain.terminate()
            plain.wait(15)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)
        shutil.rmtree(top, ignore_errors=True)


def _probe(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m sidegate.health`` (the image's and the pods' probe) with ``argv``."""
    return subprocess.run(
        [sys.executable, "-m", "sidegate.health", "--config", str(CONFIG), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_the_probe_asks_every_worker_socket_for_every_sidecar(tmp_path: Path) -> None:
    """The probe resolves the same flags as the server to the same sockets: healthy when each
    worker answers for each sidecar named; 1 with one line naming the socket otherwise."""
    base = str(tmp_path / "sidecars.sock")
    log = tmp_path / "serve.log"
    proc = _start([*TWO_WORKERS, "--socket", base], log)
    try:
        wait_until(lambda: '"msg":"serving"' in log.read_text(), what="two workers")
        same = ["--sidecars", "authz,extproc", "--workers", "2", "--socket", base]
        ok = _probe(*same)
        assert (ok.returncode, ok.stderr) == (0, "")
        more = _probe(*same[:-4], "--workers", "3", "--socket", base)  # a third worker nobody runs
        assert more.returncode == 1
        assert more.stderr.startswith(f"sidegate health: unix:{tmp_path / 'sidecars-2.sock'} does not answer")
        other = _probe("--sidecars", "authz,ratelimit", "--workers", "2", "--socket", base)
        assert other.returncode == 1
        assert "does not answer for envoy.service.ratelimit.v3.RateLimitService (NOT_FOUND)" in other.stderr
    finally:
        proc.terminate()
        proc.wait(15)
    gone = _probe(*same)
    assert gone.returncode == 1, gone.stderr
