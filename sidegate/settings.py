"""Process settings: where to listen, how many workers, where state lives.

Settings come from the environment (``SIDEGATE_*``) once at start, and flags override them.
Policy lives in gateway.yaml, never here; its ``state:`` and ``up:`` sections (``from_gateway``)
give the defaults the environment and flags override, so every command that reads one
gateway.yaml finds the same key store and pepper.
"""

from __future__ import annotations

import grp
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidegate.config.values import HostPort
from sidegate.errors import SettingsError

if TYPE_CHECKING:
    from sidegate.config import Gateway

ENV = {
    "config": "SIDEGATE_CONFIG",
    "host": "SIDEGATE_HOST",
    "port": "SIDEGATE_PORT",
    "socket": "SIDEGATE_SOCKET",
    "socket_dir": "SIDEGATE_SOCKET_DIR",
    "socket_group": "SIDEGATE_SOCKET_GROUP",
    "workers": "SIDEGATE_WORKERS",
    "log_level": "SIDEGATE_LOG_LEVEL",
    "grace": "SIDEGATE_GRACE",
    "drain": "SIDEGATE_DRAIN",
    "state_dir": "SIDEGATE_STATE_DIR",
    "redis_url": "SIDEGATE_REDIS_URL",
    "admin_port": "SIDEGATE_ADMIN_PORT",
    "key_pepper": "SIDEGATE_KEY_PEPPER",
    "admin_token": "SIDEGATE_ADMIN_TOKEN",
    "metrics_port": "SIDEGATE_METRICS_PORT",
    "otlp_endpoint": "SIDEGATE_OTLP_ENDPOINT",
    "watch": "SIDEGATE_WATCH",
    "reference_config": "SIDEGATE_REFERENCE_CONFIG",
    "grpc_max_connections": "SIDEGATE_GRPC_MAX_CONNECTIONS",
    "grpc_idle_timeout": "SIDEGATE_GRPC_IDLE_TIMEOUT",
    "grpc_max_connection_age": "SIDEGATE_GRPC_MAX_CONNECTION_AGE",
}


@dataclass(frozen=True)
class Settings:
    config: Path | None = None
    host: str = "127.0.0.1"
    port: int = 9001
    # Listen on Unix sockets instead of host:port: worker n on ``<stem>-<n>.sock`` beside this
    # path (``sidegate.contract.worker_socket``), mode 0600, removed on stop.
    socket: Path | None = None
    # Where a relative ``unix:`` sidecar address of gateway.yaml lives (None: the state dir).
    # Containers keep the sockets on a volume of their own that Envoy mounts, apart from the state.
    socket_dir: Path | None = None
    # A group (name or number) given the worker sockets, which are then made 0660 instead of
    # 0600: for an Envoy that runs as another user who is in that group.
    socket_group: str | None = None
    workers: int = max(1, os.cpu_count() or 1)
    log_level: str = "info"
    grace: float = 10.0  # seconds in-flight calls get to finish after SIGTERM
    drain: float = 0.0  # seconds to report NOT_SERVING before closing the port
    state_dir: Path = Path(".sidegate")
    redis_url: str | None = None
    admin_port: int = 9002  # the key-management gRPC API (authz), on ``host``; 0 turns it off
    metrics_port: int = 0  # Prometheus scrape endpoint (0 = off; containers and `sidegate up` use 9464)
    otlp_endpoint: str | None = None  # OTLP/gRPC collector for traces, e.g. 127.0.0.1:4317 (None = off)
    key_pepper: str | None = field(default=None, repr=False)  # else <state_dir>/pepper
    admin_token: str | None = field(default=None, repr=False)  # else <state_dir>/admin-token
    # Watch gateway.yaml and the files it names, and reload on an edit. `sidegate up` turns it
    # off for its sidecar servers: it watches them itself and sends SIGHUP (one watcher).
    watch: bool = True
    # A folder of envoyproxy/ratelimit config files, served with no gateway.yaml (`sidegate ratelimit`)
    reference_config: Path | None = None
    # The sidecars' gRPC server (sidegate/grpc_h2c/limits.py has these and every other limit).
    grpc_max_connections: int = 256  # per worker
    grpc_idle_timeout: float = 300.0  # seconds a connection with no stream stays open
    grpc_max_connection_age: float = 3600.0  # seconds before a graceful GOAWAY moves it on

    @property
    def sockets(self) -> Path:
        """The folder relative ``unix:`` sidecar addresses are resolved in."""
        return self.socket_dir if self.socket_dir is not None else self.state_dir

    def pepper(self) -> bytes:
        """The server-side secret API-key digests are keyed with."""
        return state_secret(self.state_dir / "pepper", self.key_pepper).encode()

    def token(self) -> str:
        """The bearer token the key-management API requires."""
        return state_secret(self.state_dir / "admin-token", self.admin_token)

    @classmethod
    def from_env(
        cls, environ: dict[str, str] | None = None, *, base: dict[str, Any] | None = None, **overrides: Any
    ) -> Settings:
        """Defaults, then ``base`` (``from_gateway``), then ``SIDEGATE_*`` variables, then the
        non-None ``overrides``."""
        environ = dict(os.environ) if environ is None else environ
        values: dict[str, Any] = dict(base or {})
        for each in fields(cls):
            raw = environ.get(ENV[each.name])
            if raw not in (None, ""):
                values[each.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **{k: _coerce(k, v) for k, v in values.items()})


def from_gateway(gateway: Gateway, *, up: bool = False) -> dict[str, Any]:
    """The settings gateway.yaml gives (``from_env``'s ``base``): its ``state:`` section, and
    with ``up`` its ``up:`` section too. A relative state dir is read from the file's folder."""
    values: dict[str, Any] = {}
    if gateway.state.dir is not None:
        values["state_dir"] = gateway.base / gateway.state.dir
    if gateway.state.redis is not None:
        values["redis_url"] = gateway.state.redis
    if up:
        values["metrics_port"] = 9464  # `sidegate up` serves metrics unless told not to
        if gateway.up.key_admin_port is not None:
            values["admin_port"] = gateway.up.key_admin_port
        if gateway.up.metrics_port is not None:
            values["metrics_port"] = gateway.up.metrics_port
    return values


# The settings that say where a sidecar server listens. When neither is given by a flag or a
# variable, `sidegate serve` listens where gateway.yaml says Envoy finds its sidecars. (A host
# alone says which interface: the gateway's TCP port on it, or its sockets with the key-admin
# API and metrics on it.)
LISTEN = ("port", "socket")


def listen_from_gateway(gateway: Gateway, sidecars: Sequence[str], socket_dir: Path) -> dict[str, Any]:
    """Where a server of ``sidecars`` listens by default: the address gateway.yaml gives them
    (a relative ``unix:`` path under ``socket_dir``), and on sockets the ``workers`` behind it,
    so that it serves exactly the endpoints the compiled Envoy config lists."""
    chosen = [getattr(gateway.sidecars, name) for name in sidecars]
    addresses = sorted({str(sidecar.address) for sidecar in chosen})
    if len(addresses) != 1:
        raise SettingsError(
            f"gateway.yaml gives {', '.join(sidecars)} different addresses ({', '.join(addresses)}): "
            "serve them apart, or say where with --socket or --port"
        )
    address = chosen[0].address
    if isinstance(address, HostPort):
        return {"host": address.host, "port": address.port}
    values: dict[str, Any] = {"socket": Path(address.resolve(socket_dir))}
    workers = {sidecar.workers for sidecar in chosen} - {None}
    if len(workers) == 1:
        values["workers"] = workers.pop()
    return values


def socket_gid(group: str | None) -> int | None:
    """The group id of ``socket_group`` (a name or a number); None when unset."""
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SettingsError(f"bad value for {ENV['socket_group']} / --socket-group: no group {group!r}") from None


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "int":
            whole = int(value)
            if whole < (0 if name in ("port", "admin_port", "metrics_port") else 1):
                raise ValueError
            return whole
        if kind == "float":
            number = float(value)
            if number < 0:
                raise ValueError
            return number
        if "Path" in str(kind):
            return Path(value)
        if kind == "bool" and isinstance(value, str):
            return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[value.lower()]
    except KeyError:
        raise SettingsError(f"bad value for {ENV[name]}: {value!r} (true or false)") from None
    except ValueError:
        flag = "--" + name.replace("_", "-")
        raise SettingsError(f"bad value for {ENV[name]} / {flag}: {value!r}") from None
    return value


def state_secret(path: Path, given: str | None) -> str:
    """``given`` if set, else the secret kept in ``path``, made (0600, atomically) on first use.

    Every process on one host then shares it; hosts sharing a Redis key store must be given
    the same value (``SIDEGATE_KEY_PEPPER``), or their digests will not match.
    """
    if given:
        return given
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)  # fails if another process won the race: then use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    value = path.read_text().strip()
    if not value:
        raise SettingsError(f"{path} is empty")
    return value
