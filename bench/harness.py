"""``sidegate bench``: named scenarios through a real Envoy on loopback, side by side in one run.

Each scenario is a gateway.yaml in ``bench/scenarios/`` compiled by the real compiler and run by
the real ``Stack`` (Envoy, the sidecar server and its workers; a real ``redis-server`` for the
Redis scenarios) on free loopback ports, in front of a stub upstream that costs little (see
``bench/stacks.py``). Per scenario, after a probe request (status and body checked) and a
warm-up:

* **saturation** — h2load for a fixed time on N keep-alive connections: requests/s, and the CPU
  time of every process divided by the requests served (µs per request: Envoy, the sidecar
  server with all its workers, Redis, the upstream, the load generator); the CPU the rest of the
  machine used meanwhile is reported too, since it skews what it overlaps;
* **fixed rate** — ``bench/driver.py`` offers a constant rate (open loop): latency
  p50/p90/p99/p99.9, and every response that is not a 200 counted by status.

Bounded: each load run is killed past its duration + 20 s, and every process started here is
stopped by PID in ``finally``. Output: a table on stdout; results.json, results.md and
results.png in the output folder (``python -m bench.report results.json`` redraws them).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import string
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bench import profiling, report, scale, stacks
from bench.load import (
    BenchError,
    H2load,
    LoadResult,
    RateDriver,
    Request,
    Tick,
    cpu_by_process,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    own_cpu_seconds,
    run_quietly,
)
from sidegate import config
from sidegate.cli.up import Child, Stack
from sidegate.config import HostPort
from sidegate.envoy_bin import envoy_binary
from sidegate.errors import SidegateError
from sidegate.settings import Settings

SCENARIO_DIR = Path(__file__).resolve().with_name("scenarios")
DEFAULT_OUTPUT = Path(".sidegate/bench")
LISTENER = "http"  # the listener name in every scenario template (Envoy's stat prefix)
Upstream = Literal["stub", "echo", "grpc", "none"]  # grpc: the demo gRPC service (sidegate demo-grpc)
Filters = Literal["compiled", "none", "native"]


def _needs_jwt_authz() -> str | None:
    """Why authz cannot check bearer JWTs in this tree, or None when it can."""
    import importlib.util  # noqa: PLC0415 - only this check needs it

    if "issuers" not in config.Gateway.model_fields or importlib.util.find_spec("authz.verifiers") is None:
        return "authz has no bearer-JWT support in this tree (no authz/verifiers/)"
    return None


def _needs_in_authz() -> str | None:
    if "in_authz" in config.RateLimiting.model_fields:
        return None
    return "authz cannot take the rate-limit decision in this tree (no ratelimit.in_authz)"


def _needs_translation() -> str | None:
    if "translate" in config.Api.model_fields:
        return None
    return "XML translation is not implemented yet (no `translate` key in the config model)"


@dataclass(frozen=True)
class Scenario:
    """One named way through the gateway: its gateway.yaml and the request every client sends."""

    name: str
    title: str
    template: str  # a file in bench/scenarios/ (or a name, with ``generate``)
    path: str = "/orders/ord_7Hq2kR9sLm"
    method: Literal["GET", "POST"] = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: Callable[[], bytes] | None = None
    credential: Literal["api_key", "jwt"] | None = None
    upstream: Upstream = "stub"
    filters: Filters = "compiled"
    direct: bool = False  # Envoy answers the API's route itself (direct_response)
    redis: bool = False
    check: Callable[[bytes], str | None] | None = stacks.v2_order_problem
    unavailable: Callable[[], str | None] | None = None  # why it cannot run in this tree
    overrides: tuple[tuple[str, str, object], ...] = ()  # (section, key, value) set in its gateway.yaml
    engine: Literal["extproc", "envoy"] = "extproc"  # $engine in its template: who translates REST ⇄ gRPC
    # East-west: a service calls another through both sidecar Envoys of the mesh, or directly.
    mesh: Literal["sidecars", "direct"] | None = None
    generate: Callable[[], str] | None = None  # the template, made here instead of read from a file
    by_default: bool = True  # run when no --scenarios are named

    @property
    def sidecars(self) -> bool:
        return self.filters == "compiled" and self.mesh is None


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "envoy-direct",
        "bare Envoy answering from a direct_response route (no filters, no upstream)",
        "bare.yaml",
        upstream="none",
        filters="none",
        direct=True,
        check=None,
    ),
    Scenario(
        "envoy-echo",
        "bare Envoy (no filters) → the Python demo upstream (sidegate echo)",
        "bare.yaml",
        upstream="echo",
        filters="none",
        check=None,
    ),
    Scenario("envoy", "bare Envoy (no filters) → stub upstream: the baseline", "bare.yaml", filters="none"),
    Scenario(
        "native",
        "Envoy native jwt_authn (RS256, JWKS inline) + local_ratelimit → stub upstream",
        "bare.yaml",
        credential="jwt",
        filters="native",
    ),
    Scenario("authz", "ext_authz: API key from authz's cache", "authz.yaml", credential="api_key"),
    Scenario(
        "authz-jwt",
        "ext_authz: bearer JWT (RS256, JWKS from the stub upstream)",
        "authz-jwt.yaml",
        credential="jwt",
        unavailable=_needs_jwt_authz,
    ),
    Scenario(
        "authz-rl",
        "ext_authz (API key) + ratelimit (per-consumer limit in Redis)",
        "authz-ratelimit.yaml",
        credential="api_key",
        redis=True,
    ),
    Scenario(
        "full-chain",
        "API key + Redis limit + version by header (api-version: v2, native route)",
        "versions.yaml",
        headers=(("api-version", "v2"),),
        credential="api_key",
        redis=True,
    ),
    Scenario(
        "full-chain-1call",
        "the full chain in one callout: authz takes the Redis rate-limit decision in-process (in_authz)",
        "versions.yaml",
        headers=(("api-version", "v2"),),
        credential="api_key",
        redis=True,
        overrides=(("ratelimit", "in_authz", True),),
        unavailable=_needs_in_authz,
    ),
    Scenario(
        "transform",
        "full chain, v1 served by v2: POST 1 KB JSON, bodies transformed by ext_proc both ways",
        "versions.yaml",
        method="POST",
        headers=(("api-version", "v1"), ("content-type", "application/json")),
        body=stacks.order_v1,
        credential="api_key",
        redis=True,
        check=stacks.v1_order_problem,
    ),
    Scenario(
        "translate",
        "API key + Redis limit + XML client: POST 1 KB XML, JSON upstream, ext_proc translates both ways",
        "translate.yaml",
        method="POST",
        headers=(("content-type", "application/xml"), ("accept", "application/xml")),
        body=stacks.order_xml,
        credential="api_key",
        redis=True,
        check=stacks.xml_order_problem,
        unavailable=_needs_translation,
    ),
    Scenario(
        "rest-grpc",
        "REST → gRPC: GET /orders/o-1 to the demo gRPC service, translated by ext_proc both ways",
        "rest-grpc.yaml",
        path="/orders/o-1",
        upstream="grpc",
        check=stacks.grpc_order_problem,
    ),
    Scenario(
        "rest-grpc-envoy",
        "REST → gRPC as rest-grpc, translated by Envoy's grpc_json_transcoder (engine: envoy, no callout)",
        "rest-grpc.yaml",
        path="/orders/o-1",
        upstream="grpc",
        engine="envoy",
        check=stacks.grpc_order_problem,
    ),
    Scenario(
        "east-west",
        "service → service through two sidecar Envoys: mTLS with SPIFFE identities, rbac (no Python)",
        "east-west.yaml",
        headers=(("host", "payments"),),
        filters="none",
        mesh="sidecars",
    ),
    Scenario(
        "east-west-direct",
        "service → service, the direct call east-west is compared with: no sidecar, no TLS",
        "east-west.yaml",
        filters="none",
        mesh="direct",
    ),
)
# A route at the start and one at the end of a 1,200-API table (3,001 routes): the same kind of
# API (an API key with scopes: Envoy matches the route and calls authz, which looks the API up by
# name), so the difference is what the table's size costs a request. Named with --scenarios.
SCALE_TITLE = "1,200 APIs (bench/scale.py): API key with scopes on the {} scoped API's route ({})"
SCENARIOS += tuple(
    Scenario(
        f"scale-{which}",
        SCALE_TITLE.format(which, path),
        "scale",
        path=f"{path}/orders/ord_7Hq2kR9sLm",
        credential="api_key",
        redis=True,  # the per-consumer limits of the table's other APIs, counted by both workers
        generate=functools.partial(scale.bench_template, 151, 1200),
        by_default=False,
    )
    for which, path in (("first", scale.api_prefix(1)), ("last", scale.api_prefix(scale.last_of_kind(1200, "scoped"))))
)
BY_NAME = {s.name: s for s in SCENARIOS}
QUICK_SECONDS, QUICK_WARMUP = 4.0, 1.0


Layout = Literal["workers", "replicas", "uds"]
LAYOUTS: tuple[Layout, ...] = ("workers", "replicas", "uds")


@dataclass(frozen=True)
class Options:
    seconds: float = 15.0  # per measured phase
    warmup: float = 2.0
    connections: int = 32  # saturation
    rate: int = 1000  # offered requests/s in the fixed-rate phase
    rate_connections: int = 50  # open to carry that rate
    envoy_concurrency: int = 2
    workers: int = 2  # sidecar worker processes
    # How the sidecar workers listen: one TCP port for all (`workers`), a one-worker server on a
    # port each (`replicas`), or a Unix socket each (`uds`). With two or more, every scenario that
    # calls a sidecar runs once per layout, side by side in one table.
    layouts: tuple[Layout, ...] = ("workers",)
    output: Path = DEFAULT_OUTPUT
    scenarios: tuple[str, ...] = tuple(s.name for s in SCENARIOS if s.by_default)
    profile: tuple[str, ...] = ()  # scenarios whose sidecars py-spy samples (in an extra phase)
    quiet: bool = False


# --- progress and Envoy's counters ----------------------------------------------------------


class Progress:
    """A line per scenario, and while a phase runs a status line rewritten in place on a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.label = ""
        self.rate: Callable[[], float | None] = lambda: None
        self._last = 0.0

    def say(self, text: str) -> None:
        if not self.quiet:
            if self.tty:
                sys.stderr.write("\r\033[K")
            print(text, file=sys.stderr, flush=True)

    def phase(self, label: str, rate: Callable[[], float | None]) -> Tick:
        self.label, self.rate, self._last = label, rate, 0.0
        return self.tick

    def tick(self, elapsed: float, total: float) -> None:
        if self.quiet or not self.tty or time.monotonic() - self._last < 1.0:
            return
        self._last = time.monotonic()
        rate = self.rate()
        live = f"  {rate:,.0f} req/s" if rate is not None else ""
        sys.stderr.write(f"\r\033[K  {self.label}: {elapsed:4.1f}/{total:g} s{live}")
        sys.stderr.flush()


class EnvoyStats:
    """Counters from the gateway Envoy's admin endpoint: the live request rate, callouts per phase."""

    PATTERN = (
        r"(downstream_rq_total|ext_authz\.(ok|denied|error)|ratelimit\.(ok|over_limit|error)"
        r"|ext_proc\.streams_started)$"
    )

    def __init__(self, admin: str) -> None:
        self.admin = admin
        self._last: tuple[float, int] | None = None

    def counters(self) -> dict[str, int]:
        url = f"http://{self.admin}/stats?usedonly&filter={urllib.parse.quote(self.PATTERN)}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                text = reply.read().decode()
        except OSError:
            return {}
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def endpoint_calls(self) -> dict[str, int]:
        """Calls Envoy has sent to each endpoint of the sidecar clusters so far, by address
        (``unix:PATH`` for a worker's socket, ``host:port``), summed over the clusters."""
        try:
            with urllib.request.urlopen(f"http://{self.admin}/clusters?format=json", timeout=1.0) as reply:
                doc = json.loads(reply.read())
        except (OSError, ValueError):
            return {}
        out: dict[str, int] = {}
        for cluster in doc.get("cluster_statuses", []):
            if not str(cluster.get("name", "")).startswith("sidegate_"):
                continue
            for host in cluster.get("host_statuses", []):
                address = host.get("address", {})
                if "pipe" in address:
                    where = f"unix:{address['pipe']['path']}"
                else:
                    socket = address.get("socket_address", {})
                    where = f"{socket.get('address')}:{socket.get('port_value')}"
                calls = sum(int(s.get("value", 0)) for s in host.get("stats", []) if s.get("name") == "rq_total")
                out[where] = out.get(where, 0) + calls
        return out

    def live_rate(self) -> float | None:
        total = self.counters().get(f"http.{LISTENER}.downstream_rq_total")
        if total is None:
            return None
        now = time.monotonic()
        last, self._last = self._last, (now, total)
        if last is None or now <= last[0]:
            return None
        return (total - last[1]) / (now - last[0])


def callouts(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls Envoy made to each sidecar during a phase, from its own counters.

    ext_authz counts each check twice (``http.<listener>.ext_authz.*`` and
    ``cluster.<cluster>.ext_authz.*``): only the listener's are taken; the rate limit filter
    counts per cluster only.
    """
    out = {"authz": 0, "ratelimit": 0, "extproc": 0}
    for name, value in after.items():
        delta = value - before.get(name, 0)
        if name.startswith(f"http.{LISTENER}.ext_authz."):
            out["authz"] += delta
        elif name.startswith("cluster.") and ".ratelimit." in name:
            out["ratelimit"] += delta
        elif name.startswith(f"http.{LISTENER}.ext_proc.streams_started"):
            out["extproc"] += delta
    return out


# --- one scenario ---------------------------------------------------------------------------


@dataclass
class Phase:
    """A measured phase: the load's result, CPU seconds per process group, callouts made."""

    load: LoadResult
    cpu: dict[str, float]
    background: float  # CPU seconds the rest of the machine used meanwhile
    callouts: dict[str, int]
    sidecar_processes: list[float]  # CPU seconds of each sidecar process (server, workers)
    sidecar_workers: list[float]  # CPU seconds of each sidecar worker (the server's children)
    endpoint_calls: dict[str, int]  # calls Envoy sent to each sidecar endpoint (a worker's socket)

    def summary(self) -> dict[str, Any]:
        done = self.load.done
        capacity = self.load.seconds * (os.cpu_count() or 1)
        return {
            "rps": round(self.load.rps, 1),
            "requests": done,
            "seconds": round(self.load.seconds, 3),
            "statuses": self.load.statuses,
            "errors": self.load.errors(200),
            "latency_ms": {k: round(v, 3) for k, v in self.load.percentiles().items()},
            "cpu_seconds": {k: round(v, 3) for k, v in self.cpu.items()},
            "cpu_us_per_request": {k: round(v / done * 1e6, 1) if done else 0.0 for k, v in self.cpu.items()},
            # A share of the machine: at most 100, however the windows of the two readings skew.
            "background_cpu_percent": round(min(100.0, 100 * max(0.0, self.background) / capacity), 1)
            if capacity
            else 0.0,
            "callouts_per_request": {k: round(v / done, 3) if done else 0.0 for k, v in self.callouts.items()},
            "sidecar_processes_cpu_seconds": [round(v, 2) for v in self.sidecar_processes],
            "sidecar_workers_cpu_seconds": [round(v, 2) for v in self.sidecar_workers],
            "busiest_worker_cpu_share": _share(self.sidecar_workers),
            "calls_by_endpoint": dict(sorted(self.endpoint_calls.items())),
            "busiest_endpoint_calls_share": _share(list(self.endpoint_calls.values())),
            "command": self.load.command,
        }


def _share(values: list[float] | list[int]) -> float | None:
    """The largest of ``values`` as a share of their sum, when there are two or more to compare."""
    total = sum(values)
    return round(max(values) / total, 3) if len(values) > 1 and total > 0 else None


def replicas_layout(text: str, count: int) -> str:
    """The gateway.yaml with ``count`` single-worker sidecar servers, each on its own port.

    Envoy then spreads calls over them request by request (round robin over the cluster's
    endpoints) instead of the kernel spreading its few HTTP/2 connections over the workers of
    one SO_REUSEPORT port, which can leave a worker idle.
    """
    doc = yaml.safe_load(text)
    extra = [f"127.0.0.1:{free_port()}" for _ in range(count - 1)]
    for sidecar in doc["sidecars"].values():
        sidecar["replicas"] = extra
    return str(yaml.safe_dump(doc, sort_keys=False))


def uds_layout(text: str, count: int) -> str:
    """The gateway.yaml with the sidecars on Unix sockets, one per worker of one server.

    Envoy's cluster lists every worker's socket, so it balances calls over the workers itself,
    as under ``replicas``, with one server process set as under ``workers``.
    """
    doc = yaml.safe_load(text)
    for sidecar in doc["sidecars"].values():
        sidecar["address"] = "unix:sidecars.sock"
        sidecar["workers"] = count
        sidecar.pop("replicas", None)
    return str(yaml.safe_dump(doc, sort_keys=False))


def with_layout(text: str, layout: Layout, workers: int) -> str:
    """The gateway.yaml with its sidecars listening as ``layout`` says (``workers``: as it is)."""
    if layout == "replicas":
        return replicas_layout(text, workers)
    if layout == "uds":
        return uds_layout(text, workers)
    return text


def probe(request: Request, scenario: Scenario, stack: Stack) -> None:
    """One request before the load: the scenario must answer 200 with the document it expects."""
    data = request.body.read_bytes() if request.body is not None else None
    sent = urllib.request.Request(request.url, data=data, headers=dict(request.headers), method=request.method)  # noqa: S310
    try:
        with urllib.request.urlopen(sent, timeout=5.0) as reply:  # noqa: S310 - a loopback URL built here
            status, payload = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    except OSError as exc:
        raise BenchError(f"{scenario.name}: probe request failed: {exc}") from None
    problem = None if status == 200 else f"status {status}: {payload[:200]!r}"
    if problem is None and scenario.check is not None:
        problem = scenario.check(payload)
    if problem is not None:
        logs = ", ".join(str(c.log_path) for c in stack.children if c.log_path)
        raise BenchError(f"{scenario.name}: probe {request.method} {request.url}: {problem} (logs: {logs})")


@dataclass
class Runner:
    """Runs scenarios one after another; owns the Redis every Redis scenario shares."""

    options: Options
    workdir: Path
    h2load: H2load
    progress: Progress
    driver: RateDriver = field(default_factory=RateDriver)
    signer: stacks.Signer = field(default_factory=stacks.Signer.new)
    redis: Child | None = None
    redis_url: str | None = None

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def run(self, scenario: Scenario, layout: Layout = "workers") -> dict[str, Any]:
        reason = scenario.unavailable() if scenario.unavailable else None
        if reason is not None:
            self.progress.say(f"{scenario.name}: skipped: {reason}")
            return {"name": scenario.name, "title": scenario.title, "skipped": reason}
        workdir = self.workdir / (scenario.name if len(self.options.layouts) == 1 else f"{scenario.name}-{layout}")
        workdir.mkdir(parents=True, exist_ok=True)
        if scenario.mesh is not None:
            return self._run_mesh(scenario, workdir)
        ports = {"http": free_port(), "admin": free_port(), "sidecars": free_port(), "upstream": free_port()}
        template = scenario.generate() if scenario.generate else (SCENARIO_DIR / scenario.template).read_text()
        config_path = workdir / "gateway.yaml"
        values = {**ports, "issuer": stacks.ISSUER, "audience": stacks.AUDIENCE, "engine": scenario.engine}
        values["protos"] = str(Path(__file__).resolve().parents[1] / "protos")
        text = string.Template(template).substitute(values)
        if scenario.overrides:
            doc = yaml.safe_load(text)
            for section, key, value in scenario.overrides:
                doc.setdefault(section, {})[key] = value
            text = yaml.safe_dump(doc, sort_keys=False)
        if scenario.sidecars:
            text = with_layout(text, layout, self.options.workers)
        config_path.write_text(text)
        if scenario.redis and self.redis is None:
            self.redis, self.redis_url = stacks.start_redis(workdir)
        settings = Settings(
            state_dir=workdir / "state",
            workers=self.options.workers if layout in ("workers", "uds") else 1,
            log_level="info",
            grace=2.0,
            redis_url=self.redis_url if scenario.redis else None,
            admin_port=0,
        )
        jwks = self.signer.jwks()
        stack = stacks.BenchStack(
            config_path,
            settings,
            echo=HostPort.model_validate(f"127.0.0.1:{ports['upstream']}") if scenario.upstream == "echo" else None,
            log_dir=workdir / "logs",
            post=stacks.post_processing(
                strip=scenario.filters != "compiled",
                native=scenario.filters == "native",
                direct=scenario.direct,
                jwks=jwks,
            ),
            envoy_concurrency=self.options.envoy_concurrency,
            with_sidecars=scenario.sidecars,
        )
        headers = list(scenario.headers)
        if scenario.credential == "api_key":
            headers.append((stack.gateway.api_keys.header, stacks.issue_key(stack.gateway, settings)))
        elif scenario.credential == "jwt":
            headers.append(("authorization", f"Bearer {self.signer.token()}"))
        body = None
        if scenario.body is not None:
            body = workdir / "body.json"
            body.write_bytes(scenario.body())
        url = f"http://127.0.0.1:{ports['http']}{scenario.path}"
        request = Request(url, scenario.method, tuple(headers), body)
        label = f" [{report.LAYOUT_LABEL[layout]}]" if len(self.options.layouts) > 1 and scenario.sidecars else ""
        self.progress.say(f"{scenario.name}{label}: {scenario.title}")
        upstream: Child | None = None
        try:
            upstream = stacks.start_upstream(scenario.upstream, workdir, ports["upstream"], jwks)
            stack.start(timeout=60.0)
            upstream = upstream or next((c for c in stack.children if c.name == "echo"), None)
            probe(request, scenario, stack)
            admin = f"127.0.0.1:{ports['admin']}"
            result = self._measure(
                scenario, stack=stack, upstream=upstream, request=request, admin=admin, workdir=workdir
            )
            return result | {"layout": layout if scenario.sidecars else None}
        finally:
            stack.stop()
            if upstream is not None and upstream not in stack.children:
                upstream.stop()

    def _run_mesh(self, scenario: Scenario, workdir: Path) -> dict[str, Any]:
        """East-west: the load generator is the calling service (orders). Through the mesh it
        sends ``Host: payments`` to orders' outbound listener; directly, to payments itself."""
        names = ("http", "admin", "upstream")
        ports = {name: free_port() for name in names}
        ports |= {f"{s}_{p}": free_port() for s in ("orders", "payments") for p in ("app", "in", "out", "admin")}
        config_path = workdir / "gateway.yaml"
        config_path.write_text(string.Template((SCENARIO_DIR / scenario.template).read_text()).substitute(ports))
        settings = Settings(state_dir=workdir / "state", workers=1, grace=2.0, admin_port=0)
        stack = stacks.MeshBenchStack(
            config_path,
            settings,
            log_dir=workdir / "logs",
            envoy_concurrency=self.options.envoy_concurrency,
            direct=scenario.mesh == "direct",
        )
        to = ports["upstream"] if scenario.mesh == "direct" else ports["orders_out"]
        request = Request(f"http://127.0.0.1:{to}{scenario.path}", scenario.method, scenario.headers, None)
        self.progress.say(f"{scenario.name}: {scenario.title}")
        upstream: Child | None = None
        try:
            upstream = stacks.start_stub_upstream(workdir, ports["upstream"], self.signer.jwks())
            stack.start(timeout=60.0)
            probe(request, scenario, stack)
            admin = f"127.0.0.1:{ports['orders_admin']}"
            return self._measure(
                scenario, stack=stack, upstream=upstream, request=request, admin=admin, workdir=workdir
            )
        finally:
            stack.stop()
            if upstream is not None:
                upstream.stop()

    def _measure(
        self, scenario: Scenario, *, stack: Stack, upstream: Child | None, request: Request, admin: str, workdir: Path
    ) -> dict[str, Any]:
        opts = self.options
        roots = {
            # The gateway's Envoy, or the mesh's sidecar Envoys (envoy-<service>) of east-west.
            "envoy": [_pid(c) for c in stack.children if c.name == "envoy" or c.name.startswith("envoy-")],
            "sidecars": [_pid(c) for c in stack.children if c.name.startswith("sidecars@")],
            "redis": [_pid(self.redis)] if scenario.redis else [],
            "upstream": [_pid(upstream)] if upstream else [],
        }
        stats = EnvoyStats(admin)
        tick = self.progress.phase(f"{scenario.name} warm-up", stats.live_rate)
        self.h2load.run(request, seconds=opts.warmup, connections=opts.connections, workdir=workdir, tick=tick)

        def measured(label: str, load: Callable[[Tick], LoadResult]) -> Phase:
            tick = self.progress.phase(f"{scenario.name} {label}", stats.live_rate)
            counters, calls = stats.counters(), stats.endpoint_calls()
            before, busy, own = cpu_seconds(roots), machine_busy_seconds(), own_cpu_seconds()
            processes = cpu_by_process(roots["sidecars"])
            result = load(tick)
            after = cpu_seconds(roots)
            used = {pid: v - processes.get(pid, 0.0) for pid, v in cpu_by_process(roots["sidecars"]).items()}
            spread = list(used.values())
            workers = [v for pid, v in used.items() if _is_worker(pid)]
            sent = {where: n - calls.get(where, 0) for where, n in stats.endpoint_calls().items()}
            busy, own = machine_busy_seconds() - busy, own_cpu_seconds() - own
            cpu = {group: after[group] - before[group] for group in roots}
            cpu["loadgen"] = result.cpu_seconds
            for child in [*stack.children, *([upstream] if upstream else [])]:
                if not child.alive:
                    raise BenchError(f"{scenario.name}: {child.name} died during the run; see {child.log_path}")
            background = busy - own - sum(cpu.values())
            return Phase(
                result,
                cpu,
                background,
                callouts(counters, stats.counters()),
                sorted(spread, reverse=True),
                sorted(workers, reverse=True),
                sent,
            )

        saturation = measured(
            "saturation",
            lambda tick: self.h2load.run(
                request, seconds=opts.seconds, connections=opts.connections, workdir=workdir, tick=tick
            ),
        )
        fixed = measured(
            f"{opts.rate} req/s",
            lambda tick: self.driver.run(
                request,
                rate=opts.rate,
                seconds=opts.seconds,
                connections=opts.rate_connections,
                workdir=workdir,
                tick=tick,
            ),
        )
        result: dict[str, Any] = {
            "name": scenario.name,
            "title": scenario.title,
            "skipped": None,
            "request": {"method": scenario.method, "path": scenario.path, "headers": [h for h, _ in scenario.headers]},
            "saturation": saturation.summary(),
            "fixed_rate": fixed.summary() | {"offered_rps": opts.rate},
        }
        if scenario.name in opts.profile and roots["sidecars"]:
            self.progress.phase(f"{scenario.name} profile (py-spy)", stats.live_rate)
            result["profile"] = profiling.record(
                roots["sidecars"][0],
                opts.seconds,
                workdir / "profile.txt",
                lambda: self.h2load.run(request, seconds=opts.seconds, connections=opts.connections, workdir=workdir),
            )
            self.progress.say(profiling.text(result["profile"]))
        sat, fix = result["saturation"], result["fixed_rate"]
        p50, p99 = fix["latency_ms"].get("p50", 0.0), fix["latency_ms"].get("p99", 0.0)
        self.progress.say(
            f"  {sat['rps']:,.0f} req/s at saturation; at {opts.rate} req/s p50 {p50:.2f} ms, p99 {p99:.2f} ms;"
            f" errors {sat['errors'] or 0} / {fix['errors'] or 0}; other CPU {sat['background_cpu_percent']}%"
        )
        return result


def _is_worker(pid: int) -> bool:
    """Whether ``pid`` is a sidecar worker: a process the kernel's supervisor spawned (not the
    supervisor itself, nor multiprocessing's resource tracker)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _pid(child: Child | None) -> int:
    assert child is not None
    assert child.proc is not None
    return child.proc.pid


# --- the whole run ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    envoy = run_quietly([envoy_binary(), "--version"])
    version = re.search(r"version: \S+?/(\d+\.\d+\.\d+)", envoy)
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": version.group(1) if version else envoy[:80],
    }


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops what it started."""

    def interrupt(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(options: Options, command: str) -> dict[str, Any]:
    """Run the scenarios and write results.json/.md/.png into ``options.output``; the report."""
    unknown = [name for name in options.scenarios if name not in BY_NAME]
    if unknown:
        raise BenchError(f"unknown scenario {unknown[0]!r} (known: {', '.join(BY_NAME)})")
    output = options.output.absolute()
    output.mkdir(parents=True, exist_ok=True)
    progress = Progress(options.quiet)
    h2load = H2load.find()
    started = time.time()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="run-", dir=output) as tmp, _sigterm_stops():
        runner = Runner(options, Path(tmp), h2load, progress)
        try:
            for name in options.scenarios:
                scenario = BY_NAME[name]
                for layout in options.layouts if scenario.sidecars else options.layouts[:1]:
                    results.append(runner.run(scenario, layout))
        finally:
            runner.stop()
            _keep_logs(Path(tmp), output / "logs")
    doc = {
        "command": command,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": machine(),
        "settings": {
            "load_generator": f"{h2load.version()} (saturation), bench/driver.py (fixed rate, open loop)",
            "protocol": "HTTP/1.1 keep-alive, plaintext, loopback",
            "phase_seconds": options.seconds,
            "warmup_seconds": options.warmup,
            "saturation_connections": options.connections,
            "fixed_rate_rps": options.rate,
            "fixed_rate_connections": options.rate_connections,
            "envoy_concurrency": options.envoy_concurrency,
            "sidecar_workers": options.workers,
            "sidecar_layouts": list(options.layouts),
            "upstream": (
                "a stub Envoy (1 worker thread) answering a 1 KB JSON document itself;"
                " for rest-grpc*, the demo gRPC service (grpc.aio, one Python process)"
            ),
            "baseline": report.BASELINE,
        },
        "scenarios": results,
    }
    report.add_ratios(doc)
    doc["targets"] = report.targets(doc)
    report.write(doc, output)
    return doc


def _keep_logs(tmp: Path, logs: Path) -> None:
    """Keep each scenario's process logs, gateway.yaml, Envoy bootstrap and profile (not its keys)."""
    shutil.rmtree(logs, ignore_errors=True)
    wanted = [*tmp.glob("*/logs/*.log"), *tmp.glob("*/gateway.yaml"), *tmp.glob("*/state/bench-envoy*.yaml")]
    wanted += [*tmp.glob("*/profile.txt"), *tmp.glob("*/stub-upstream.yaml"), *tmp.glob("*/redis.log")]
    for path in wanted:
        scenario = path.relative_to(tmp).parts[0]
        target = logs / scenario / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(
        prog="sidegate bench",
        description="Load-test named scenarios through a real Envoy on loopback (bench/harness.py).",
        allow_abbrev=False,
    )
    p.add_argument(
        "--quick", action="store_true", help=f"{QUICK_SECONDS:g} s phases, the whole run < 3 min (make bench)"
    )
    p.add_argument("--seconds", type=float, help=f"seconds per measured phase (default {d.seconds:g})")
    p.add_argument("--scenarios", "-s", help=f"comma list (default all): {','.join(BY_NAME)}")
    p.add_argument("--connections", type=int, default=d.connections, help=f"saturation connections ({d.connections})")
    p.add_argument("--rate", type=int, default=d.rate, help=f"offered requests/s of the fixed-rate phase ({d.rate})")
    p.add_argument(
        "--rate-connections", type=int, default=d.rate_connections, help=f"at that rate ({d.rate_connections})"
    )
    p.add_argument(
        "--envoy-concurrency", type=int, default=d.envoy_concurrency, help=f"Envoy workers ({d.envoy_concurrency})"
    )
    p.add_argument("--workers", type=int, default=d.workers, help=f"sidecar worker processes ({d.workers})")
    p.add_argument(
        "--layout",
        default=",".join(d.layouts),
        help="how the sidecar workers listen, a comma list run side by side: workers (one TCP port),"
        " replicas (a one-worker server on a port each), uds (a Unix socket each); e.g. workers,uds",
    )
    p.add_argument("--output", "-o", type=Path, default=d.output, help=f"results folder ({d.output})")
    p.add_argument("--profile", default="", help="comma list of scenarios whose sidecars py-spy samples afterwards")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    return p


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (value or "").split(",") if n.strip())


def _layouts(value: str) -> tuple[Layout, ...]:
    names = _names(value)
    unknown = [name for name in names if name not in LAYOUTS]
    if unknown or not names:
        raise BenchError(f"--layout: {unknown[0] if unknown else value!r} is not one of {', '.join(LAYOUTS)}")
    return tuple(next(known for known in LAYOUTS if known == name) for name in dict.fromkeys(names))


def options_from(args: argparse.Namespace) -> Options:
    d = Options()
    return Options(
        seconds=args.seconds or (QUICK_SECONDS if args.quick else d.seconds),
        warmup=QUICK_WARMUP if args.quick else d.warmup,
        connections=args.connections,
        rate=args.rate,
        rate_connections=args.rate_connections,
        envoy_concurrency=args.envoy_concurrency,
        workers=args.workers,
        layouts=_layouts(args.layout),
        output=args.output,
        scenarios=_names(args.scenarios) or d.scenarios,
        profile=_names(args.profile),
        quiet=args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``sidegate bench``: 0 after a run (a missed target is reported, not an error), 1 when it fails."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    command = " ".join(["sidegate bench", *(shlex.quote(a) for a in argv)])
    try:
        doc = run(options_from(args), command)
    except SidegateError as exc:
        print(f"sidegate bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sidegate bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    print(report.table(doc))
    print()
    print(report.targets_text(doc))
    east_west = report.east_west_text(doc)
    if east_west is not None:
        print(f"\n{east_west}")
    out = args.output
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}; logs in {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
