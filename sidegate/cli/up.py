"""The local stack: Envoy, the sidecar servers and the demo upstream as child processes.

``Stack`` is what ``sidegate up`` runs and what the end-to-end tests start: it checks ports
and files first, compiles the Envoy config, starts every child, waits until each is ready
(Envoy admin ``/ready``, gRPC health, a TCP accept), and stops each one it started, by PID,
Envoy first so no request reaches a stopped sidecar.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from ratelimit import settings as ratelimit_settings
from sidegate import compiler, config, devcerts, meshcerts
from sidegate.compiler import mesh as mesh_compiler
from sidegate.compiler.clusters import sidecar_sockets
from sidegate.config import Gateway, HostPort, UnixSocket
from sidegate.contract import SOCKET_PATH_MAX
from sidegate.demo_grpc import SERVICE as DEMO_GRPC_SERVICE
from sidegate.envoy_bin import envoy_binary
from sidegate.errors import ConfigError, StackError
from sidegate.grpc_h2c.server import unix_listening
from sidegate.probes import all_serving, bind_problem, envoy_ready, grpc_serving, tcp_accepts
from sidegate.restarts import RestartBudget
from sidegate.settings import Settings
from sidegate.watch import FileWatch

SIDECAR_RELOAD_GRACE = 0.3  # seconds sidecars get to load an edited gateway.yaml before Envoy does
MESH_ENVOY = "envoy-"  # a mesh service's sidecar Envoy is the child envoy-<service>


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path | None
    ready: Callable[[], bool] = lambda: True
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        out: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # A session of its own: Ctrl-C reaches ``up``, which stops the children in order. (No
        # preexec_fn: code between fork and exec deadlocked once another thread held a lock.)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env=env,
            start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Stack:
    """The whole local stack for one gateway.yaml.

    ``log_dir=None`` lets the children write to this terminal (``sidegate up``); tests give a
    folder and read ``Child.tail()`` when something fails.
    """

    config_path: Path
    settings: Settings = field(default_factory=Settings)  # for the sidecar servers
    echo: HostPort | None = None
    log_dir: Path | None = None
    children: list[Child] = field(default_factory=list)
    demo_grpc: bool = False  # run the demo gRPC upstream where an API translates to it (sidegate up)

    def __post_init__(self) -> None:
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        sockets = self.settings.socket_dir.absolute() if self.settings.socket_dir is not None else None
        self.settings = replace(self.settings, state_dir=self.settings.state_dir.absolute(), socket_dir=sockets)
        self.gateway: Gateway = self._with_workers(config.load(self.config_path))

    def _with_workers(self, gateway: Gateway) -> Gateway:
        """``gateway`` with each ``unix:`` sidecar's ``workers`` set to the number of processes
        this stack starts behind it, so Envoy gets one endpoint per worker socket (one when
        rate-limit counters are in memory, whatever gateway.yaml says)."""
        update = {}
        for kind in ("authz", "ratelimit", "extproc"):
            sidecar = getattr(gateway.sidecars, kind)
            if isinstance(sidecar.address, UnixSocket):
                kinds = _sidecar_servers(gateway)[sidecar.address]
                update[kind] = sidecar.model_copy(update={"workers": self._workers(kinds, gateway)})
        if not update:
            return gateway
        return gateway.model_copy(update={"sidecars": gateway.sidecars.model_copy(update=update)})

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    # -- what gets started -------------------------------------------------------------

    def sidecar_servers(self) -> dict[HostPort | UnixSocket, list[str]]:
        """Sidecars grouped by address: one server process set per distinct address."""
        return _sidecar_servers(self.gateway)

    def _workers(self, kinds: list[str], gateway: Gateway | None = None) -> int:
        """Rate-limit counters in memory are one set per process: one worker then, never a split.
        Behind a ``unix:`` address, the ``workers`` gateway.yaml gives."""
        gateway = gateway or self.gateway
        if not self.settings.redis_url and ratelimit_settings.counts_in_memory(gateway, kinds):
            return 1
        given = [getattr(gateway.sidecars, kind).workers for kind in kinds]
        return next((n for n in given if n is not None), self.settings.workers)

    def sidecar_sockets(self, address: UnixSocket, kinds: list[str]) -> list[str]:
        """The worker sockets of the server at ``address`` (as Envoy's cluster lists them)."""
        sidecar = getattr(self.gateway.sidecars, kinds[0]).model_copy(update={"address": address, "replicas": ()})
        return sidecar_sockets(sidecar, str(self.settings.sockets))

    @property
    def plain_echo(self) -> HostPort | None:
        """The demo upstream's address, unless a mesh stack has no service on it (its demo
        services are mesh echoes behind their sidecars)."""
        if self.echo is None or self.gateway.mesh is None:
            return self.echo
        endpoints = {ep for service in self.gateway.services.values() for ep in service.endpoints}
        return self.echo if self.echo in endpoints else None

    def demo_grpc_address(self) -> HostPort | None:
        """Where the demo gRPC upstream runs: the first endpoint of the service of an API that
        translates to ``sidegate.demo.v1.Orders``, when ``demo_grpc`` is on; else None."""
        if not self.demo_grpc:
            return None
        for api in self.gateway.apis:
            grpc_spec = api.translate.grpc if api.translate is not None else None
            if grpc_spec is not None and grpc_spec.service == DEMO_GRPC_SERVICE:
                address = self.gateway.services[api.service].endpoints[0]
                return address if address.is_ip else None
        return None

    def _ports(self) -> list[tuple[str, str, int]]:
        ports = [(f"listener {lst.name}", lst.address, lst.port) for lst in self.gateway.listeners]
        ports.append(("envoy admin", self.gateway.admin.address, self.gateway.admin.port))
        servers = self.sidecar_servers().items()
        ports += [(f"sidecar {'+'.join(k)}", a.host, a.port) for a, k in servers if isinstance(a, HostPort)]
        if self.plain_echo is not None:
            ports.append(("demo upstream", self.plain_echo.host, self.plain_echo.port))
        for name, sidecar in self.gateway.mesh.services.items() if self.gateway.mesh else ():
            for what, at in (("app", sidecar.app), ("inbound", sidecar.inbound), ("outbound", sidecar.outbound)):
                ports.append((f"mesh {name} {what}", at.host, at.port))
            ports.append((f"mesh {name} sidecar admin", sidecar.admin.host, sidecar.admin.port))
        demo = self.demo_grpc_address()
        if demo is not None:
            ports.append(("demo gRPC upstream", demo.host, demo.port))
        if self.settings.admin_port:
            authz = self.gateway.sidecars.authz.address
            ports.append(("key admin API", self._host(authz), self.settings.admin_port))
        if self.settings.metrics_port:
            for index, address in enumerate(self.sidecar_servers()):
                ports.append(("sidecar metrics", self._host(address), self.settings.metrics_port + index))
        return ports

    def _host(self, address: HostPort | UnixSocket) -> str:
        """Where a server's TCP ports (key admin, metrics) listen: its host, or ours on sockets."""
        return address.host if isinstance(address, HostPort) else self.settings.host

    def preflight(self) -> None:
        """Refuse to start, with one clear line, when a port is taken or a TLS file missing."""
        for index, listener in enumerate(self.gateway.listeners):
            tls = listener.tls
            if tls is not None and tls.cert is not None and tls.key is not None:
                for key, path in (("cert", tls.cert), ("key", tls.key)):
                    if not os.access(path, os.R_OK):
                        raise StackError(f"{self.config_path}: listeners[{index}].tls.{key}: cannot read {path}")
        seen: set[tuple[str, int]] = set()
        for what, host, port in self._ports():
            if (host, port) in seen:
                raise StackError(f"{what}: port {port} is used twice in this stack")
            seen.add((host, port))
            problem = bind_problem(host, port)
            if problem:
                raise StackError(f"{what}: {host}:{port} {problem}")
        for address, kinds in self.sidecar_servers().items():
            if isinstance(address, UnixSocket):
                for path in self.sidecar_sockets(address, kinds):
                    if len(path.encode()) > SOCKET_PATH_MAX:
                        raise StackError(
                            f"sidecar {'+'.join(kinds)}: unix:{path} is longer than {SOCKET_PATH_MAX} bytes "
                            "(a shorter --state-dir, or an absolute unix: path in gateway.yaml)"
                        )
                    if unix_listening(path):
                        raise StackError(f"sidecar {'+'.join(kinds)}: unix:{path} is already in use")

    def envoy_config(self) -> Path:
        """Write Envoy's bootstrap and the CDS/RDS/LDS files it watches; the bootstrap's path."""
        self._write_xds(self.gateway)
        return self.state_dir / "envoy.json"

    def _write_xds(self, gateway: Gateway, not_before: float = 0.0) -> None:
        """Compile ``gateway`` for every Envoy and write the files, not before the monotonic
        time ``not_before`` (the compile runs meanwhile)."""
        if any(lst.tls is not None and lst.tls.cert is None for lst in gateway.listeners):
            devcerts.ensure(self.state_dir / "tls")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        bootstraps: list[tuple[dict[str, object], Path]] = []
        if gateway.mesh is not None:
            meshcerts.ensure(gateway, self.state_dir)  # before any Envoy reads its SDS files
            for service in gateway.mesh.services:
                folder = meshcerts.identity_dir(self.state_dir, service)
                bootstraps.append((mesh_compiler.sidecar_bootstrap(gateway, service, self.state_dir), folder))
        bootstraps.append(
            (
                compiler.compile_bootstrap(
                    gateway, state_dir=str(self.state_dir), socket_dir=str(self.settings.sockets)
                ),
                self.state_dir,
            )
        )
        time.sleep(max(0.0, not_before - time.monotonic()))
        for bootstrap, folder in bootstraps:
            _write_xds_files(bootstrap, folder)

    def reload(self) -> bool:
        """Apply an edited gateway.yaml to the running Envoy and sidecars; False if it is bad.

        A bad file changes nothing (the error goes to stderr with its FILE:LINE). Envoy gets the
        new clusters and listeners by file without a restart; the sidecar servers get SIGHUP and
        load the file themselves. A change of sidecar addresses needs a restart and says so.
        """
        try:
            with _no_cyclic_gc():
                gateway = self._with_workers(config.load(self.config_path))
        except ConfigError as exc:
            for line in exc.errors:
                print(f"sidegate: not reloaded, the running config stays: {line}", file=sys.stderr, flush=True)
            return False
        if _mesh_topology(gateway) != _mesh_topology(self.gateway):
            print("sidegate: mesh services or addresses changed: restart `sidegate up` to apply them", file=sys.stderr)
            return False
        if _sidecar_topology(gateway) != _sidecar_topology(self.gateway):
            print("sidegate: sidecar addresses changed: restart `sidegate up` to apply them", file=sys.stderr)
            return False
        # Sidecars first, so a new API that Envoy starts routing is one authz already knows:
        # Envoy's files are compiled while they load it, and written once their grace is over.
        for child in self.children:
            if child.name.startswith("sidecars@"):
                child.signal(signal.SIGHUP)
        with _no_cyclic_gc():
            self._write_xds(gateway, not_before=time.monotonic() + SIDECAR_RELOAD_GRACE)
        self.gateway = gateway
        print(f"sidegate: reloaded {self.config_path}", file=sys.stderr, flush=True)
        return True

    def watched(self) -> list[Path]:
        """gateway.yaml and every file the config in force names."""
        return [self.config_path, *self.gateway.files]

    def _log(self, name: str) -> Path | None:
        return None if self.log_dir is None else self.log_dir / f"{name}.log"

    def _children(self, envoy_yaml: Path) -> list[Child]:
        py = sys.executable
        children = []
        echo = self.plain_echo
        if echo is not None:
            argv = [py, "-m", "sidegate", "echo", "--host", echo.host, "--port", str(echo.port)]
            children.append(
                Child("echo", argv, self._log("echo"), functools.partial(tcp_accepts, echo.host, echo.port))
            )
        children += self._mesh_children()
        demo = self.demo_grpc_address()
        if demo is not None:
            argv = [py, "-m", "sidegate", "demo-grpc", "--host", demo.host, "--port", str(demo.port)]
            ready = functools.partial(grpc_serving, str(demo))
            children.append(Child("demo-grpc", argv, self._log("demo-grpc"), ready))
        otlp = self.settings.otlp_endpoint or (
            str(self.gateway.telemetry.otlp) if self.gateway.telemetry.otlp else None
        )
        for index, (address, kinds) in enumerate(self.sidecar_servers().items()):
            if isinstance(address, UnixSocket):
                name = f"sidecars@{Path(address.path).stem}"
                base = address.resolve(self.settings.sockets)
                Path(base).parent.mkdir(parents=True, exist_ok=True)
                listen = {"--socket": base, "--host": self.settings.host}
                ready = functools.partial(all_serving, [f"unix:{p}" for p in self.sidecar_sockets(address, kinds)])
            else:
                name = f"sidecars@{address.port}"
                listen = {"--host": address.host, "--port": str(address.port)}
                ready = functools.partial(grpc_serving, str(address))
            flags = {
                "--sidecars": ",".join(kinds),
                "--config": str(self.config_path.absolute()),
                **listen,
                "--workers": str(self._workers(kinds)),
                "--log-level": self.settings.log_level,
                "--grace": str(self.settings.grace),
                "--drain": str(self.settings.drain),
                "--state-dir": str(self.state_dir),
                "--admin-port": str(self.settings.admin_port if "authz" in kinds else 0),
            }
            if self.settings.redis_url:
                flags["--redis"] = self.settings.redis_url
            if self.settings.metrics_port:
                flags["--metrics-port"] = str(self.settings.metrics_port + index)  # one per server
            if otlp:
                flags["--otlp"] = otlp
            # `up` watches gateway.yaml itself and sends SIGHUP: the servers do not watch too.
            argv = [py, "-m", "sidegate", "serve", "--no-watch", *(part for pair in flags.items() for part in pair)]
            children.append(Child(name, argv, self._log(name), ready))
        argv = [envoy_binary(), "-c", str(envoy_yaml), "--log-level", "warn", "--disable-hot-restart"]
        admin = f"{self.gateway.admin.address}:{self.gateway.admin.port}"
        children.append(Child("envoy", argv, self._log("envoy"), lambda: envoy_ready(admin)))
        return children

    def _mesh_children(self) -> list[Child]:
        """The mesh: a certificate renewer, and per service a demo echo and its sidecar Envoy."""
        mesh = self.gateway.mesh
        if mesh is None:
            return []
        py = sys.executable
        flags = ["--config", str(self.config_path.absolute()), "--state-dir", str(self.state_dir)]
        argv = [py, "-m", "sidegate", "mesh", "certs", *flags, "--watch"]
        children = [Child("mesh-certs", argv, self._log("mesh-certs"))]
        for name, sidecar in mesh.services.items():
            app = sidecar.app
            argv = [py, "-m", "sidegate", "echo", "--host", app.host, "--port", str(app.port)]
            argv += ["--outbound", str(sidecar.outbound)]
            ready = functools.partial(tcp_accepts, app.host, app.port)
            children.append(Child(f"app-{name}", argv, self._log(f"app-{name}"), ready))
            bootstrap = meshcerts.identity_dir(self.state_dir, name) / "envoy.json"
            argv = [envoy_binary(), "-c", str(bootstrap), "--log-level", "warn", "--disable-hot-restart"]
            ready = functools.partial(envoy_ready, str(sidecar.admin))
            children.append(Child(f"{MESH_ENVOY}{name}", argv, self._log(f"envoy-{name}"), ready))
        return children

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        self.preflight()
        envoy_yaml = self.envoy_config()
        env = self.env
        deadline = time.monotonic() + timeout
        try:
            # Envoy last, once its upstreams answer: its first health checks then pass, and it
            # never starts with every sidecar marked unhealthy. The mesh's sidecar Envoys come
            # just before it, for the same reason: they call authz and ratelimit too.
            children = self._children(envoy_yaml)
            proxies = [c for c in children[:-1] if c.name.startswith(MESH_ENVOY)]
            first = [c for c in children[:-1] if c not in proxies]
            for group in (first, proxies, children[-1:]):
                for child in group:
                    self.children.append(child)
                    child.start(env)
                self.wait_ready(group, deadline, timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, children: list[Child], deadline: float, timeout: float) -> None:
        pending = list(children)
        while pending:
            for child in list(pending):
                if not child.alive:
                    code = child.proc.returncode if child.proc else None
                    raise StackError(f"{child.name} exited at start (status {code})" + self._tail_hint(child))
                if child.ready():
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise StackError(f"not ready after {timeout:.0f}s: {names}")
            if pending:
                time.sleep(0.05)

    @staticmethod
    def _tail_hint(child: Child) -> str:
        tail = child.tail(1)
        return f": {tail}" if tail else ""

    def restart(self, child: Child) -> None:
        """Start ``child`` again, as it was started: same argv, ports and log."""
        child.stop()
        child.start(self.env)

    def died(self) -> Child | None:
        return next((c for c in self.children if not c.alive), None)

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def stop(self) -> None:
        """Stop every child this stack started: Envoy first, then sidecars, then the upstream."""
        for child in reversed(self.children):
            child.stop()

    @contextlib.contextmanager
    def running(self, timeout: float = 30.0) -> Iterator[Stack]:
        self.start(timeout)
        try:
            yield self
        finally:
            self.stop()

    # -- for people ----------------------------------------------------------------------

    def banner(self) -> str:
        g = self.gateway
        lines = ["Sidegate is up."]
        for lst in g.listeners:
            scheme = "https" if lst.tls else "http"
            lines.append(f"  {scheme}://{lst.address}:{lst.port}   (listener {lst.name})")
        lines.append(f"  Envoy admin: http://{g.admin.address}:{g.admin.port}")
        for index, (address, kinds) in enumerate(self.sidecar_servers().items()):
            if isinstance(address, UnixSocket):
                paths = self.sidecar_sockets(address, kinds)
                lines.append(f"  sidecars {', '.join(kinds)}: unix:{paths[0]} … ({len(paths)} worker sockets)")
            else:
                lines.append(f"  sidecars {', '.join(kinds)}: grpc://{address}")
            if self.settings.metrics_port:
                metrics = HostPort.model_construct(host=_tcp_host(address), port=self.settings.metrics_port + index)
                lines.append(f"  sidecar metrics ({', '.join(kinds)}): http://{metrics}/metrics")
        if self.settings.admin_port:
            authz = self.gateway.sidecars.authz.address
            admin = HostPort.model_construct(host=_tcp_host(authz), port=self.settings.admin_port)
            lines.append(f"  key admin API: grpc://{admin}")
        if self.plain_echo:
            lines.append(f"  demo upstream (echo): http://{self.plain_echo}")
        for name, sidecar in g.mesh.services.items() if g.mesh else ():
            lines.append(
                f"  mesh service {name}: sidecar mTLS {sidecar.inbound}, "
                f"outbound http://{sidecar.outbound}, demo app http://{sidecar.app}"
            )
        demo = self.demo_grpc_address()
        if demo is not None:
            lines.append(f"  demo gRPC upstream ({DEMO_GRPC_SERVICE}): grpc://{demo}")
        path = example_path(g)
        if path:
            lines.append("Try:")
            for lst in g.listeners:
                if lst.tls and lst.tls.cert is None:
                    ca = self.state_dir / "tls" / "ca.crt"
                    lines.append(f"  curl --cacert {ca} https://{_host(lst.address)}:{lst.port}{path}")
                elif lst.tls is None:
                    lines.append(f"  curl http://{_host(lst.address)}:{lst.port}{path}")
        lines.append("Ctrl-C stops everything.")
        return "\n".join(lines)


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The cyclic collector off while a gateway is loaded and compiled: the trees built are
    plain and acyclic, and a collection pass over them as they grow is a third of the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write_xds_files(bootstrap: dict[str, object], directory: Path) -> None:
    """Write a bootstrap as Envoy's bootstrap file (envoy.json) and the CDS/RDS/LDS files it watches.

    Clusters first, then routes, then listeners: nothing ever names what Envoy lacks yet. A file
    whose text did not change is not written, so Envoy reloads only what changed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    main, files = compiler.file_xds(bootstrap, directory)
    for name, doc in [*files.items(), ("envoy.json", main)]:
        text = compiler.json_text(doc)
        path = directory / name
        if path.exists() and path.read_text() == text:
            continue
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(path)  # a rename: what Envoy's file watch sees


def _sidecar_servers(gateway: Gateway) -> dict[HostPort | UnixSocket, list[str]]:
    servers: dict[HostPort | UnixSocket, list[str]] = {}
    for kind in ("authz", "ratelimit", "extproc"):
        for address in getattr(gateway.sidecars, kind).endpoints:
            servers.setdefault(address, []).append(kind)
    return servers


def _sidecar_topology(gateway: Gateway) -> tuple[tuple[str, ...], ...]:
    return tuple(
        tuple(str(a) for a in getattr(gateway.sidecars, k).endpoints) for k in ("authz", "ratelimit", "extproc")
    )


def _mesh_topology(gateway: Gateway) -> object:
    return None if gateway.mesh is None else gateway.mesh.services


def _tcp_host(address: HostPort | UnixSocket) -> str:
    """Where a sidecar server's TCP ports (metrics, key admin) listen: its host, or loopback for
    a server on Unix sockets."""
    return address.host if isinstance(address, HostPort) else "127.0.0.1"


def _host(address: str) -> str:
    # A wildcard listener is reached on loopback; the dev certificate names 127.0.0.1.
    return "127.0.0.1" if address in ("0.0.0.0", "::") else address  # noqa: S104 - compared, not bound


def example_path(gateway: Gateway) -> str | None:
    """A path a person can GET without credentials, e.g. ``/public/hello``."""
    for api in gateway.apis:
        if api.auth.anonymous and (not api.match.methods or "GET" in api.match.methods):
            return api.match.prefix.rstrip("/") + "/hello"
    return None


def up(stack: Stack, stop_signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> int:
    """Run the stack in the foreground until a signal, or a child that keeps dying; the exit status.

    A child that exits is started again (``sidegate.restarts``); one that keeps exiting stops the
    stack with one line and status 1.

    An edit of gateway.yaml (polled) or a SIGHUP reloads it live (``Stack.reload``).
    """
    stopping: list[int] = []
    hangups: list[int] = []

    def on_signal(sig: int, _frame: object) -> None:
        stopping.append(sig)

    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda sig, _frame: hangups.append(sig))
    try:
        stack.start()
        print(stack.banner(), flush=True)
        # The one watcher of this stack: the sidecar servers run with --no-watch and get SIGHUP.
        watch = FileWatch(stack.watched())
        budgets: dict[str, RestartBudget] = {}  # one per child: Envoy's exits do not count against a sidecar
        while not stopping:
            dead = stack.died()
            if dead is not None:
                code = dead.proc.returncode if dead.proc else None
                budget = budgets.setdefault(dead.name, RestartBudget())
                delay = budget.died()
                if delay is None:
                    print(
                        f"sidegate: {dead.name} keeps exiting ({budget.summary()}, last status {code}); "
                        "stopping the stack",
                        file=sys.stderr,
                    )
                    return 1
                print(f"sidegate: {dead.name} exited (status {code}); starting it again", file=sys.stderr, flush=True)
                time.sleep(delay)
                stack.restart(dead)
                continue
            if hangups or watch.changed():
                hangups.clear()
                watch.reset(watch.paths)  # a bad save is reported once
                if stack.reload():
                    watch.reset(stack.watched())
            time.sleep(0.2)
        return 0
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
