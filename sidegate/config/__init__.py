"""gateway.yaml: policy, validated once at load into frozen typed models.

``load(path)`` reads YAML keeping the line of every key (``positions``), validates it with the
pydantic models (``model``, built on the value types in ``values``) and checks the references
between sections (``references``). Every problem becomes a ``ConfigError`` that reads
``FILE:LINE: dotted.key.path: problem``. The sidecars and the Envoy compiler read the same
``Gateway`` object; checks that need a sidecar's code (extproc's gRPC descriptors) run in that
sidecar and in ``sidegate check``, through ``Gateway.problems``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType

from pydantic import ValidationError

from sidegate.config.mesh import Mesh, MeshAllow, MeshCa, MeshService
from sidegate.config.model import (
    DEFAULT_TRANSLATED_BODY,
    HMAC_ALGORITHMS,
    JWT_ALGORITHMS,
    MAX_REDIS_TIMEOUT,
    MAX_TRANSLATED_BODY,
    SELECTORS,
    Admin,
    Algorithm,
    Api,
    ApiKeys,
    ApiLimit,
    Change,
    CircuitBreaker,
    Claim,
    Date,
    EnvName,
    FieldDefault,
    FieldPath,
    Gateway,
    GrpcRoute,
    GrpcTranslation,
    HeaderName,
    HealthCheck,
    IdpUrl,
    InlineSecret,
    Introspection,
    Issuer,
    Jwks,
    Listener,
    ListenerTimeouts,
    MapValues,
    Match,
    OutlierDetection,
    Plan,
    RateLimiting,
    Rename,
    Retries,
    Selector,
    Service,
    Sidecar,
    Sidecars,
    State,
    Telemetry,
    Tls,
    Translation,
    Up,
    Version,
    Versioning,
    VersionName,
    Wrap,
    XmlName,
    idp_url,
    json_key,
)
from sidegate.config.policy import Auth, RateLimitRule, Scope
from sidegate.config.positions import (
    KeyPath,
    Problem,
    _compose,
    _dotted,
    _line,
    _problem,
    by_line,
    combined,
    compose,
    located,
)
from sidegate.config.references import references
from sidegate.config.values import (
    HTTP_METHODS,
    Duration,
    HeaderStyle,
    HostPort,
    LimitAlgorithm,
    Method,
    Model,
    Name,
    StoreErrorPolicy,
    UnixSocket,
    parse_duration,
)
from sidegate.errors import ConfigError

__all__ = [
    "DEFAULT_TRANSLATED_BODY",
    "HMAC_ALGORITHMS",
    "HTTP_METHODS",
    "JWT_ALGORITHMS",
    "MAX_REDIS_TIMEOUT",
    "MAX_TRANSLATED_BODY",
    "SELECTORS",
    "Admin",
    "Algorithm",
    "Api",
    "ApiKeys",
    "ApiLimit",
    "Auth",
    "Change",
    "CircuitBreaker",
    "Claim",
    "ConfigError",
    "Date",
    "Duration",
    "EnvName",
    "FieldDefault",
    "FieldPath",
    "Gateway",
    "GrpcRoute",
    "GrpcTranslation",
    "HeaderName",
    "HeaderStyle",
    "HealthCheck",
    "HostPort",
    "IdpUrl",
    "InlineSecret",
    "Introspection",
    "Issuer",
    "Jwks",
    "KeyPath",
    "LimitAlgorithm",
    "Listener",
    "ListenerTimeouts",
    "MapValues",
    "Match",
    "Mesh",
    "MeshAllow",
    "MeshCa",
    "MeshService",
    "Method",
    "Model",
    "Name",
    "OutlierDetection",
    "Plan",
    "Problem",
    "RateLimitRule",
    "RateLimiting",
    "Rename",
    "Retries",
    "Scope",
    "Selector",
    "Service",
    "Sidecar",
    "Sidecars",
    "State",
    "StoreErrorPolicy",
    "Telemetry",
    "Tls",
    "Translation",
    "UnixSocket",
    "Up",
    "Version",
    "VersionName",
    "Versioning",
    "Wrap",
    "XmlName",
    "by_line",
    "combined",
    "compose",
    "idp_url",
    "json_key",
    "load",
    "located",
    "parse",
    "parse_duration",
    "references",
    "verify",
]


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
        raise combined(by_line(errors)) from None
    problems = list(references(gateway))
    if problems:
        raise combined(by_line(located(file, lines, problems)))
    gateway._source = (file, MappingProxyType(lines))
    return gateway


def verify(gateway: Gateway, problems: Iterable[Problem]) -> None:
    """Raise one ``ConfigError`` for ``problems`` that a check outside this package found in
    ``gateway`` (extproc's gRPC descriptors), naming the lines of the file it was read from."""
    found = list(problems)
    if found:
        file, lines = gateway.source
        raise combined(by_line(located(file, lines, found)))
