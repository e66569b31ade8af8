"""Envoy's spellings that every part of the compiler shares: type URLs, filter names, durations,
addresses, a filter turned off for one route, and the one route-match helper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidegate.contract import (
    AUTHZ,
    EXTPROC,
)

TYPE = "type.googleapis.com/"
FILTER_HEADER_LIMITS = "envoy.filters.http.rbac"
FILTER_STRIP = "envoy.filters.http.header_mutation"
FILTER_AUTHZ = "envoy.filters.http.ext_authz"
FILTER_RATELIMIT = "envoy.filters.http.ratelimit"
FILTER_EXTPROC = "envoy.filters.http.ext_proc"
JSON = "application/json"
OVERWRITE = "OVERWRITE_IF_EXISTS_OR_ADD"


def duration(seconds: float) -> str:
    """Seconds → Envoy's Duration string (``"0.25s"``, ``"86400s"``)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:.3f}".rstrip("0") + "s"


def address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


# A filter off on a virtual host or route: Envoy leaves it out of the request's filter chain.
# A route that needs it on gives its own config, which Envoy takes over the virtual host's.
FILTER_OFF = {"@type": TYPE + "envoy.config.route.v3.FilterConfig", "disabled": True}


def disabled(kind: str) -> dict[str, Any]:
    """The per-route config that turns the ``kind`` sidecar's filter off on one route."""
    if kind == AUTHZ:
        return {"@type": TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", "disabled": True}
    if kind == EXTPROC:
        return {"@type": TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}
    return {"@type": TYPE + "envoy.config.route.v3.FilterConfig", "disabled": True}


def header(name: str, value: str) -> dict[str, Any]:
    """A header to add, replacing any the request or response had."""
    return {"header": {"key": name, "value": value}, "append_action": OVERWRITE}


def match(
    prefix: str,
    methods: Sequence[str] = (),
    headers: Sequence[dict[str, Any]] = (),
    query: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A route match: a path prefix (on segment boundaries unless it ends with ``/``), the
    methods as a ``:method`` header regex, and any other header and query matchers."""
    out: dict[str, Any] = {"prefix": prefix} if prefix.endswith("/") else {"path_separated_prefix": prefix}
    all_headers = list(headers)
    if methods:
        regex = "^(" + "|".join(methods) + ")$"
        all_headers.append({"name": ":method", "string_match": {"safe_regex": {"regex": regex}}})
    if all_headers:
        out["headers"] = all_headers
    if query:
        out["query_parameters"] = list(query)
    return out


def cel(expression: str) -> dict[str, Any]:
    """An access-log filter (as local-reply mappers take) that holds when ``expression`` does."""
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": TYPE + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }
