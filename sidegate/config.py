"""The gateway.yaml model: policy, validated once at load into frozen typed models.

``load(path)`` reads YAML keeping the line of every key, validates it with pydantic
(``extra="forbid"``, ``frozen=True``) and checks the references between sections. Every
problem becomes a ``ConfigError`` that reads ``FILE:LINE: dotted.key.path: problem``.
Sidecars and the Envoy compiler read the same ``Gateway`` object.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from sidegate.errors import ConfigError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAME = r"^[a-z][a-z0-9_-]{0,62}$"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")


def parse_duration(value: object) -> float:
    """``"250ms"``, ``"5s"``, ``"2m"``, ``"24h"``, ``"90d"`` → seconds."""
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 5s, 2m, 24h, 90d)")


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
Name = Annotated[str, Field(pattern=_NAME)]


class HostPort(BaseModel):
    """``host:port``; IPv6 literals in brackets (``[::1]:9001``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    port: int

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        if not isinstance(value, str):
            raise ValueError(f"not host:port: {value!r}")
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not host:port: {value!r}")
        return {"host": host, "port": int(port)}

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tls(Model):
    """Server certificate; when both are omitted ``sidegate up`` makes a development one."""

    cert: str | None = None
    key: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _pair(self) -> Tls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: give both or neither")
        return self


class Listener(Model):
    name: Name
    address: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    tls: Tls | None = None


class Admin(Model):
    address: str = "127.0.0.1"
    port: int = Field(default=9901, ge=1, le=65535)

    @model_validator(mode="after")
    def _loopback(self) -> Admin:
        try:
            loopback = ipaddress.ip_address(self.address).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"Envoy admin must listen on loopback, not {self.address!r}")
        return self


class Sidecar(Model):
    address: HostPort
    timeout: Duration = 0.25
    failure_mode: Literal["deny", "allow"] = "deny"


def _sidecar(port: int, failure_mode: str) -> Sidecar:
    return Sidecar.model_validate({"address": f"127.0.0.1:{port}", "failure_mode": failure_mode})


class Sidecars(Model):
    """Where Envoy finds each sidecar. Rate limiting fails open by default, the rest closed."""

    authz: Sidecar = Field(default_factory=lambda: _sidecar(9001, "deny"))
    ratelimit: Sidecar = Field(default_factory=lambda: _sidecar(9001, "allow"))
    extproc: Sidecar = Field(default_factory=lambda: _sidecar(9001, "deny"))


class Retries(Model):
    attempts: int = Field(default=1, ge=0, le=10)
    retry_on: tuple[str, ...] = ("connect-failure", "refused-stream", "reset")
    per_try_timeout: Duration | None = None


class HealthCheck(Model):
    path: str = Field(default="/healthz", pattern=r"^/")
    interval: Duration = 5.0
    timeout: Duration = 1.0
    healthy_threshold: int = Field(default=1, ge=1)
    unhealthy_threshold: int = Field(default=3, ge=1)


class CircuitBreaker(Model):
    max_connections: int = Field(default=1024, ge=1)
    max_pending_requests: int = Field(default=1024, ge=1)
    max_requests: int = Field(default=1024, ge=1)
    max_retries: int = Field(default=3, ge=0)


class OutlierDetection(Model):
    consecutive_5xx: int = Field(default=5, ge=1)
    interval: Duration = 10.0
    base_ejection_time: Duration = 30.0
    max_ejection_percent: int = Field(default=50, ge=0, le=100)


class Service(Model):
    """An upstream microservice."""

    endpoints: tuple[HostPort, ...] = Field(min_length=1)
    protocol: Literal["http1", "http2", "grpc"] = "http1"
    connect_timeout: Duration = 1.0
    timeout: Duration = 15.0
    retries: Retries = Retries()
    health_check: HealthCheck | None = None
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    outlier_detection: OutlierDetection | None = None


class Match(Model):
    prefix: str = Field(pattern=r"^/")
    methods: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _methods(self) -> Match:
        for method in self.methods:
            if method not in HTTP_METHODS:
                raise ValueError(f"unknown HTTP method {method!r}")
        return self


class Auth(Model):
    """What a request must present. Routes that are not anonymous go through authz."""

    anonymous: bool = False


class Api(Model):
    name: Name
    match: Match
    service: str
    auth: Auth = Auth()
    timeout: Duration | None = None


class Gateway(Model):
    listeners: tuple[Listener, ...] = Field(min_length=1)
    admin: Admin = Admin()
    sidecars: Sidecars = Sidecars()
    services: dict[Name, Service] = Field(min_length=1)
    apis: tuple[Api, ...] = Field(min_length=1)

    def api(self, name: str) -> Api | None:
        return next((api for api in self.apis if api.name == name), None)


# --- loading with line numbers ----------------------------------------------------------

Path_ = tuple[str | int, ...]


def _compose(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    """YAML → plain Python, plus the 1-based line of every key and list item."""
    loader = yaml.SafeLoader(text)
    lines: dict[Path_, int] = {}

    def build(node: yaml.Node, path: Path_) -> Any:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
                if not isinstance(key, str | int | bool) or isinstance(key, bool):
                    raise ConfigError(file, key_node.start_mark.line + 1, _dotted(path), "keys must be strings")
                if key in out:
                    raise ConfigError(file, key_node.start_mark.line + 1, _dotted((*path, key)), "duplicate key")
                lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, (*path, i)) for i, item in enumerate(node.value)]
        return loader.construct_object(node)  # type: ignore[no-untyped-call]

    try:
        node = loader.get_single_node()  # type: ignore[no-untyped-call]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(file, mark.line + 1 if mark else None, "", f"not valid YAML: {exc.problem}") from None
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]
    if node is None:
        raise ConfigError(file, 1, "", "empty file")
    return build(node, ()), lines


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line(lines: Mapping[Path_, int], path: Path_) -> int | None:
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _problem(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "too_short":
        return "must not be empty"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message[:1].lower() + message[1:]


def load(path: str | Path) -> Gateway:
    """Read and validate a gateway.yaml; raises ``ConfigError`` (all problems in ``.errors``)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, None, "", f"cannot read: {exc.strerror}") from None
    return parse(text, file)


def parse(text: str, file: str = "gateway.yaml") -> Gateway:
    data, lines = _compose(text, file)
    if not isinstance(data, dict):
        raise ConfigError(file, 1, "", "top level must be a mapping")
    try:
        gateway = Gateway.model_validate(data)
    except ValidationError as exc:
        errors = []
        raw = [
            (tuple(part for part in error["loc"] if isinstance(part, str | int)), error)
            for error in exc.errors()
        ]
        for loc, error in raw:
            if any(other[: len(loc)] == loc and len(other) > len(loc) for other, _ in raw):
                continue  # "list too short" because an item in it failed: say only the item
            # A validator on a whole object reports at the object; unknown/missing at the key.
            errors.append(ConfigError(file, _line(lines, loc), _dotted(loc), _problem(error)))
        errors.sort(key=lambda e: e.line or 0)
        first = errors[0]
        first.errors = tuple(str(e) for e in errors)
        raise first from None
    _check_references(gateway, file, lines)
    return gateway


def _check_references(gateway: Gateway, file: str, lines: Mapping[Path_, int]) -> None:
    def fail(path: Path_, problem: str) -> None:
        raise ConfigError(file, _line(lines, path), _dotted(path), problem)

    seen: dict[str, int] = {}
    for i, listener in enumerate(gateway.listeners):
        if listener.name in seen:
            fail(("listeners", i, "name"), f"duplicate listener name {listener.name!r}")
        seen[listener.name] = i
    names: set[str] = set()
    routes: set[tuple[str, tuple[str, ...]]] = set()
    for i, api in enumerate(gateway.apis):
        if api.name in names:
            fail(("apis", i, "name"), f"duplicate api name {api.name!r}")
        names.add(api.name)
        if api.service not in gateway.services:
            known = ", ".join(sorted(gateway.services))
            fail(("apis", i, "service"), f"unknown service {api.service!r} (known: {known})")
        route = (api.match.prefix, tuple(sorted(api.match.methods)))
        if route in routes:
            fail(("apis", i, "match"), f"same prefix and methods as an earlier api: {api.match.prefix}")
        routes.add(route)
