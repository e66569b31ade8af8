"""The gateway.yaml model: policy, validated once at load into frozen typed models.

``load(path)`` reads YAML keeping the line of every key, validates it with pydantic
(``extra="forbid"``, ``frozen=True``) and checks the references between sections. Every
problem becomes a ``ConfigError`` that reads ``FILE:LINE: dotted.key.path: problem``.
Sidecars and the Envoy compiler read the same ``Gateway`` object.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

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

from sidegate.contract import AUTHZ_HEADERS
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
    jwt: tuple[Name, ...] = ()  # issuers (the top-level ``issuers``) whose bearer tokens it accepts
    scopes: Annotated[
        dict[Annotated[str, AfterValidator(_method_or_star)], tuple[Scope, ...]],
        BeforeValidator(_scopes_by_method),
        AfterValidator(MappingProxyType),
    ] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Auth:
        if self.anonymous and (self.api_key or self.jwt or self.scopes):
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


# --- OAuth 2.0 issuers (authz reads these) ------------------------------------------------

JWT_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "EdDSA",
    "HS256",
    "HS384",
    "HS512",
)
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
# Headers authz sets itself (contract.AUTHZ_HEADERS): no claim may be mapped onto one, nor onto
# any x-sidegate-* header. A test tries every one of contract.IDENTITY_HEADERS.
# Headers a claim may never set: credentials, framing, routing and tracing.
_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "x-request-id",
        "traceparent",
        "tracestate",
    }
)
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
_LOOPBACK_NAMES = ("localhost",)


def idp_url(value: str) -> str:
    """An identity-provider URL: ``https``, or plain ``http`` only to a loopback host."""
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {value!r}")
    if parts.username or parts.password or parts.fragment:
        raise ValueError(f"no credentials or #fragment in the URL: {value!r}")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname in _LOOPBACK_NAMES
        if not loopback:
            raise ValueError(f"must be https (plain http only to a loopback host): {value!r}")
    return value


def _env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        raise ValueError(f"not an environment variable name: {value!r} (upper-case letters, digits and '_')")
    return value


def _algorithm(value: str) -> str:
    if value.lower() == "none":
        raise ValueError("'none' is never allowed: every token must be signed")
    if value not in JWT_ALGORITHMS:
        raise ValueError(f"unknown algorithm {value!r} (known: {', '.join(JWT_ALGORITHMS)})")
    return value


def _leeway(value: float) -> float:
    if not 0 <= value <= 300:
        raise ValueError("must be between 0s and 5m: a longer leeway keeps expired tokens alive")
    return value


def _claim_header(value: str) -> str:
    value = _header_name(value)
    if value in AUTHZ_HEADERS:
        raise ValueError(
            f"{value} is set by authz itself (x-consumer-id from consumer_claim, x-consumer-plan from plan_claim)"
        )
    if value in _RESERVED_HEADERS or value.startswith(("x-envoy-", "x-forwarded-", "x-sidegate-")):
        raise ValueError(
            f"{value} cannot carry a claim (credential, framing, routing and tracing headers are reserved)"
        )
    return value


def _inline_secret(value: object) -> object:
    if value is not None:
        raise ValueError("secrets never go in gateway.yaml: put it in an environment variable and name that variable")
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]
Algorithm = Annotated[str, AfterValidator(_algorithm)]
IdpUrl = Annotated[str, AfterValidator(idp_url)]
Claim = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^\S+$")]
InlineSecret = Annotated[object, BeforeValidator(_inline_secret), Field(exclude=True)]


class Jwks(Model):
    """When authz fetches an issuer's keys.

    In the background every ``Cache-Control: max-age`` the IdP sends (``refresh`` when it sends
    none), never more often than ``min_refresh`` nor less often than ``max_refresh``; and on a
    token whose ``kid`` it does not know, at most once per ``unknown_kid_refetch``.
    """

    refresh: Duration = 300.0
    min_refresh: Duration = 60.0
    max_refresh: Duration = 86400.0
    unknown_kid_refetch: Duration = 30.0
    timeout: Duration = 2.0  # per HTTP request to the IdP

    @model_validator(mode="after")
    def _bounds(self) -> Jwks:
        if self.min_refresh > self.max_refresh:
            raise ValueError("min_refresh must not be longer than max_refresh")
        return self


class Introspection(Model):
    """RFC 7662: opaque tokens are sent to ``endpoint``, authenticated with client credentials.

    The client secret is read at start from the environment variable ``client_secret_env``.
    Answers are cached until the token's ``exp`` or ``cache_ttl``, whichever comes first.
    """

    endpoint: IdpUrl
    client_id: str = Field(min_length=1)
    client_secret_env: EnvName
    client_secret: InlineSecret = None
    cache_ttl: Duration = 60.0
    timeout: Duration = 1.0


class Issuer(Model):
    """An OAuth 2.0 authorization server whose bearer tokens authz accepts.

    Keys come from OIDC discovery (``discovery: true``: ``<issuer>/.well-known/openid-configuration``)
    or an explicit ``jwks_uri``; ``HS*`` algorithms only with a shared secret, read at start from
    the environment variable ``shared_secret_env``. ``typ`` (e.g. ``at+jwt``, RFC 9068) is then
    required in every token's header. ``claims`` maps claim names to upstream headers.
    """

    issuer: IdpUrl  # the exact `iss` of its tokens
    discovery: bool = False
    jwks_uri: IdpUrl | None = None
    audiences: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1)
    algorithms: tuple[Algorithm, ...] = Field(default=("RS256", "ES256"), min_length=1)
    shared_secret_env: EnvName | None = None
    shared_secret: InlineSecret = None
    leeway: Annotated[float, BeforeValidator(parse_duration), AfterValidator(_leeway)] = 30.0
    typ: Annotated[str, Field(pattern=r"^[A-Za-z0-9.+/-]{1,64}$")] | None = None
    max_token_bytes: int = Field(default=8192, ge=512, le=65536)
    consumer_claim: Claim = "sub"
    plan_claim: Claim | None = None
    version_claim: Claim | None = None
    claims: Annotated[dict[Claim, Annotated[str, AfterValidator(_claim_header)]], AfterValidator(MappingProxyType)] = (
        Field(default_factory=dict)
    )
    jwks: Jwks = Jwks()
    introspection: Annotated[Introspection | None, BeforeValidator(_not_null)] = None

    @property
    def has_keys(self) -> bool:
        """Whether its JWTs can be checked here (JWKS or a shared secret) rather than introspected."""
        return self.discovery or self.jwks_uri is not None or self.shared_secret_env is not None


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

    ``lease``: with Redis, a worker reserves up to this many units of a window counter in one
    round trip and admits the next requests from them locally (``fixed_window`` and
    ``sliding_window`` limits of 100 and more; never over 1 % of the limit, nor over 1/8 of what
    the window has left). A limit never admits more; units a worker still holds when the window
    ends are the most it admits fewer. 0: one round trip per request.
    """

    on_store_error: StoreErrorPolicy = "allow"
    redis_timeout: Annotated[Duration, AfterValidator(_redis_timeout)] = 0.05
    expected_replicas: int = Field(default=1, ge=1, le=1000)
    headers: Literal["ietf", "x-ratelimit", "off"] = "ietf"
    shadow_mode: bool = False
    default_plan: Name | None = None  # for consumers whose key names no plan
    reference_configs: tuple[str, ...] = ()
    # One callout instead of two: authz takes the rate-limit decision in-process, with the same
    # limiter and counters as the ratelimit service; Envoy's ratelimit filter then stays off.
    in_authz: bool = False
    lease: int = Field(default=100, ge=0, le=10_000)


# --- API versions ------------------------------------------------------------------------

_VERSION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"
VersionName = Annotated[str, Field(pattern=_VERSION)]
FieldPath = Annotated[str, Field(pattern=r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$")]
Selector = Literal["path", "header", "query", "media_type", "pin"]
SELECTORS: tuple[Selector, ...] = ("path", "header", "query", "media_type", "pin")


class Rename(Model):
    from_: FieldPath = Field(alias="from")
    to: FieldPath


class FieldDefault(Model):
    field: FieldPath
    default: Any = None


class MapValues(Model):
    field: FieldPath
    values: dict[str, Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _reversible(self) -> MapValues:
        targets = [json_key(v) for v in self.values.values()]
        if len(set(targets)) != len(targets):
            raise ValueError("values must map one-to-one, so responses can be mapped back")
        return self


class Wrap(Model):
    field: FieldPath | None = None  # None: the whole body
    into: FieldPath


def json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class Change(Model):
    """One difference between a version and the next newer one; exactly one key.

    Requests go up (older → newer) through the change; responses come back down through its
    inverse: ``rename`` a field (dotted paths move it), ``add`` a field the newer version has
    (with a default), ``remove`` a field it dropped (restored with its default on the way
    down), ``map`` enum values one-to-one, ``wrap`` a field (or the whole body) into an object.
    """

    rename: Rename | None = None
    add: FieldDefault | None = None
    remove: FieldDefault | None = None
    map: MapValues | None = None
    wrap: Wrap | None = None

    @model_validator(mode="after")
    def _one(self) -> Change:
        given = [name for name in ("rename", "add", "remove", "map", "wrap") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("a change names exactly one of rename, add, remove, map, wrap")
        return self


def _date(value: object) -> object:
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not a date: {value!r} (use YYYY-MM-DD)") from None
    if isinstance(value, dt.datetime):
        return value.date()
    return value


Date = Annotated[dt.date, BeforeValidator(_date)]


class Version(Model):
    """One version of an API: where it is served and where it is in its life."""

    service: str | None = None  # upstream service (default: the API's)
    prefix: Annotated[str, AfterValidator(_path)] | None = None  # upstream path prefix (default: unchanged)
    served_by: VersionName | None = None  # a newer version whose upstream serves this one via `changes`
    changes: tuple[Change, ...] = ()  # from this version to the next newer one
    deprecated: Date | None = None
    sunset: Date | None = None
    link: str | None = None  # documentation of the deprecation (Link rel="deprecation")
    successor: VersionName | None = None  # default: the next newer version
    max_body_bytes: int = Field(default=1024 * 1024, ge=1, le=8 * 1024 * 1024)

    @model_validator(mode="after")
    def _dates(self) -> Version:
        if self.sunset is not None and self.deprecated is not None and self.sunset < self.deprecated:
            raise ValueError(f"sunset {self.sunset} comes before deprecation {self.deprecated}")
        return self


class Versioning(Model):
    """How a client names the version it wants, and which wins when it names several.

    ``pin`` is the consumer's pinned version (from its API key or token, set by authz).
    """

    default: VersionName
    header: HeaderName | None = "api-version"
    query: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    media_type: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")] | None = None  # vendor
    path: bool = False
    precedence: tuple[Selector, ...] = SELECTORS

    def enabled(self) -> tuple[str, ...]:
        """The selectors in force, in precedence order."""
        on = {
            "path": self.path,
            "header": self.header is not None,
            "query": self.query is not None,
            "media_type": self.media_type is not None,
            "pin": True,
        }
        return tuple(s for s in self.precedence if on[s])


# --- protocol translation (extproc translates; the compiler turns ext_proc on for these) -------

MAX_TRANSLATED_BODY = 1024 * 1024  # Envoy's buffer limit: a larger body is cut off, not translated
# ~20 ms of Python per 64 KB of XML: a default that stays well inside a 250 ms extproc timeout.
DEFAULT_TRANSLATED_BODY = 256 * 1024
_XML_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]*$")
_PROTO_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_TEMPLATE = re.compile(
    r"^(/([A-Za-z0-9._~!$&'()+,;=@%-]+|\*\*?|\{[A-Za-z_][A-Za-z0-9_.]*(=[^{}]+)?\}))+(:[A-Za-z0-9_.-]+)?$"
)


def _xml_name(value: str) -> str:
    if not _XML_NAME.match(value) or value.lower().startswith("xml"):
        raise ValueError(f"not an XML element name: {value!r} (a letter or '_', then letters, digits, '.', '-', '_')")
    return value


def _template(value: str) -> str:
    if not _TEMPLATE.match(value):
        raise ValueError(
            f"not a path template: {value!r} (e.g. /orders/{{id}}, /orders/{{id}}:cancel, /files/{{path=**}})"
        )
    return value


def _translated_body(value: int) -> int:
    if value > MAX_TRANSLATED_BODY:
        raise ValueError(
            f"at most {MAX_TRANSLATED_BODY} (1 MiB, Envoy's buffer: a larger body is cut off, not translated)"
        )
    return value


XmlName = Annotated[str, AfterValidator(_xml_name)]


class GrpcRoute(Model):
    """One REST route onto one RPC: ``{method: GET, path: "/orders/{id}", rpc: GetOrder}``.

    ``body``: ``"*"`` (the JSON body is the request message), a field of the request message
    (the JSON body is that field), or absent (no body; fields come from the path and query).
    """

    method: Method
    path: Annotated[str, AfterValidator(_template)]
    rpc: Annotated[str, Field(pattern=_PROTO_NAME)]
    body: Annotated[str, Field(pattern=r"^(\*|[A-Za-z_][A-Za-z0-9_]*)$")] | None = None


class GrpcTranslation(Model):
    """REST/JSON clients of a gRPC service described by a descriptor set or by .proto files.

    Routes come from the service's ``google.api.http`` annotations and from ``routes`` (which
    go first). Relative paths are read from this file's folder; ``proto_path`` holds the
    import folders for ``protos`` (default: this file's folder).
    """

    service: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")]
    descriptor: str | None = None  # a FileDescriptorSet: protoc --include_imports --descriptor_set_out
    protos: tuple[str, ...] = ()  # or .proto files, compiled at load with grpcio-tools
    proto_path: tuple[str, ...] = ()
    routes: tuple[GrpcRoute, ...] = ()

    @model_validator(mode="after")
    def _one_source(self) -> GrpcTranslation:
        if (self.descriptor is None) == (not self.protos):
            raise ValueError("give descriptor (a descriptor set file) or protos (.proto files), one of them")
        if self.proto_path and not self.protos:
            raise ValueError("proto_path goes with protos")
        return self


class Translation(Model):
    """What extproc translates on this API's routes, both ways; exactly one of ``xml``, ``grpc``.

    ``xml: client``: XML clients of a JSON service (JSON clients still get JSON);
    ``xml: upstream``: JSON clients of an XML service. ``root`` names the XML root element
    written for JSON bodies, ``item`` the element of each item of an array that is not the
    value of a key, ``infer_types`` reads XML text that is exactly a JSON number or
    true/false as one (see extproc/xml.py for the whole mapping). ``max_body_bytes`` limits
    the bodies translated on the way in (413 above it; 256 KiB unless set, at most 1 MiB,
    Envoy's buffer; a larger one needs a longer ``sidecars.extproc.timeout``).
    """

    xml: Literal["client", "upstream"] | None = None
    root: XmlName = "root"
    item: XmlName = "item"
    infer_types: bool = True
    grpc: Annotated[GrpcTranslation | None, BeforeValidator(_not_null)] = None
    max_body_bytes: Annotated[int, Field(ge=1), AfterValidator(_translated_body)] = DEFAULT_TRANSLATED_BODY

    @model_validator(mode="after")
    def _one_kind(self) -> Translation:
        if (self.xml is None) == (self.grpc is None):
            raise ValueError("translate names exactly one of xml (client|upstream) or grpc")
        xml_only = sorted({"root", "item", "infer_types"} & self.model_fields_set)
        if self.grpc is not None and xml_only:
            raise ValueError(f"{', '.join(xml_only)}: only for xml translations")
        return self


class Api(Model):
    name: Name
    match: Match
    service: str
    auth: Auth = Auth()
    timeout: Duration | None = None
    limits: tuple[ApiLimit, ...] = ()
    versioning: Versioning | None = None
    versions: dict[VersionName, Version] = Field(default_factory=dict)  # oldest first
    translate: Annotated[Translation | None, BeforeValidator(_not_null)] = None

    @model_validator(mode="after")
    def _versions(self) -> Api:
        if bool(self.versioning) != bool(self.versions):
            raise ValueError("versioning and versions go together")
        if self.translate is not None and self.versioning is not None:
            raise ValueError("translate and versions do not go together: give the translated API its own prefix")
        return self

    def newer(self, version: str) -> list[str]:
        names = list(self.versions)
        return names[names.index(version) + 1 :]


class Telemetry(Model):
    """Tracing: Envoy starts a trace per request and exports it, with the sidecars' spans in it,
    to an OpenTelemetry collector (OTLP/gRPC). Off unless ``otlp`` is given."""

    otlp: HostPort | None = None
    sampling: float = Field(default=100.0, ge=0, le=100)  # percent of requests traced
    service_name: str = "sidegate-envoy"


class Gateway(Model):
    listeners: tuple[Listener, ...] = Field(min_length=1)
    admin: Admin = Admin()
    sidecars: Sidecars = Sidecars()
    services: Annotated[dict[Name, Service], AfterValidator(MappingProxyType)] = Field(min_length=1)
    apis: tuple[Api, ...] = Field(min_length=1)
    api_keys: ApiKeys = ApiKeys()
    plans: Annotated[dict[Name, Plan], AfterValidator(MappingProxyType)] = Field(default_factory=dict)
    ratelimit: RateLimiting = RateLimiting()
    issuers: Annotated[dict[Name, Issuer], AfterValidator(MappingProxyType)] = Field(default_factory=dict)
    telemetry: Telemetry = Telemetry()

    @functools.cached_property
    def _apis_by_name(self) -> dict[str, Api]:
        # authz looks an API up by name on every request: a dict, built once per config. A cached
        # property lives in the instance's __dict__: ~0.4 µs a lookup, where a pydantic private
        # attribute (found through __getattr__) took ~3 µs.
        return {api.name: api for api in self.apis}

    def api(self, name: str) -> Api | None:
        return self._apis_by_name.get(name)

    @property
    def claim_headers(self) -> tuple[str, ...]:
        """Every header an issuer maps a claim to: only authz sets them, so clients' are stripped."""
        return tuple(sorted({h for issuer in self.issuers.values() for h in issuer.claims.values()}))


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
    problems = [*_references(gateway), *_translation_references(gateway, Path(file).parent)]
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
    yield from _issuer_references(gateway)
    yield from _version_references(gateway)


def _translation_references(gateway: Gateway, base: Path) -> Iterator[tuple[Path_, str]]:
    """Translations the service cannot take, and gRPC routes their descriptors do not describe."""
    for i, api in enumerate(gateway.apis):
        spec, service = api.translate, gateway.services.get(api.service)
        if spec is None or service is None:
            continue
        at: Path_ = ("apis", i, "translate")
        if spec.grpc is None:
            if service.protocol == "grpc":
                yield (*at, "xml"), f"service {api.service!r} speaks gRPC: translate it with grpc, not xml"
            continue
        if service.protocol != "grpc":
            yield (
                (*at, "grpc"),
                f"service {api.service!r} has protocol {service.protocol}: a gRPC translation needs protocol: grpc",
            )
            continue
        # The same code that serves the routes checks them (a lazy import: only configs that
        # translate gRPC pay for protobuf descriptors at load).
        from extproc import grpc_translate  # noqa: PLC0415

        try:
            grpc_translate.load(spec.grpc, base)
        except grpc_translate.GrpcConfigError as exc:
            yield (*at, "grpc", *exc.where), exc.problem


def _version_references(gateway: Gateway) -> Iterator[tuple[Path_, str]]:
    """Contradictions among versions: unknown names, backward chains, two versions on one upstream."""
    prefixes = {api.match.prefix.rstrip("/") for api in gateway.apis}
    for i, api in enumerate(gateway.apis):
        if api.versioning is None:
            continue
        names = list(api.versions)
        at = ("apis", i, "versions")
        if api.versioning.default not in api.versions:
            yield (
                ("apis", i, "versioning", "default"),
                f"unknown version {api.versioning.default!r} (known: {', '.join(names)})",
            )
        upstreams: dict[tuple[str, str], str] = {}
        for name, version in api.versions.items():
            newer = api.newer(name)
            if version.served_by is not None:
                if version.served_by not in newer:
                    yield (*at, name, "served_by"), f"must name a newer version ({', '.join(newer) or 'none is newer'})"
                elif api.versions[version.served_by].served_by is not None:
                    yield (*at, name, "served_by"), f"{version.served_by} is itself served_by another version"
                if version.service is not None or version.prefix is not None:
                    yield (*at, name, "served_by"), "a version served_by another has no service or prefix of its own"
            else:
                service = version.service or api.service
                if service not in gateway.services:
                    yield (
                        (*at, name, "service"),
                        f"unknown service {service!r} (known: {', '.join(sorted(gateway.services))})",
                    )
                upstream = (service, version.prefix or api.match.prefix)
                if upstream in upstreams:
                    yield (
                        (*at, name),
                        (
                            f"same upstream as {upstreams[upstream]} ({upstream[0]} {upstream[1]}): "
                            "two versions on one prefix; serve one through the other with served_by and changes"
                        ),
                    )
                upstreams[upstream] = name
            if version.successor is not None and version.successor not in newer:
                yield (*at, name, "successor"), f"must name a newer version ({', '.join(newer) or 'none is newer'})"
            if version.changes and not newer:
                yield (*at, name, "changes"), "the newest version has no next version to change into"
        if api.versioning.path:
            for name in names:
                path = f"/{name}{api.match.prefix.rstrip('/')}"
                if path in prefixes:
                    yield (*at, name), f"its path {path} is also the prefix of another api"


def _issuer_references(gateway: Gateway) -> Iterator[tuple[Path_, str]]:
    """Issuers that cannot check a token, claim headers that collide, APIs naming unknown issuers."""
    seen: dict[str, str] = {}
    for name, issuer in gateway.issuers.items():
        at = ("issuers", name)
        if issuer.issuer in seen:
            yield (*at, "issuer"), f"same issuer as issuers.{seen[issuer.issuer]}: tokens are matched by this URL"
        seen.setdefault(issuer.issuer, name)
        if issuer.discovery and issuer.jwks_uri is not None:
            yield (*at, "jwks_uri"), "discovery: true finds the jwks_uri: give one or the other"
        signed = [alg for alg in issuer.algorithms if alg not in HMAC_ALGORITHMS]
        shared = [alg for alg in issuer.algorithms if alg in HMAC_ALGORITHMS]
        if signed and not (issuer.discovery or issuer.jwks_uri) and issuer.introspection is None:
            yield (*at, "algorithms"), f"{signed[0]} needs the issuer's keys: set discovery: true or jwks_uri"
        if shared and issuer.shared_secret_env is None:
            yield (
                (*at, "algorithms"),
                f"{shared[0]} needs shared_secret_env: the environment variable holding the shared secret",
            )
        if issuer.shared_secret_env is not None and not shared:
            yield (*at, "shared_secret_env"), "only used with HS256, HS384 or HS512 in algorithms"
        targets: dict[str, str] = {}
        for claim, header in issuer.claims.items():
            if header in targets:
                yield (*at, "claims", claim), f"{header} already carries claim {targets[header]!r}"
            elif header == gateway.api_keys.header:
                yield (*at, "claims", claim), f"{header} is the API-key header (api_keys.header)"
            targets.setdefault(header, claim)
    for i, api in enumerate(gateway.apis):
        listed: set[str] = set()
        for j, name in enumerate(api.auth.jwt):
            if name not in gateway.issuers:
                known = ", ".join(sorted(gateway.issuers)) or "none defined"
                yield ("apis", i, "auth", "jwt", j), f"unknown issuer {name!r} (known: {known})"
            elif name in listed:
                yield ("apis", i, "auth", "jwt", j), f"issuer {name!r} is listed twice"
            listed.add(name)
        introspected = [n for n in listed if n in gateway.issuers and gateway.issuers[n].introspection]
        if len(introspected) > 1:
            yield (
                ("apis", i, "auth", "jwt"),
                "at most one issuer with introspection per API: an opaque token names no issuer, "
                f"so it would be sent to each ({', '.join(sorted(introspected))})",
            )


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
