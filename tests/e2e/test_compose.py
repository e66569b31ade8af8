"""The containerised stack, run for real: `docker compose up -d --build`, used as a person would,
then the faults that once broke it, then `docker compose down -v`.

The faults: a restart of Envoy left every route answering 503 (it came back in a new network
namespace); a recreated sidecars container forgot the key pepper, so every API key answered 401;
`sidegate echo` ignored SIGTERM and was killed after the grace period. Each has a test below.

A Docker engine with Compose v2 is needed. When none answers, the tool beside the project
(../shared/tools/container-engine.sh) installs and starts one, and this module stops it again at
the end. When that fails, the test fails with the tool's reason: it is never skipped.
Run alone with `make compose` (`pytest -m compose`).
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.compose

ENGINE = ROOT.parent / "shared" / "tools" / "container-engine.sh"
UP_TIMEOUT = 600  # a cold first build downloads every locked wheel into the image
CONFIG_IN_IMAGE = "/etc/sidegate/gateway.yaml"  # the example the Dockerfile builds in
BACK_WITHIN = 30.0  # seconds a restarted container gets to serve again


def _run(argv: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _engine_ready() -> bool:
    try:
        return (
            _run(["docker", "info"], timeout=30).returncode == 0
            and _run(["docker", "compose", "version"], timeout=30).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def engine() -> Iterator[None]:
    """A Docker engine that answers; started here (and stopped at the end) only if none did."""
    if _engine_ready():
        yield
        return
    if not ENGINE.exists():
        pytest.fail(f"no Docker engine answers and {ENGINE} is not there to start one")
    up = _run(["bash", str(ENGINE), "up"], timeout=900)
    if up.returncode != 0:
        lines = (up.stderr or up.stdout).strip().splitlines() or ["(no output)"]
        pytest.fail(f"container-engine.sh up failed: {lines[-1]}")
    try:
        yield
    finally:
        _run(["bash", str(ENGINE), "down"], timeout=120)


@dataclass
class Stack:
    """One compose project on free host ports; ``compose`` runs `docker compose` against it."""

    project: str
    https: int
    http: int
    ca: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SIDEGATE_HTTPS_PORT": str(self.https),
            "SIDEGATE_HTTP_PORT": str(self.http),
        }

    def compose(self, *args: str, timeout: float = 180) -> str:
        result = _run(["docker", "compose", "-p", self.project, *args], timeout=timeout, env=self.env)
        output = result.stdout[-3000:] + result.stderr[-3000:]
        assert result.returncode == 0, f"docker compose {' '.join(args)}:\n{output}"
        return result.stdout

    def get(self, path: str, *, tls: bool = False, key: str | None = None) -> httpx.Response:
        headers = {"x-api-key": key} if key else {}
        if tls:
            context = ssl.create_default_context(cafile=str(self.ca))
            with httpx.Client(verify=context, timeout=5) as client:
                return client.get(f"https://localhost:{self.https}{path}", headers=headers)
        with httpx.Client(timeout=5) as client:
            return client.get(f"http://127.0.0.1:{self.http}{path}", headers=headers)

    def wait_for(self, path: str, status: int = 200, key: str | None = None, within: float = BACK_WITHIN) -> float:
        """Seconds until ``path`` answers ``status``; fails with the last answer after ``within``."""
        start = time.monotonic()
        last: object = None
        while time.monotonic() - start < within:
            try:
                response = self.get(path, key=key)
                last = f"{response.status_code} {response.text[:200]}"
                if response.status_code == status:
                    return time.monotonic() - start
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.25)
        raise AssertionError(f"{path} did not answer {status} within {within}s; last: {last}")

    def create_key(self, consumer: str, scopes: str, plan: str) -> str:
        out = self.compose(
            "exec", "-T", "sidecars", "sidegate", "keys", "create",
            "--consumer", consumer, "--scopes", scopes, "--plan", plan,
        )  # fmt: skip
        return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def stack(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("compose")
    stack = Stack(f"sgtest{os.getpid()}", free_port(), free_port(), workdir / "ca.crt")
    try:
        stack.compose("up", "-d", "--build", "--wait", "--wait-timeout", str(UP_TIMEOUT), timeout=UP_TIMEOUT + 60)
        stack.ca.write_text(stack.compose("run", "--rm", "--no-deps", "certs", "cat", "/state/tls/ca.crt"))
        yield stack
    except AssertionError:
        print(_run(["docker", "compose", "-p", stack.project, "logs", "--tail", "60"], env=stack.env).stdout)
        raise
    finally:
        _run(["docker", "compose", "-p", stack.project, "down", "-v", "--remove-orphans", "-t", "20"], env=stack.env)


@pytest.fixture(scope="module")
def gold_key(stack: Stack) -> str:
    return stack.create_key("compose-gold", "orders:read", "gold")


def test_public_hello_answers_over_https_with_the_stacks_ca_and_over_http(stack: Stack) -> None:
    for tls in (True, False):
        response = stack.get("/public/hello", tls=tls)
        assert response.status_code == 200, response.text
        assert response.json()["path"] == "/public/hello"


def test_a_key_made_with_compose_exec_authenticates_and_its_plan_limit_answers_429(stack: Stack) -> None:
    assert stack.get("/orders").status_code == 401
    key = stack.create_key("compose-free", "orders:read", "free")  # free: 5 requests a second
    statuses = [stack.get("/orders", key=key).status_code for _ in range(12)]
    assert statuses[0] == 200, statuses
    assert 429 in statuses, statuses
    assert set(statuses) <= {200, 429}, statuses
    counters = stack.compose("exec", "-T", "redis", "redis-cli", "--scan", "--pattern", "sg:rl:*")
    assert "compose-free" in counters, f"no rate-limit counter of compose-free in Redis: {counters!r}"


ENVOY_CLUSTERS = (
    "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9901/clusters', timeout=5).read().decode())"
)


def test_envoy_reaches_each_sidecar_worker_over_its_socket_on_the_shared_volume(stack: Stack, gold_key: str) -> None:
    """The sidecars listen on a socket per worker on the `sockets` volume (0600, their user's),
    and Envoy, in another container, health-checks and calls every one of them."""
    modes = stack.compose("exec", "-T", "sidecars", "sh", "-c", "stat -c '%n %a %u' /run/sidegate/*.sock")
    assert sorted(modes.split("\n")[:-1]) == [
        "/run/sidegate/sidecars-0.sock 600 10001",
        "/run/sidegate/sidecars-1.sock 600 10001",
    ], modes
    for _ in range(40):
        assert stack.get("/orders", key=gold_key).status_code in (200, 429)
    # Envoy's admin listens on the pod's loopback: ask it from the pod's own container.
    clusters = stack.compose("exec", "-T", "pod", "python", "-c", ENVOY_CLUSTERS)
    for n in (0, 1):
        prefix = f"sidegate_authz::/run/sidegate/sidecars-{n}.sock::"
        stats = dict(
            line.removeprefix(prefix).split("::", 1) for line in clusters.splitlines() if line.startswith(prefix)
        )
        assert stats.get("health_flags") == "healthy", f"worker {n}: {stats or clusters[-2000:]}"
        assert int(stats["rq_total"]) > 0, f"worker {n} got no call from Envoy: {stats}"


def test_envoy_restarted_or_killed_serves_again_within_seconds(stack: Stack, gold_key: str) -> None:
    stack.compose("restart", "envoy")
    stack.wait_for("/public/hello")
    stack.wait_for("/orders", key=gold_key)  # Envoy reaches the sidecars too, not only echo
    # A crash (SIGKILL to Envoy's process; `docker kill` would count as a stop by hand): the
    # restart policy brings Envoy back into the same namespace.
    [container] = stack.compose("ps", "-q", "envoy").split()
    pid = int(_run(["docker", "inspect", "--format", "{{.State.Pid}}", container]).stdout)
    assert pid > 0, f"envoy's container {container} runs no process"
    os.kill(pid, signal.SIGKILL)
    stack.wait_for("/public/hello")
    stack.wait_for("/orders", key=gold_key)


def test_every_container_of_the_pod_can_restart_and_the_stack_serves_again(stack: Stack, gold_key: str) -> None:
    for service in ("sidecars", "echo", "pod"):
        stack.compose("restart", service)
        stack.wait_for("/public/hello")
        stack.wait_for("/orders", key=gold_key)


def test_keys_survive_recreating_the_sidecars_and_down_then_up(stack: Stack, gold_key: str) -> None:
    stack.compose("up", "-d", "--force-recreate", "--wait", "sidecars")
    stack.wait_for("/orders", key=gold_key)
    stack.compose("down", "-t", "20")
    stack.compose("up", "-d", "--wait", "--wait-timeout", str(UP_TIMEOUT), timeout=UP_TIMEOUT + 60)
    stack.wait_for("/orders", key=gold_key)


def test_every_container_stops_promptly_on_sigterm(stack: Stack) -> None:
    stack.compose("stop", "-t", "30")  # a process that ignores SIGTERM is killed after 30 s: 137
    codes = {}
    for line in stack.compose("ps", "-a", "--format", "{{.Service}} {{.ExitCode}}").splitlines():
        service, code = line.split()
        codes[service] = int(code)
    assert codes, "docker compose ps listed no container"
    killed = {service: code for service, code in codes.items() if code not in (0, 143)}
    assert not killed, f"killed instead of stopping on SIGTERM: {killed}"


def test_the_image_builds_with_no_network_from_a_wheelhouse_of_the_lock(engine: None) -> None:
    """The README's air-gapped build: `make wheelhouse`, then a build that cannot reach PyPI."""
    made = _run(["make", "-s", "wheelhouse"], timeout=600)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    tag = f"sidegate:airgap-test-{os.getpid()}"
    argv = ["docker", "build", "--network", "none", "--build-arg", "PIP_NO_INDEX=1", "-t", tag, "."]
    try:
        built = _run(argv, timeout=900)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        run = ["docker", "run", "--rm", "--network", "none", tag, "sidegate", "envoy-config", "-c", CONFIG_IN_IMAGE]
        ran = _run(run, timeout=120)
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert "static_resources" in ran.stdout  # the built-in example compiles in the image
    finally:
        _run(["docker", "rmi", "-f", tag], timeout=120)
