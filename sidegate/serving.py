"""Where a sidecar server listens: the flags `sidegate serve` and its probe take, the settings
they make and the gRPC targets those settings serve.

Kept apart from ``sidegate.cli`` so that the probe (``python -m sidegate.health``, run every few
seconds by Docker and Kubernetes) imports only what it needs: the config model, the settings
and gRPC, not every sidecar.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sidegate import config, contract
from sidegate.contract import worker_socket
from sidegate.errors import SettingsError
from sidegate.settings import ENV, LISTEN, Settings, from_gateway, listen_from_gateway, socket_gid


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a sidecar server (``sidegate serve``, ``sidegate ratelimit``) and its probe."""
    parser.add_argument("--config", "-c", type=Path, required=False, help="gateway.yaml")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 9001)")
    parser.add_argument(
        "--socket", type=Path, help="listen on Unix sockets instead: worker N on <stem>-N.sock beside this path"
    )
    parser.add_argument(
        "--socket-dir", type=Path, help="where gateway.yaml's relative unix: addresses are (default: the state dir)"
    )
    parser.add_argument(
        "--socket-group", help="give the sockets to this group, mode 0660 (for an Envoy running as another user)"
    )
    parser.add_argument("--workers", type=int, help="worker processes (default: CPU count)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--grace", type=float, help="seconds in-flight calls get after SIGTERM (default 10)")
    parser.add_argument("--drain", type=float, help="seconds to report NOT_SERVING before closing (default 0)")
    parser.add_argument("--state-dir", type=Path, help="embedded key store and generated secrets (.sidegate)")
    parser.add_argument("--redis", dest="redis_url", help="Redis URL: shared key store and rate-limit counters")
    parser.add_argument("--admin-port", type=int, help="key-management gRPC API port (default 9002; 0 = off)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 0 = off)")
    parser.add_argument("--otlp", dest="otlp_endpoint", help="OTLP/gRPC collector for traces (host:port)")
    parser.add_argument(
        "--no-watch", dest="watch", action="store_false", default=None, help="reload on SIGHUP only, not on edits"
    )


def sidecar_names(value: str) -> list[str]:
    """``--sidecars a,b`` as names, each one we know; ``SettingsError`` for one we do not."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in contract.SIDECARS]
    if unknown:
        raise SettingsError(f"unknown sidecar {unknown[0]!r} (choose from {', '.join(contract.SIDECARS)})")
    return names


def serve_settings(
    args: argparse.Namespace, names: Sequence[str], environ: Mapping[str, str] | None = None
) -> Settings:
    """The settings of a server of ``names`` (``serve``, ``health``, ``ratelimit``): defaults,
    then gateway.yaml's, then SIDEGATE_* (from ``environ``, else this process's), then flags.
    Where it listens, when no flag or variable gives a port or a socket, is where gateway.yaml
    tells Envoy to find those sidecars (``settings.listen_from_gateway``)."""
    env = dict(os.environ if environ is None else environ)
    sidecar_names(",".join(names))
    path = args.config or Settings.from_env(env).config  # gateway.yaml's state: section comes first
    gateway = config.load(path) if path is not None else None
    base = from_gateway(gateway) if gateway is not None else {}
    settings = _settings_over(args, base, env)

    def given(key: str) -> bool:
        return getattr(args, key) is not None or bool(env.get(ENV[key]))

    if gateway is not None and not any(given(key) for key in LISTEN):
        listen = listen_from_gateway(gateway, names, settings.sockets)
        if given("host"):  # the interface for a TCP port, and for the key-admin API and metrics
            listen.pop("host", None)
        settings = _settings_over(args, base | listen, env)
    socket_gid(settings.socket_group)  # an unknown group is a bad setting: say so before any worker starts
    return settings


def _settings_over(args: argparse.Namespace, base: dict[str, Any], environ: dict[str, str]) -> Settings:
    return Settings.from_env(
        environ,
        base=base,
        config=args.config,
        host=args.host,
        port=args.port,
        socket=args.socket,
        socket_dir=args.socket_dir,
        socket_group=args.socket_group,
        workers=args.workers,
        log_level=args.log_level,
        grace=args.grace,
        drain=args.drain,
        state_dir=args.state_dir,
        redis_url=args.redis_url,
        admin_port=args.admin_port,
        metrics_port=args.metrics_port,
        otlp_endpoint=args.otlp_endpoint,
        watch=args.watch,
    )


def targets(settings: Settings) -> list[str]:
    """The gRPC targets a server with ``settings`` answers on: every worker's socket, or its
    port (a wildcard host is reached on loopback)."""
    if settings.socket is not None:
        return [f"unix:{worker_socket(str(settings.socket), n)}" for n in range(settings.workers)]
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host  # noqa: S104 - compared
    return [f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"]
