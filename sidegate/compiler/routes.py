"""The route table: one route per API (or per way of asking for a version), a direct answer
where Envoy can say no by itself, and the rate-limit actions of each route.

A route is described first as a spec (``Target``: to an upstream, ``Answer``: Envoy answers).
Plain APIs give one ``Target``; ``versions`` gives a versioned API's specs. ``emit`` alone turns
specs into Envoy routes, so every route gets the same upstream settings, identity-header
stripping, per-filter config and rate limits.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sidegate.compiler import transcoder, versions
from sidegate.compiler.clusters import service_cluster
from sidegate.compiler.envoy import (
    FILTER_AUTHZ,
    FILTER_EXTPROC,
    FILTER_RATELIMIT,
    FILTER_STRIP,
    JSON,
    TYPE,
    disabled,
    duration,
    header,
    match,
)
from sidegate.compiler.specs import Answer, RouteSpec, Target
from sidegate.config import Api, Gateway, Service
from sidegate.contract import (
    AUTHZ,
    AUTHZ_METADATA_NAMESPACE,
    EXTPROC,
    PIN_HEADER,
    RATELIMIT,
    RL_API,
    RL_CONSUMER,
    RL_DEFAULT_CONSUMER,
    RL_IP,
    RL_METHOD,
    RL_NO_PLAN,
    RL_PLAN,
    ROUTE_METADATA,
    rate_limit_shapes,
    route_key,
)


def extproc_override(key: str) -> dict[str, Any]:
    """ext_proc for one route only, naming it to the sidecar (``x-sidegate-route``): headers
    first; the session asks for the bodies (and trailers) it needs."""
    return {
        "@type": TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": "NONE",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "grpc_initial_metadata": [{"key": ROUTE_METADATA, "value": key}],
        },
    }


def plain(api: Api) -> Target:
    """The one route of an API without versions: ext_proc on only when it translates."""
    return Target(
        name=api.name,
        match=match(api.match.prefix, api.match.methods),
        service=api.service,
        extproc_route=route_key(api.name) if api.translate is not None and not transcoder.native(api) else None,
    )


def route(api: Api, gateway: Gateway) -> dict[str, Any]:
    """The Envoy route of an API without versions."""
    return emit(api, gateway, plain(api))


def upstream_action(
    name: str, service: Service, timeout: float | None = None, rewrite: str | None = None
) -> dict[str, Any]:
    """A route action to service ``name``: its cluster, its timeout (or ``timeout``), its retries.
    The edge's routes and a mesh sidecar's outbound routes both use it."""
    action: dict[str, Any] = {"cluster": service_cluster(name), "timeout": duration(timeout or service.timeout)}
    if rewrite is not None:
        action["prefix_rewrite"] = rewrite
    if service.retries.attempts:
        retry: dict[str, Any] = {
            "retry_on": ",".join(service.retries.retry_on),
            "num_retries": service.retries.attempts,
        }
        if service.retries.per_try_timeout is not None:
            retry["per_try_timeout"] = duration(service.retries.per_try_timeout)
        action["retry_policy"] = retry
    return action


def emit(api: Api, gateway: Gateway, spec: RouteSpec) -> dict[str, Any]:
    """The Envoy route for ``spec``, one of ``api``'s routes."""
    if isinstance(spec, Answer):
        return direct(spec.name, spec.match, spec.status, spec.body)
    action = upstream_action(spec.service, gateway.services[spec.service], api.timeout, spec.rewrite)
    result: dict[str, Any] = {"name": spec.name, "match": spec.match, "route": action}
    if spec.version is not None:  # the upstream learns which version the client speaks
        result["request_headers_to_add"] = [header(PIN_HEADER, spec.version)]
    if api.auth.anonymous and not spec.version:
        # Every other identity header is stripped on every route by the listener's first filter
        # (bootstrap.identity_strip). The pin header is left to the routes, which own it: no
        # authz runs here to remove a client's copy, and a version route sets its own.
        result["request_headers_to_remove"] = [PIN_HEADER]
    if spec.response_headers:
        result["response_headers_to_add"] = [header(name, value) for name, value in spec.response_headers]
    context = dict(spec.authz_context or {})
    if gateway.ratelimit.in_authz and rate_limit_shapes(api, gateway):
        context["limits"] = "1"  # authz counts this route
    per_filter: dict[str, Any] = {}
    if api.auth.anonymous and not context:
        per_filter[FILTER_AUTHZ] = disabled(AUTHZ)
    else:
        per_filter[FILTER_AUTHZ] = {
            "@type": TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {"context_extensions": {"api": api.name, **context}},
        }
    rate_limits = route_rate_limits(api, gateway)
    if rate_limits:
        action["rate_limits"] = rate_limits
    else:
        per_filter[FILTER_RATELIMIT] = disabled(RATELIMIT)
    per_filter[FILTER_EXTPROC] = extproc_override(spec.extproc_route) if spec.extproc_route else disabled(EXTPROC)
    native = transcoder.native(api)
    if native is not None:  # the listener's transcoder, on for this route with this API's service
        per_filter[transcoder.FILTER_TRANSCODER] = transcoder.config(api, native, gateway)
        per_filter[FILTER_STRIP] = transcoder.strip_grpc_headers()
    result["typed_per_filter_config"] = per_filter
    return result


def direct(name: str, match: dict[str, Any], status: int, body: str) -> dict[str, Any]:
    """A route Envoy answers itself, with a JSON body and no callout."""
    return {
        "name": name,
        "match": match,
        "direct_response": {"status": status, "body": {"inline_string": body}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": JSON}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ],
        "typed_per_filter_config": {
            FILTER_AUTHZ: disabled(AUTHZ),
            FILTER_RATELIMIT: disabled(RATELIMIT),
            FILTER_EXTPROC: disabled(EXTPROC),
        },
    }


def metadata_action(key: str, default: str) -> dict[str, Any]:
    return {
        "metadata": {
            "descriptor_key": key,
            "metadata_key": {"key": AUTHZ_METADATA_NAMESPACE, "path": [{"key": key}]},
            "default_value": default,
            "source": "DYNAMIC",
        }
    }


def route_rate_limits(api: Api, gateway: Gateway) -> list[dict[str, Any]]:
    """The route's ``rate_limits``: Envoy actions for ``rate_limit_shapes``; [] for none or when
    authz limits in-process. Consumer and plan come from authz's dynamic metadata, always with a
    default (see RL_DEFAULT_CONSUMER): a missing one must never drop the descriptor."""
    if gateway.ratelimit.in_authz:
        return []
    actions = {
        RL_API: {"generic_key": {"descriptor_key": RL_API, "descriptor_value": api.name}},
        RL_CONSUMER: metadata_action(RL_CONSUMER, RL_DEFAULT_CONSUMER),
        RL_PLAN: metadata_action(RL_PLAN, RL_NO_PLAN),
        RL_IP: {"remote_address": {}},
        RL_METHOD: {"request_headers": {"header_name": ":method", "descriptor_key": RL_METHOD}},
    }
    return [{"actions": [actions[key] for key in shape]} for shape in rate_limit_shapes(api, gateway)]


def _not_found() -> dict[str, Any]:
    body = '{"error": "not_found", "message": "no API matches this path"}\n'
    return direct("not_found", {"prefix": "/"}, 404, body)


def table(gateway: Gateway, today: dt.date) -> list[dict[str, Any]]:
    """Every route, most specific first: longer prefixes, then routes that name methods."""
    ordered = sorted(gateway.apis, key=lambda a: (-len(a.match.prefix.rstrip("/")), not a.match.methods))
    out: list[dict[str, Any]] = []
    for api in ordered:
        specs = [plain(api)] if api.versioning is None else versions.specs(api, today)
        out += [emit(api, gateway, spec) for spec in specs]
    return [*out, _not_found()]
