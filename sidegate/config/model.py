"""The gateway.yaml model: frozen pydantic models with ``extra="forbid"``, one per section.

Each field validates itself. Problems that span sections (a route naming an unknown service,
two versions on one upstream) are checked in ``references``.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from sidegate.config.mesh import Mesh
from sidegate.config.policy import Auth, RateLimitRule
from sidegate.config.values import (
    Duration,
    HeaderStyle,
    HostPort,
    Method,
    Model,
    Name,
    StoreErrorPolicy,
    UnixSocket,
    _not_null,
    parse_duration,
    sidecar_address,
)
from sidegate.contract import (
    AUTHZ_HEADERS,
    FORWARDED_CLAIM_HEADERS,
    IDENTITY_HEADERS,
    PIN_HEADER,
    STRIPPED_FAMILIES,
    STRIPPED_HEADERS,
    mesh_api,
)


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


class ListenerTimeouts(Model):
    """How long Envoy waits on a client: for its request headers, for its whole request (body
    included; an upload slower than this is cut with 408), and for any byte of a stream that
    went quiet. A slow or stalled client holds a connection and a sidecar stream for no longer."""

    request_headers: Duration = 10.0
    request: Duration = 60.0
    stream_idle: Duration = 30.0


class Listener(Model):
    name: Name
    address: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    tls: Annotated[Tls | None, BeforeValidator(_not_null)] = None
    timeouts: ListenerTimeouts = ListenerTimeouts()


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


SidecarAddress = Annotated[HostPort | UnixSocket, BeforeValidator(sidecar_address)]


class Sidecar(Model):
    """Where Envoy finds one sidecar: ``host:port`` or ``unix:PATH`` (one socket per worker)."""

    address: SidecarAddress
    replicas: tuple[SidecarAddress, ...] = ()  # more addresses serving the same sidecar
    # Worker processes behind each ``unix:`` address: Envoy gets one endpoint per worker socket.
    workers: int | None = Field(default=None, ge=1, le=64)
    timeout: Duration = 0.25
    failure_mode: Literal["deny", "allow"] = "deny"

    @model_validator(mode="after")
    def _workers_need_sockets(self) -> Sidecar:
        if self.workers is not None and not any(isinstance(a, UnixSocket) for a in self.endpoints):
            raise ValueError("workers is only for unix:PATH addresses (on TCP the workers share one port)")
        return self

    @property
    def endpoints(self) -> tuple[HostPort | UnixSocket, ...]:
        return (self.address, *self.replicas)


def _sidecar(failure_mode: str) -> Sidecar:
    return Sidecar.model_validate({"address": "unix:sidecars.sock", "failure_mode": failure_mode})


class Sidecars(Model):
    """Where Envoy finds each sidecar: by default one server on Unix sockets in the state folder
    (one per worker), which nothing off the host can reach. Rate limiting fails open by default,
    the rest closed."""

    authz: Sidecar = Field(default_factory=lambda: _sidecar("deny"))
    ratelimit: Sidecar = Field(default_factory=lambda: _sidecar("allow"))
    extproc: Sidecar = Field(default_factory=lambda: _sidecar("deny"))


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


_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")  # lower-case RFC 9110 token


def _header_name(value: str) -> str:
    if not _HEADER.match(value):
        raise ValueError(f"not a lower-case header name: {value!r}")
    return value


HeaderName = Annotated[str, AfterValidator(_header_name)]


class ApiKeys(Model):
    """How API keys look and where authz finds them: ``<prefix>_<environment>_<id>_<secret>``.

    ``imported: true`` also accepts keys another gateway issued, imported with
    ``sidegate keys import --plaintext``: a key not in this format is found by an id derived
    from it with the pepper (one more store lookup for every such key presented)."""

    header: HeaderName = "x-api-key"
    prefix: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{0,15}$")] = "sg"
    environment: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{0,15}$")] = "live"
    cache_ttl: Duration = 30.0
    negative_cache_ttl: Duration = 5.0
    imported: bool = False


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
    forwarded = value.startswith("x-forwarded-") and value not in FORWARDED_CLAIM_HEADERS
    if value in _RESERVED_HEADERS or forwarded or value.startswith(("x-envoy-", "x-sidegate-")):
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
    Without ``endpoint`` an issuer with ``discovery: true`` takes its ``introspection_endpoint``.

    The client secret is read at start from the environment variable ``client_secret_env``.
    Answers are cached until the token's ``exp`` or ``cache_ttl``, whichever comes first.
    """

    endpoint: IdpUrl | None = None
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

MAX_REDIS_TIMEOUT = 1.0  # a rate-limit decision never waits longer on Redis


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
    headers: HeaderStyle = "ietf"
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

    ``engine``: ``extproc`` (the default) translates in the extproc sidecar, with the gateway's
    JSON errors; ``envoy`` compiles the same routes into Envoy's own ``grpc_json_transcoder``,
    with no callout (docs/configuration.md lists what differs).
    """

    engine: Literal["extproc", "envoy"] = "extproc"

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


def _redis_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError(f"not a Redis URL: {value!r} (e.g. redis://127.0.0.1:6379/0)")
    if parts.password:
        raise ValueError("a Redis password does not belong in gateway.yaml: set SIDEGATE_REDIS_URL (or --redis)")
    return value


class State(Model):
    """Where ``sidegate up``, ``sidegate serve`` and ``sidegate keys`` find the key store and its
    pepper: ``dir`` (relative to this file's folder) and a shared ``redis`` store. A flag
    (``--state-dir``, ``--redis``) or ``SIDEGATE_STATE_DIR`` / ``SIDEGATE_REDIS_URL`` overrides them;
    with neither, the state dir is ``.sidegate`` in the working directory."""

    dir: Annotated[str, Field(min_length=1)] | None = None
    redis: Annotated[str, AfterValidator(_redis_url)] | None = None


class Up(Model):
    """What ``sidegate up`` opens beside the listeners, admin and sidecars: the demo upstream
    (``echo``), the key-management API (``key_admin_port``, on the authz sidecar's host; 0 = off)
    and the sidecars' Prometheus ``/metrics`` (``metrics_port``, one port per sidecar server from
    it; 0 = off). Flags override each; unset, they are 127.0.0.1:9080, 9002 and 9464."""

    echo: HostPort | None = None
    key_admin_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)


def _strip_pattern(value: str) -> str:
    """A header name, or a family of them written with a trailing ``*`` (``x-acme-*``)."""
    name = value.removesuffix("*")
    if "*" in name or not _HEADER.match(name) or (value.endswith("*") and len(name) < 3):
        raise ValueError(f"not a lower-case header name or family: {value!r} (a family ends with one '*')")
    return value


StripPattern = Annotated[str, AfterValidator(_strip_pattern)]


class IdentityHeaders(Model):
    """Headers a client may have forged to pass as someone: Envoy removes them from every request.

    The default list (``sidegate.contract.STRIPPED_HEADERS`` and ``STRIPPED_FAMILIES``) holds
    common identity header names. ``strip`` adds names or families (``x-acme-*``); ``keep`` lets
    default entries through, written as they are in the default list. What authz sets (the
    identity headers and the claim headers of issuers) is always removed, then set.
    """

    strip: tuple[StripPattern, ...] = ()
    keep: tuple[StripPattern, ...] = ()

    @field_validator("keep")
    @classmethod
    def _keep_defaults(cls, keep: tuple[str, ...]) -> tuple[str, ...]:
        defaults = (*STRIPPED_HEADERS, *STRIPPED_FAMILIES)
        for entry in keep:
            if entry not in defaults:
                family = next((f for f in STRIPPED_FAMILIES if entry.startswith(f[:-1])), None)
                if family is not None:
                    raise ValueError(f"{entry} is in the {family} family: keep the family and strip the names you need")
                raise ValueError(f"{entry} is not in the default list: keep names a default entry")
        return keep


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
    identity_headers: IdentityHeaders = IdentityHeaders()
    mesh: Annotated[Mesh | None, BeforeValidator(_not_null)] = None  # service to service: sidegate/config/mesh.py
    state: State = State()  # where the key store and its pepper live (sidegate up, serve, keys)
    up: Up = Up()  # the ports `sidegate up` opens beside the listeners, admin and sidecars
    # Where this config was loaded from: (file, the line of every key path), set by ``parse``.
    _source: tuple[str, Mapping[tuple[str | int, ...], int]] = PrivateAttr(default=("gateway.yaml", {}))

    @property
    def source(self) -> tuple[str, Mapping[tuple[str | int, ...], int]]:
        """The file this config was read from and the line of every key path in it."""
        return self._source

    @property
    def base(self) -> Path:
        """The folder of the file this config was read from: relative paths in it start here."""
        return Path(self.source[0]).parent

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file this config names, relative ones read from its own folder: the reference
        rate-limit configs, and the gRPC descriptors or protos of translations. A reload watches
        them with gateway.yaml itself."""
        named = list(self.ratelimit.reference_configs)
        for api in self.apis:
            grpc = api.translate.grpc if api.translate is not None else None
            if grpc is not None:
                named += [grpc.descriptor] if grpc.descriptor is not None else list(grpc.protos)
        return tuple(self.base / name for name in named)

    @functools.cached_property
    def _apis_by_name(self) -> dict[str, Api]:
        # authz looks an API up by name on every request: a dict, built once per config. A cached
        # property lives in the instance's __dict__: ~0.4 µs a lookup, where a pydantic private
        # attribute (found through __getattr__) took ~3 µs.
        apis = {api.name: api for api in self.apis}
        for service, auth in self.mesh.authz.items() if self.mesh else ():
            # A mesh service's end-user check is an API to authz: every path, its auth. The name
            # (contract.mesh_api) is one no API of apis: can take, so it is set after validation.
            api = Api(name=service, match=Match(prefix="/"), service=service, auth=auth)
            apis[mesh_api(service)] = api.model_copy(update={"name": mesh_api(service)})
        return apis

    def api(self, name: str) -> Api | None:
        return self._apis_by_name.get(name)

    @functools.cached_property
    def _apis_by_prefix(self) -> dict[str, tuple[Api, ...]]:
        """APIs by prefix (less a trailing '/'), each list in the route table's order: an API
        with methods before one without (compiler/routes.virtual_host)."""
        found: dict[str, list[Api]] = {}
        for api in sorted(self.apis, key=lambda a: not a.match.methods):
            found.setdefault(api.match.prefix.rstrip("/"), []).append(api)
        return {prefix: tuple(apis) for prefix, apis in found.items()}

    def api_at(self, path: str, method: str) -> Api | None:
        """The API whose route a request would take, for a caller that names none: an Envoy of
        another mesh (Istio's ext_authz provider) sends no ``api`` context extension.

        A route's prefix matches on segment boundaries (path_separated_prefix), so only the
        path's own prefixes up to a '/' can be an API's: one lookup per segment, longest first,
        as Envoy's table orders them, whatever the number of APIs."""
        path = path.partition("?")[0]
        cuts = [path, *(path[:i] for i in range(len(path) - 1, -1, -1) if path[i] == "/")]
        for cut in cuts:
            for api in self._apis_by_prefix.get(cut, ()):
                prefix = api.match.prefix
                fits = path.startswith(prefix if prefix.endswith("/") else prefix + "/") or path == prefix
                if fits and (not api.match.methods or method in api.match.methods):
                    return api
        return None

    @property
    def claim_headers(self) -> tuple[str, ...]:
        """Every header an issuer maps a claim to: only authz sets them, so clients' are stripped."""
        return tuple(sorted({h for issuer in self.issuers.values() for h in issuer.claims.values()}))

    @functools.cached_property
    def stripped_headers(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What Envoy removes from every client request: (names, family prefixes).

        The defaults and ``identity_headers.strip``, less ``identity_headers.keep``, plus every
        header authz sets (``IDENTITY_HEADERS`` but the pin, which routes own, and the claim
        headers). Names a family already covers are left out.
        """
        policy = self.identity_headers
        entries = [e for e in (*STRIPPED_HEADERS, *STRIPPED_FAMILIES, *policy.strip) if e not in policy.keep]
        entries += [h for h in (*IDENTITY_HEADERS, *self.claim_headers) if h != PIN_HEADER]
        prefixes = tuple(sorted({e[:-1] for e in entries if e.endswith("*")}))
        names = tuple(sorted({e for e in entries if not e.endswith("*") and not e.startswith(prefixes)}))
        return names, prefixes

    def strips(self, name: str) -> bool:
        """Whether Envoy removes header ``name`` (lower case) from client requests."""
        names, prefixes = self.stripped_headers
        return name in names or name.startswith(prefixes)

    @property
    def secret_variables(self) -> tuple[tuple[str, str], ...]:
        """Every environment variable this config reads a secret from: (key path, variable)."""
        found = []
        for name, issuer in self.issuers.items():
            if issuer.shared_secret_env is not None:
                found.append((f"issuers.{name}.shared_secret_env", issuer.shared_secret_env))
            if issuer.introspection is not None:
                found.append(
                    (f"issuers.{name}.introspection.client_secret_env", issuer.introspection.client_secret_env)
                )
        return tuple(found)
