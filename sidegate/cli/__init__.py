"""The ``sidegate`` command.

    sidegate up --config F            the whole stack on this machine, until Ctrl-C
    sidegate check F                  validate gateway.yaml and Envoy's view of the compiled config
    sidegate envoy-config --config F  print the compiled Envoy bootstrap (YAML)
    sidegate mesh-config --config F --service X   print the bootstrap of X's mesh sidecar Envoy
    sidegate mesh certs --config F    issue (and with --watch, renew) the mesh certificates
    sidegate mesh inject --config F --service X deployment.yaml   add X's mesh sidecar to a Deployment
    sidegate serve --sidecars a,b     run sidecars on the server kernel (N workers, one port or a socket each)
    sidegate health --sidecars a,b    exit 0 when that server's every worker answers gRPC health (probes)
    sidegate ratelimit --reference-config DIR   serve a folder of envoyproxy/ratelimit configs
    sidegate keys --config F …        manage API keys (see authz/cli.py)
    sidegate echo                     run the demo upstream
    sidegate demo-grpc                run the demo gRPC upstream (sidegate.demo.v1.Orders)
    sidegate descriptors F.proto …    compile .proto files into a descriptor set (gRPC translation)
    sidegate bench [--quick] …        load-test scenarios through Envoy (code in bench/, run from a clone)

Exit status: 0 ok, 1 runtime failure, 2 bad config or flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from sidegate import compiler, config, contract
from sidegate.compiler import mesh as mesh_compiler
from sidegate.config import HostPort
from sidegate.envoy_bin import envoy_binary
from sidegate.errors import ConfigError, SettingsError, SidegateError
from sidegate.settings import Settings, from_gateway

# The offline commands (check, envoy-config) import only the config model and the compiler:
# a big gateway's compile is timed with the command. The others import what they run (the
# sidecars, their stores, the demo upstreams) where they run it.
OFFLINE = ("check", "envoy-config")

DEFAULT_ECHO = "127.0.0.1:9080"


def _config_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", "-c", type=Path, required=required, help="gateway.yaml")


def _mesh_parsers(sub: Any) -> None:
    """``mesh-config`` and ``mesh certs|inject``."""
    mesh_config = sub.add_parser("mesh-config", help="print the bootstrap of a mesh service's sidecar Envoy")
    _config_arg(mesh_config)
    mesh_config.add_argument("--service", required=True, help="a service of mesh.services")
    mesh_config.add_argument("--state-dir", type=Path, default=Path(".sidegate"), help="mesh certificates (.sidegate)")
    mesh_config.add_argument("--output", "-o", type=Path, help="write to this file instead of stdout")

    mesh = sub.add_parser("mesh", help="the service mesh: certificates, Kubernetes injection")
    mesh_sub = mesh.add_subparsers(dest="mesh_command", required=True)
    certs = mesh_sub.add_parser("certs", help="issue the mesh certificates that are missing or half expired")
    _config_arg(certs)
    certs.add_argument("--state-dir", type=Path, default=Path(".sidegate"), help="where they are written (.sidegate)")
    certs.add_argument("--force", action="store_true", help="issue every certificate again now (a rotation)")
    certs.add_argument("--watch", action="store_true", help="keep renewing them until stopped")
    certs.add_argument("--service", help="only this identity (a service's pod); default: every one")
    inject = mesh_sub.add_parser("inject", help="add a mesh service's sidecar Envoy to a Kubernetes Deployment")
    _config_arg(inject)
    inject.add_argument("--service", required=True, help="the Deployment's service, a key of mesh.services")
    inject.add_argument("deployment", type=Path, help="the Deployment's YAML file")


def _top() -> tuple[argparse.ArgumentParser, Any]:
    top = argparse.ArgumentParser(
        prog="sidegate", description="Envoy + Python sidecars: an API gateway.", allow_abbrev=False
    )
    return top, top.add_subparsers(dest="command", required=True)


def _offline_parsers(sub: Any) -> None:
    """``check`` and ``envoy-config``."""
    check = sub.add_parser("check", help="validate a gateway.yaml (and Envoy's view of it)")
    check.add_argument("file", type=Path, nargs="?")
    _config_arg(check, required=False)

    envoy = sub.add_parser("envoy-config", help="print the Envoy bootstrap compiled from gateway.yaml")
    _config_arg(envoy)
    envoy.add_argument("--state-dir", default=".sidegate", help="where TLS files are looked up (.sidegate)")
    envoy.add_argument("--output", "-o", type=Path, help="write to this file instead of stdout")
    envoy.add_argument("--listen-address", help="bind every listener here instead (0.0.0.0 in containers)")
    envoy.add_argument(
        "--socket-dir", help="where relative unix: sidecar addresses are (default: --state-dir; a container's volume)"
    )


def offline_parser() -> argparse.ArgumentParser:
    """The parser of the OFFLINE commands alone."""
    top, sub = _top()
    _offline_parsers(sub)
    return top


def parser() -> argparse.ArgumentParser:
    from sidegate import health, serving  # noqa: PLC0415 - see OFFLINE

    top, sub = _top()

    up = sub.add_parser("up", help="run the whole stack on this machine until Ctrl-C")
    _config_arg(up)
    up.add_argument("--state-dir", type=Path, default=None, help="key store, dev certs, compiled config (state.dir)")
    up.add_argument("--workers", type=int, default=None, help="sidecar worker processes (default: CPU count)")
    up.add_argument("--echo", help=f"demo upstream address (default up.echo, else {DEFAULT_ECHO})")
    up.add_argument("--no-echo", action="store_true", help="do not start the demo upstream")
    up.add_argument(
        "--no-demo-grpc",
        action="store_true",
        help="do not start the demo gRPC upstream (started when an API translates to sidegate.demo.v1.Orders)",
    )
    up.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    up.add_argument("--redis", dest="redis_url", help="Redis URL (default: embedded key store, in-memory limits)")
    up.add_argument("--admin-port", type=int, help="key-management gRPC API port (up.key_admin_port; 9002; 0 = off)")
    up.add_argument("--metrics-port", type=int, help="sidecar Prometheus /metrics (up.metrics_port; 9464; 0 = off)")

    _offline_parsers(sub)
    _mesh_parsers(sub)

    serve = sub.add_parser("serve", help="run sidecars on the server kernel")
    serve.add_argument("--sidecars", default=",".join(contract.SIDECARS), help="comma list (default: all three)")
    serving.add_serve_args(serve)

    probe = sub.add_parser(
        "health", help="exit 0 when every worker of `sidegate serve` (same flags) answers gRPC health, else 1"
    )
    health.add_arguments(probe)

    from authz import cli as authz_cli  # noqa: PLC0415 - see OFFLINE
    from ratelimit import cli as ratelimit_cli  # noqa: PLC0415

    limits = sub.add_parser("ratelimit", help="the rate-limit service alone (envoyproxy/ratelimit configs too)")
    serving.add_serve_args(limits)
    ratelimit_cli.add_arguments(limits)

    authz_cli.add_parser(sub)

    demo = sub.add_parser("echo", help="run the demo echo upstream")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9080)
    demo.add_argument("--outbound", help="a mesh sidecar's outbound host:port: follow x-mesh-call through it")

    orders = sub.add_parser("demo-grpc", help="run the demo gRPC upstream (sidegate.demo.v1.Orders)")
    orders.add_argument("--host", default="127.0.0.1")
    orders.add_argument("--port", type=int, default=9090)

    descriptors = sub.add_parser("descriptors", help="compile .proto files into a FileDescriptorSet")
    descriptors.add_argument("protos", type=Path, nargs="+", help=".proto files")
    descriptors.add_argument("-I", "--proto-path", type=Path, action="append", default=[], help="import folder")
    descriptors.add_argument("--output", "-o", type=Path, required=True, help="the descriptor set file to write")

    # Every argument goes to bench/harness.py's own parser (no prefix chars: nothing is an option here).
    bench = sub.add_parser("bench", help="load-test scenarios through Envoy", add_help=False, prefix_chars="\0")
    bench.add_argument("bench_args", nargs="*")
    return top


def _check(path: Path) -> int:
    from extproc import grpc_translate  # noqa: PLC0415 - see OFFLINE
    from sidegate import devcerts, meshcerts  # noqa: PLC0415

    gateway = config.load(path)
    config.verify(gateway, grpc_translate.problems(gateway))  # extproc's own check, as at its start
    with tempfile.TemporaryDirectory(prefix="sidegate-check-") as tmp:
        devcerts.ensure(Path(tmp) / "tls")  # stand-ins for the dev certificate `up` would make
        # Stand-ins for the mesh certificates too, from a development CA: the operator's CA may
        # live where only the cluster has it.
        stand_in = gateway.mesh.model_copy(update={"ca": None}) if gateway.mesh else None
        meshcerts.ensure(gateway.model_copy(update={"mesh": stand_in}), Path(tmp))
        # The same bootstrap as envoy-config prints, in JSON: Envoy reads it several times faster.
        edge = compiler.json_text(compiler.compile_bootstrap(gateway, state_dir=tmp))
        bootstraps = {("the compiled config", "envoy.json"): edge}
        for service in gateway.mesh.services if gateway.mesh else ():
            text = mesh_compiler.render(gateway, service, source=str(path), state_dir=Path(tmp))
            bootstraps[(f"the mesh sidecar of {service}", "envoy.yaml")] = text
        for (what, name), text in bootstraps.items():
            bootstrap = Path(tmp) / name
            bootstrap.write_text(text)
            reason = _envoy_rejects(bootstrap)
            if reason is not None:
                print(f"{path}: Envoy rejects {what}: {reason}", file=sys.stderr)
                return 2
    for where, variable in gateway.secret_variables:
        if not os.environ.get(variable):
            print(f"{path}: warning: " + UNSET_ENV_WARNING.format(where=where, variable=variable), file=sys.stderr)
    print(f"{path}: ok ({len(gateway.apis)} apis, {len(gateway.services)} services; Envoy validates it)")
    return 0


UNSET_ENV_WARNING = "{where}: environment variable {variable} is not set (the sidecars will not start without it)"


def _envoy_rejects(bootstrap: Path) -> str | None:
    """Why ``envoy --mode validate`` refuses ``bootstrap`` (its last line), or None."""
    argv = [envoy_binary(), "--mode", "validate", "-c", str(bootstrap), "--disable-hot-restart"]
    result = subprocess.run([*argv, "--log-level", "critical"], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return None
    reason = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["?"])[-1]
    return reason if len(reason) <= 300 else reason[:300] + " …"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in OFFLINE:
        # One pass over a tree of plain dicts that lives until exit: the cyclic collector would
        # scan it again and again while it grows (~a third of a big gateway's compile) for nothing.
        gc.disable()
    args = (offline_parser() if argv[:1] and argv[0] in OFFLINE else parser()).parse_args(argv)
    try:
        if args.command not in OFFLINE:
            return _online(args)
        if args.command == "check":
            path = args.file or args.config
            if path is None:
                raise SettingsError("check needs a gateway.yaml: sidegate check FILE")
            return _check(path)
        if args.command == "envoy-config":
            text = compiler.render(
                config.load(args.config),
                source=str(args.config),
                state_dir=args.state_dir,
                listen_address=args.listen_address,
                socket_dir=args.socket_dir,
            )
            if args.output:
                args.output.write_text(text)
            else:
                sys.stdout.write(text)
            return 0
        raise AssertionError(args.command)
    except SidegateError as exc:
        return _refused(exc, "sidegate")


def _refused(exc: SidegateError, who: str) -> int:
    """A refusal a person reads: a bad gateway.yaml's one line per problem, else ``who: reason``;
    the error's exit status."""
    if isinstance(exc, ConfigError):
        for line in exc.errors:
            print(line, file=sys.stderr)
    else:
        print(f"{who}: {exc}", file=sys.stderr)
    return exc.exit_code


def _online(args: argparse.Namespace) -> int:
    """Every command but the OFFLINE ones, with the imports it needs."""
    from authz import cli as authz_cli  # noqa: PLC0415 - see OFFLINE
    from sidegate import demo_grpc, echo, logs  # noqa: PLC0415
    from sidegate.cli import up  # noqa: PLC0415

    if args.command == "mesh-config":
        text = mesh_compiler.render(
            config.load(args.config), args.service, source=str(args.config), state_dir=args.state_dir
        )
        if args.output:
            args.output.write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    if args.command == "mesh":
        return _mesh(args)
    if args.command == "serve":
        names = [name.strip() for name in args.sidecars.split(",") if name.strip()]
        return _serve(names, args)
    if args.command == "health":
        from sidegate import health  # noqa: PLC0415 - see OFFLINE

        return health.run(args)
    if args.command == "ratelimit":
        return _ratelimit(args)
    if args.command == "keys":
        return authz_cli.run(args)
    if args.command == "echo":
        logs.setup("echo")
        return _until_stopped(echo.serve(args.host, args.port, outbound=args.outbound))
    if args.command == "demo-grpc":
        logs.setup("demo-grpc")
        return _until_stopped(demo_grpc.serve(args.host, args.port))
    if args.command == "bench":
        return _bench(args.bench_args)
    if args.command == "descriptors":
        return _descriptors(args.protos, args.proto_path or [Path()], args.output)
    if args.command == "up":
        gateway = config.load(args.config)
        settings = Settings.from_env(
            base=from_gateway(gateway, up=True),
            state_dir=args.state_dir,
            workers=args.workers,
            log_level=args.log_level,
            redis_url=args.redis_url,
            admin_port=args.admin_port,
            metrics_port=args.metrics_port,
        )
        echo_at = _host_port(args.echo) if args.echo else gateway.up.echo or _host_port(DEFAULT_ECHO)
        address = None if args.no_echo else echo_at
        return up.up(up.Stack(args.config, settings, echo=address, demo_grpc=not args.no_demo_grpc))
    raise AssertionError(args.command)


def _until_stopped(serve: Coroutine[Any, Any, None]) -> int:
    """Run a demo server until SIGTERM or SIGINT, then return 0.

    As PID 1 in a container a process has no default action for SIGTERM, so without a handler
    `docker compose stop` would wait out its grace period and kill it.
    """

    async def run() -> None:
        task = asyncio.ensure_future(serve)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    return 0


def _mesh(args: argparse.Namespace) -> int:
    """``sidegate mesh certs``: issue what is missing or half expired, once or until stopped;
    ``sidegate mesh inject``: a Deployment with a mesh sidecar, on stdout."""
    from sidegate import meshcerts  # noqa: PLC0415 - see OFFLINE
    from sidegate.cli import mesh_inject  # noqa: PLC0415

    gateway = config.load(args.config)
    if gateway.mesh is None:
        raise SettingsError(f"{args.config}: no mesh: section")
    if args.mesh_command == "inject":
        sys.stdout.write(mesh_inject.inject_text(args.deployment.read_text(), gateway, args.service))
        return 0
    if not args.watch:
        renewed = meshcerts.ensure(gateway, args.state_dir, force=args.force, only=args.service)
        print(f"issued: {', '.join(renewed)}" if renewed else "every mesh certificate is current")
        return 0
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: stopping.append(number))
    meshcerts.ensure(gateway, args.state_dir, force=args.force, only=args.service)
    meshcerts.watch(lambda: config.load(args.config), args.state_dir, lambda: bool(stopping), args.service)
    return 0


def _descriptors(protos: Sequence[Path], proto_path: Sequence[Path], output: Path) -> int:
    from sidegate import protoc  # noqa: PLC0415 - see OFFLINE

    try:
        files = protoc.compile_set(protos, proto_path)
    except protoc.ProtoError as exc:
        print(f"sidegate: {exc}", file=sys.stderr)
        return 2
    output.write_bytes(files.SerializeToString())
    print(f"{output}: {len(files.file)} files ({', '.join(f.name for f in files.file)})")
    return 0


def _bench(argv: Sequence[str]) -> int:
    """``sidegate bench``: the harness lives in the source tree's bench/, which is not installed."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "harness.py").exists():
        raise SettingsError("sidegate bench runs from a source clone (bench/ is not installed)")
    sys.path.insert(0, str(root))
    from bench import harness  # noqa: PLC0415 - only this command needs it

    return harness.main(argv)


def _host_port(value: str) -> HostPort:
    try:
        return HostPort.model_validate(value)
    except ValueError:
        raise SettingsError(f"not host:port: {value!r}") from None


def _serve(names: Sequence[str], args: argparse.Namespace) -> int:
    from ratelimit import settings as ratelimit_settings  # noqa: PLC0415 - see OFFLINE
    from sidegate import logs, server, serving  # noqa: PLC0415

    settings = serving.serve_settings(args, names)
    if settings.config is not None and ratelimit_settings.counts_in_memory(config.load(settings.config), names):
        problem = ratelimit_settings.memory_workers_problem(settings.workers, settings.redis_url)
        if problem is not None:
            raise SettingsError(problem)
    logs.setup("+".join(names), settings.log_level)
    return server.run(settings, names)


def _ratelimit(args: argparse.Namespace) -> int:
    """``sidegate ratelimit`` and ``python -m ratelimit``: see ratelimit/cli.py."""
    from ratelimit import cli as ratelimit_cli  # noqa: PLC0415 - see OFFLINE
    from sidegate import logs, server, serving  # noqa: PLC0415

    settings = ratelimit_cli.settings_for(
        args, serving.serve_settings(args, ["ratelimit"]), ratelimit_cli.environment()
    )
    logs.setup("ratelimit", settings.log_level)
    return server.run(settings, ["ratelimit"])


def serve_main(names: Sequence[str], argv: Sequence[str] | None = None) -> int:
    """``python -m authz`` and friends: ``sidegate serve`` for one sidecar."""
    from sidegate import serving  # noqa: PLC0415 - see OFFLINE

    single = argparse.ArgumentParser(prog=f"python -m {names[0]}", allow_abbrev=False)
    serving.add_serve_args(single)
    args = single.parse_args(argv)
    try:
        return _serve(names, args)
    except SidegateError as exc:
        return _refused(exc, names[0])
