"""The gateway.yaml model: policy, validated once at load into frozen typed models.

``load(path)`` reads YAML keeping the line of every key, validates it with pydantic
(``extra="forbid"``, ``frozen=True``) and checks the references between sections. Every
problem becomes a ``ConfigError`` that reads ``FILE:LINE: dotted.key.path: problem``.
Sidecars and the Envoy compiler read the same ``Gateway`` object.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
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
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)):(?P<port>[0-9]{1,5})$"
)
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")


def parse_duration(value: object) -> float:
    """``"250ms"``, ``"5s"``, ``"2m"``, ``"24h"``, ``"90d"`` → seconds."""
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 5s, 2m, 24h, 90d)")


def _positive(value: float) -> float:
    if value < 0.001:
        raise ValueError("must be at least 1ms")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]


def _name(value: str) -> str:
    if not re.match(_NAME, value):
        raise ValueError(f"{value!r}: names are lowercase letters, digits, '-' and '_', starting with a letter")
    return value


def _method(value: str) -> str:
    if value not in HTTP_METHODS:
        raise ValueError(f"unknown HTTP method {value!r} (known: {', '.join(HTTP_METHODS)})")
    return value


def _not_null(value: object) -> object:
    if value is None:
        raise ValueError("empty: write {} for the defaults (leave the key out to turn it off)")
    return value


Name = Annotated[str, AfterValidator(_name)]
Method = Annotated[str, AfterValidator(_method)]


class HostPort(BaseModel):
    """``host:port``; IPv6 literals in brackets (``[::1]:9001``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    port: int

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        m = _HOST_PORT.match(value) if isinstance(value, str) else None
        if m is None or not 0 < int(m.group("port")) < 65536:
            raise ValueError(f"not host:port: {value!r} (e.g. 127.0.0.1:9001, [::1]:9001, echo:8080)")
        host = m.group("v6") or m.group("host")
        if m.group("v6"):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"not an IPv6 address: {host!r}") from None
        return {"host": host, "port": int(m.group("port"))}

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
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(lambda v: str(v) if isinstance(v, float) else v)] = (
        "1.2"
    )

    @model_validator(mode="after")
    def _pair(self) -> Tls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: give both or neither")
        return self


class Listener(Model):
    name: Name
    address: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    tls: Annotated[Tls | None, BeforeValidator(_not_null)] = None


def _loopback(value: str) -> str:
    try:
        loopback = ipaddress.ip_address(value).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"must be a loopback address such as 127.0.0.1 (Envoy's admin is never exposed), not {value!r}"
        )
    return value


class Admin(Model):
    address: Annotated[str, AfterValidator(_loopback)] = "127.0.0.1"
    port: int = Field(default=9901, ge=1, le=65535)


class Sidecar(Model):
    address: HostPort
    replicas: tuple[HostPort, ...] = ()  # more addresses serving the same sidecar
    timeout: Duration = 0.25
    failure_mode: Literal["deny", "allow"] = "deny"

    @property
    def endpoints(self) -> tuple[HostPort, ...]:
        return (self.address, *self.replicas)


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
    health_check: Annotated[HealthCheck | None, BeforeValidator(_not_null)] = None
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    outlier_detection: Annotated[OutlierDetection | None, BeforeValidator(_not_null)] = None


def _path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/': {value!r}")
    return value


class Match(Model):
    prefix: Annotated[str, AfterValidator(_path)]
    methods: tuple[Method, ...] = ()


_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 scope-token characters
_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")  # lower-case RFC 9110 token


def _scope(value: str) -> str:
    if not _SCOPE.match(value):
        raise ValueError(f"not a scope: {value!r} (printable ASCII, no spaces, quotes or backslashes)")
    return value


def _header_name(value: str) -> str:
    if not _HEADER.match(value):
        raise ValueError(f"not a lower-case header name: {value!r}")
    return value


Scope = Annotated[str, AfterValidator(_scope)]
HeaderName = Annotated[str, AfterValidator(_header_name)]


def _scopes_by_method(value: object) -> object:
    """``[a, b]`` means every method; a mapping names methods (``"*"`` for the others)."""
    if isinstance(value, list | tuple):
        return {"*": value}
    return value


def _method_or_star(value: str) -> str:
    return value if value == "*" else _method(value)


class Auth(Model):
    """What a request must present. Routes that are not anonymous go through authz.

    ``scopes`` is a list (every method) or a mapping from method (or ``"*"``) to the scopes a
    credential must hold, all of them.
    """

    anonymous: bool = False
    api_key: bool = False
    api_key_query: str | None = None  # a query parameter that may carry the key (off unless named)
    scopes: Annotated[
        dict[Annotated[str, AfterValidator(_method_or_star)], tuple[Scope, ...]],
        BeforeValidator(_scopes_by_method),
        AfterValidator(MappingProxyType),
    ] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Auth:
        if self.anonymous and (self.api_key or self.scopes):
            raise ValueError("anonymous: true takes no credentials or scopes")
        if self.api_key_query is not None and not self.api_key:
            raise ValueError("api_key_query needs api_key: true")
        return self

    def required_scopes(self, method: str) -> tuple[str, ...]:
        return self.scopes.get(method, self.scopes.get("*", ()))


class ApiKeys(Model):
    """How API keys look and where authz finds them: ``<prefix>_<environment>_<id>_<secret>``."""

    header: HeaderName = "x-api-key"
    prefix: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{0,15}$")] = "sg"
    environment: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{0,15}$")] = "live"
    cache_ttl: Duration = 30.0
    negative_cache_ttl: Duration = 5.0


# --- rate limits (the ratelimit sidecar and the compiler read these) ----------------------

ALGORITHMS = ("fixed_window", "sliding_window", "gcra")
StoreErrorPolicy = Literal["allow", "deny", "local"]
MAX_REDIS_TIMEOUT = 1.0  # a rate-limit decision never waits longer on Redis


class RateLimitRule(Model):
    """``requests`` per ``window`` (any duration: ``1s``, ``30s``, ``1d``), counted by an algorithm.

    ``fixed_window`` is clock-aligned (as Envoy's reference service), ``sliding_window`` weighs the
    previous window by how much of it still overlaps, ``gcra`` is a token bucket holding up to
    ``requests``. ``methods`` narrows the rule to some HTTP methods; ``shadow_mode`` counts and
    reports but never denies; ``on_store_error`` overrides ``ratelimit.on_store_error``.
    """

    name: Name | None = None  # the policy name clients see in RateLimit-Policy (default: derived)
    requests: int = Field(ge=0, le=1_000_000_000)
    window: Duration
    algorithm: Literal["fixed_window", "sliding_window", "gcra"] = "fixed_window"
    methods: tuple[Method, ...] = ()
    shadow_mode: bool = False
    on_store_error: StoreErrorPolicy | None = None


class ApiLimit(RateLimitRule):
    """A limit on one API, counted per consumer (from authz), per client IP, or for everyone."""

    by: Literal["consumer", "ip", "global"]


class Plan(Model):
    """Limits every consumer on this plan gets, across every API that needs credentials."""

    limits: tuple[RateLimitRule, ...] = Field(min_length=1)


def _redis_timeout(value: float) -> float:
    if value > MAX_REDIS_TIMEOUT:
        raise ValueError(f"must be at most {MAX_REDIS_TIMEOUT:g}s: a rate-limit decision must never wait long on Redis")
    return value


class RateLimiting(Model):
    """How the ratelimit sidecar decides: store failures, headers, shadow mode, extra limit files.

    ``on_store_error``: ``allow`` (fail open), ``deny``, or ``local`` (an in-process token bucket
    sized limit / ``expected_replicas``). ``reference_configs`` are files in the format of Envoy's
    reference rate-limit service (relative paths are read from this file's folder).
    """

    on_store_error: StoreErrorPolicy = "allow"
    redis_timeout: Annotated[Duration, AfterValidator(_redis_timeout)] = 0.05
    expected_replicas: int = Field(default=1, ge=1, le=1000)
    headers: Literal["ietf", "x-ratelimit", "off"] = "ietf"
    shadow_mode: bool = False
    default_plan: Name | None = None  # for consumers whose key names no plan
    reference_configs: tuple[str, ...] = ()


class Api(Model):
    name: Name
    match: Match
    service: str
    auth: Auth = Auth()
    timeout: Duration | None = None
    limits: tuple[ApiLimit, ...] = ()


class Gateway(Model):
    listeners: tuple[Listener, ...] = Field(min_length=1)
    admin: Admin = Admin()
    sidecars: Sidecars = Sidecars()
    services: Annotated[dict[Name, Service], AfterValidator(MappingProxyType)] = Field(min_length=1)
    apis: tuple[Api, ...] = Field(min_length=1)
    api_keys: ApiKeys = ApiKeys()
    plans: Annotated[dict[Name, Plan], AfterValidator(MappingProxyType)] = Field(default_factory=dict)
    ratelimit: RateLimiting = RateLimiting()

    def api(self, name: str) -> Api | None:
        return next((api for api in self.apis if api.name == name), None)


# --- loading with line numbers ----------------------------------------------------------

Path_ = tuple[str | int, ...]


_BOOLEAN_WORDS = {"on", "off", "yes", "no", "y", "n", "true", "false"}


def _compose(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    """YAML → plain Python, plus the 1-based line of every key and list item."""
    loader = yaml.SafeLoader(text)
    lines: dict[Path_, int] = {}

    def build(node: yaml.Node, path: Path_) -> Any:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # YAML merge keys (<<)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if isinstance(key, bool) and str(key_node.value).lower() in _BOOLEAN_WORDS:
                    raise ConfigError(
                        file, line, _dotted(path), f"YAML reads the key {key_node.value!r} as a boolean: quote it"
                    )
                if not isinstance(key, str):
                    raise ConfigError(file, line, _dotted(path), f"keys must be strings, not {key!r}")
                if key in out:
                    raise ConfigError(file, line, _dotted((*path, key)), "duplicate key")
                lines[(*path, key)] = line
                out[key] = build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, (*path, i)) for i, item in enumerate(node.value)]
        return loader.construct_object(node)

    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(file, 1, "", "empty file")
        return build(node, ()), lines
    except yaml.composer.ComposerError as exc:
        if "single document" in str(exc.context):
            mark = exc.problem_mark
            raise ConfigError(file, mark.line + 1 if mark else None, "", "only one YAML document is allowed") from None
        raise ConfigError(file, _mark_line(exc), "", f"not valid YAML: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        problem = f"not valid YAML: {exc.problem}"
        if exc.context and exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise ConfigError(file, _mark_line(exc), "", problem) from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, None, "", f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _mark_line(exc: yaml.MarkedYAMLError) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return mark.line + 1 if mark else None


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
    if kind in ("tuple_type", "list_type"):
        return "must be a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if message.startswith("Input should"):
        message = "i" + message[1:]
    if kind == "string_type" and isinstance(error.get("input"), bool):
        message += " (YAML reads yes/no/on/off/true/false as booleans: quote it)"
    return message


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
            (tuple(part for part in error["loc"] if isinstance(part, str | int) and part != "[key]"), error)
            for error in exc.errors()
        ]
        for loc, error in raw:
            if any(other[: len(loc)] == loc and len(other) > len(loc) for other, _ in raw):
                continue  # "list too short" because an item in it failed: say only the item
            # A missing top-level key has no line of its own: name the file alone.
            line = None if error["type"] == "missing" and len(loc) == 1 else _line(lines, loc)
            errors.append(ConfigError(file, line, _dotted(loc), _problem(error)))
        raise _all(errors) from None
    problems = list(_references(gateway))
    if problems:
        raise _all([ConfigError(file, _line(lines, path), _dotted(path), problem) for path, problem in problems])
    return gateway


def _all(errors: list[ConfigError]) -> ConfigError:
    """The first error (by line), carrying every error's line in ``.errors``."""
    errors.sort(key=lambda e: e.line or 0)
    first = errors[0]
    first.errors = tuple(str(e) for e in errors)
    return first


def _references(gateway: Gateway) -> Iterator[tuple[Path_, str]]:
    """Problems between sections that no single field can see: (key path, problem)."""
    names: set[str] = set()
    bound: set[tuple[str, int]] = set()
    for i, listener in enumerate(gateway.listeners):
        if listener.name in names:
            yield ("listeners", i, "name"), f"duplicate listener name {listener.name!r}"
        if (listener.address, listener.port) in bound:
            yield ("listeners", i, "port"), f"port {listener.port} is used by an earlier listener"
        names.add(listener.name)
        bound.add((listener.address, listener.port))
    names = set()
    routes: set[tuple[str, tuple[str, ...]]] = set()
    for i, api in enumerate(gateway.apis):
        if api.name in names:
            yield ("apis", i, "name"), f"duplicate api name {api.name!r}"
        names.add(api.name)
        if api.service not in gateway.services:
            known = ", ".join(sorted(gateway.services))
            yield ("apis", i, "service"), f"unknown service {api.service!r} (known: {known})"
        route = (api.match.prefix, tuple(sorted(api.match.methods)))
        if route in routes:
            yield ("apis", i, "match"), f"same prefix and methods as an earlier api: {api.match.prefix}"
        routes.add(route)
    yield from _ratelimit_references(gateway)


def _ratelimit_references(gateway: Gateway) -> Iterator[tuple[Path_, str]]:
    """Rate-limit problems that span sections: consumers on anonymous APIs, unrouted methods, …"""
    rl = gateway.ratelimit
    if rl.default_plan is not None and rl.default_plan not in gateway.plans:
        known = ", ".join(sorted(gateway.plans)) or "none defined"
        yield ("ratelimit", "default_plan"), f"unknown plan {rl.default_plan!r} (known: {known})"
    if rl.redis_timeout >= gateway.sidecars.ratelimit.timeout:
        yield (
            ("ratelimit", "redis_timeout"),
            f"must be shorter than sidecars.ratelimit.timeout ({gateway.sidecars.ratelimit.timeout:g}s), "
            "or Envoy gives up before the store-error policy applies",
        )
    for i, api in enumerate(gateway.apis):
        names: set[str] = set()
        for j, limit in enumerate(api.limits):
            if limit.by == "consumer" and api.auth.anonymous:
                yield ("apis", i, "limits", j, "by"), "an anonymous API has no consumer: count by ip or global"
            unrouted = [m for m in limit.methods if api.match.methods and m not in api.match.methods]
            if unrouted:
                yield (
                    ("apis", i, "limits", j, "methods"),
                    f"{', '.join(unrouted)} never reaches this API (match.methods: {', '.join(api.match.methods)})",
                )
            if limit.name is not None and limit.name in names:
                yield ("apis", i, "limits", j, "name"), f"duplicate limit name {limit.name!r}"
            names.add(limit.name or "")
    for plan_name, plan in gateway.plans.items():
        names = set()
        for j, rule in enumerate(plan.limits):
            if rule.name is not None and rule.name in names:
                yield ("plans", plan_name, "limits", j, "name"), f"duplicate limit name {rule.name!r}"
            names.add(rule.name or "")


def compose(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    """YAML text → plain Python and the line of every key path, with this module's YAML rules.

    For other files that want ``FILE:LINE`` errors (the ratelimit sidecar's reference configs).
    """
    return _compose(text, file)


def dotted(path: Path_) -> str:
    """``("apis", 3, "name")`` → ``apis[3].name``."""
    return _dotted(path)


def line_of(lines: Mapping[Path_, int], path: Path_) -> int | None:
    """The line of ``path``, or of its nearest parent that has one."""
    return _line(lines, path)
