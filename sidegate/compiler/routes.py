"""The route table: one route per API (or per way of asking for a version), a direct answer
where Envoy can say no by itself, and the rate-limit actions of each route.

A route is described first as a spec (``Target``: to an upstream, ``Answer``: Envoy answers).
Plain APIs give one ``Target``; ``versions`` gives a versioned API's specs. ``emit`` alone turns
specs into Envoy routes, so every route gets the same upstream settings, identity-header
stripping, per-filter config and rate limits.

The table is compact: a big gateway's thousands of routes would otherwise repeat the same
blocks. What most routes share is said once, on the virtual host (``virtual_host``): authz and
ext_proc are off there (a route that needs one turns it on with its own config), the plan's
rate-limit descriptor is there (routes with limits of their own ask Envoy to add it after theirs),
and so is the most common retry policy.
A route says only where it differs, and nothing Envoy does by default (a 15 s timeout, no
rate-limit call for a route without descriptors or without an upstream).
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from sidegate.compiler import groups, transcoder, versions
from sidegate.compiler.clusters import service_cluster
from sidegate.compiler.envoy import (
    FILTER_AUTHZ,
    FILTER_EXTPROC,
    FILTER_OFF,
    FILTER_RATELIMIT,
    FILTER_STRIP,
    JSON,
    TYPE,
    disabled,
    duration,
    header,
    match,
)
from sidegate.compiler.specs import Answer, Reach, RouteSpec, Target
from sidegate.config import Api, Gateway, Service
from sidegate.contract import (
    AUTHZ_METADATA_NAMESPACE,
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

# Envoy's default route timeout: a route with this one says nothing.
ENVOY_ROUTE_TIMEOUT = 15.0


# What a route that turns ext_proc on sends first: the headers both ways (the listener's filter
# sends only the request's, so that a local reply with no route never waits on ext_proc).
EXTPROC_MODE = {"request_header_mode": "SEND", "response_header_mode": "SEND"}


def extproc_override(key: str) -> dict[str, Any]:
    """ext_proc for one route only, naming it to the sidecar (``x-sidegate-route``): the headers
    both ways first (``EXTPROC_MODE``); the session asks for the bodies (and trailers) it needs."""
    return {
        "@type": TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {
            "processing_mode": EXTPROC_MODE,
            "grpc_initial_metadata": [{"key": ROUTE_METADATA, "value": key}],
        },
    }


def authz_on(api: str, context: Mapping[str, str]) -> dict[str, Any]:
    """ext_authz on for one route, naming its API (and version) to authz."""
    return {
        "@type": TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
        "check_settings": {"context_extensions": {"api": api, **context}},
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
    action: dict[str, Any] = {"cluster": service_cluster(name)}
    if (timeout or service.timeout) != ENVOY_ROUTE_TIMEOUT:
        action["timeout"] = duration(timeout or service.timeout)
    if rewrite is not None:
        action["prefix_rewrite"] = rewrite
    retry = retry_policy(service)
    if retry is not None:
        action["retry_policy"] = retry
    return action


def retry_policy(service: Service) -> dict[str, Any] | None:
    """The service's retry policy, or None when it does not retry."""
    if not service.retries.attempts:
        return None
    retry: dict[str, Any] = {"retry_on": ",".join(service.retries.retry_on), "num_retries": service.retries.attempts}
    if service.retries.per_try_timeout is not None:
        retry["per_try_timeout"] = duration(service.retries.per_try_timeout)
    return retry


# A route's own descriptors, then the virtual host's (Envoy's default is one or the other).
VH_INCLUDE = {
    "@type": TYPE + "envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute",
    "vh_rate_limits": "INCLUDE",
}


class _Limits:
    """The rate-limit side of a gateway's routes, worked out once: the descriptors the virtual
    host gives every route that has none of its own, and each API's own (``for_api``)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.actions: dict[str, dict[str, Any] | None] = {
            RL_API: None,  # per API: its name
            RL_CONSUMER: metadata_action(RL_CONSUMER, RL_DEFAULT_CONSUMER),
            RL_PLAN: metadata_action(RL_PLAN, RL_NO_PLAN),
            RL_IP: {"remote_address": {}},
            RL_METHOD: {"request_headers": {"header_name": ":method", "descriptor_key": RL_METHOD}},
        }
        # Every route with credentials is counted by its consumer's plan when plans exist: that
        # descriptor goes on the virtual host, for every route without descriptors of its own.
        self.plan_shape = (RL_PLAN, RL_CONSUMER, RL_METHOD)
        with_plans = bool(gateway.plans) and not gateway.ratelimit.in_authz
        self.vhost_shapes = [self.plan_shape] if with_plans else []
        self.vhost = [self.descriptor(None, self.plan_shape)] if with_plans else []

    def descriptor(self, api: str | None, shape: tuple[str, ...]) -> dict[str, Any]:
        api_key = {"generic_key": {"descriptor_key": RL_API, "descriptor_value": api}}
        return {"actions": [api_key if key == RL_API else self.actions[key] for key in shape]}

    def for_api(self, api: Api) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """(the route's ``rate_limits``, the rate-limit filter's config for the route or None).

        Envoy takes a route's own descriptors, or the virtual host's when it has none: a route
        whose shapes are the virtual host's says nothing; one with none under a virtual host
        that has some turns the filter off; one with shapes of its own lists them, and where
        the virtual host's come last, asks Envoy to add those (``vh_rate_limits: INCLUDE``)
        instead of listing them again."""
        if self.gateway.ratelimit.in_authz:
            return [], None
        shapes = rate_limit_shapes(api, self.gateway)
        if shapes == self.vhost_shapes:
            return [], None
        if not shapes:
            return [], disabled(RATELIMIT)
        own = len(shapes) - len(self.vhost_shapes)
        if self.vhost_shapes and shapes[own:] == self.vhost_shapes:
            return [self.descriptor(api.name, shape) for shape in shapes[:own]], VH_INCLUDE
        return [self.descriptor(api.name, shape) for shape in shapes], None


def emit(api: Api, gateway: Gateway, spec: RouteSpec, limits: _Limits | None = None) -> dict[str, Any]:
    """The Envoy route for ``spec``, one of ``api``'s routes, under ``virtual_host``'s defaults."""
    if isinstance(spec, Answer):
        return direct(spec.name, spec.match, spec.status, spec.body)
    limits = limits or _Limits(gateway)
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
    if not api.auth.anonymous or context:
        per_filter[FILTER_AUTHZ] = authz_on(api.name, context)
    rate_limits, ratelimit_config = limits.for_api(api)
    if rate_limits:
        action["rate_limits"] = rate_limits
    if ratelimit_config is not None:
        per_filter[FILTER_RATELIMIT] = ratelimit_config
    if spec.extproc_route:
        per_filter[FILTER_EXTPROC] = extproc_override(spec.extproc_route)
    native = transcoder.native(api)
    if native is not None:  # the listener's transcoder, on for this route with this API's service
        per_filter[transcoder.FILTER_TRANSCODER] = transcoder.config(api, native, gateway)
        per_filter[FILTER_STRIP] = transcoder.strip_grpc_headers()
    if per_filter:
        result["typed_per_filter_config"] = per_filter
    return result


def direct(name: str, match: dict[str, Any], status: int, body: str) -> dict[str, Any]:
    """A route Envoy answers itself, with a JSON body and no callout: the virtual host turns
    authz and ext_proc off, and the rate-limit filter counts no route without an upstream."""
    return {
        "name": name,
        "match": match,
        "direct_response": {"status": status, "body": {"inline_string": body}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": JSON}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ],
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
    """Every descriptor a request to ``api`` is counted by, as Envoy actions for
    ``rate_limit_shapes`` (the virtual host's included); [] for none or when authz limits
    in-process. Consumer and plan come from authz's dynamic metadata, always with a default
    (see RL_DEFAULT_CONSUMER): a missing one must never drop the descriptor."""
    if gateway.ratelimit.in_authz:
        return []
    limits = _Limits(gateway)
    return [limits.descriptor(api.name, shape) for shape in rate_limit_shapes(api, gateway)]


def _not_found() -> dict[str, Any]:
    body = '{"error": "not_found", "message": "no API matches this path"}\n'
    return direct("not_found", {"prefix": "/"}, 404, body)


def virtual_host(gateway: Gateway, today: dt.date) -> dict[str, Any]:
    """The one virtual host: every route, most specific first (longer prefixes, then routes that
    name methods), grouped by path prefix when there are many (``groups``), and what most routes
    share, said once."""
    limits = _Limits(gateway)
    ordered = sorted(gateway.apis, key=lambda a: (-len(a.match.prefix.rstrip("/")), not a.match.methods))
    routes: list[dict[str, Any]] = []
    reaches: list[Reach] = []
    for api in ordered:
        for spec in [plain(api)] if api.versioning is None else versions.specs(api, today):
            route = emit(api, gateway, spec, limits)
            reach = groups.reach_of(spec.match, spec.reach if isinstance(spec, Answer) else None)
            if api.auth.anonymous and "route" in route and FILTER_AUTHZ not in route.get("typed_per_filter_config", {}):
                routes.append(key_in_query_guard(api, gateway, route))
                reaches.append(reach)
            routes.append(route)
            reaches.append(reach)
    routes.append(_not_found())
    reaches.append(Reach("/"))
    vhost: dict[str, Any] = {"name": "sidegate", "domains": ["*"]}
    if len(routes) > groups.GROUP_FROM:  # a request walks only the routes its path can match
        vhost["matcher"] = groups.matcher(routes, reaches)
    else:
        vhost["routes"] = routes
    # Off unless a route turns it on: no callout that cannot change the outcome.
    vhost["typed_per_filter_config"] = {FILTER_AUTHZ: FILTER_OFF, FILTER_EXTPROC: FILTER_OFF}
    if limits.vhost:
        vhost["rate_limits"] = limits.vhost
    retry = _shared_retry_policy(routes)
    if retry is not None:
        vhost["retry_policy"] = retry
    return vhost


def key_in_query_guard(api: Api, gateway: Gateway, route: dict[str, Any]) -> dict[str, Any]:
    """A twin of an anonymous route, matched first, that calls authz for a request whose query
    carries a value shaped like an API key of this gateway, so that authz strips it: a key sent
    to an API that does not read it still never reaches the upstream. Other requests skip authz,
    as before; the twin costs them one regular expression on the path."""
    prefix = re.escape(gateway.api_keys.prefix)
    regex = rf"[^?]*\?(.*&)?[^=&#]*={prefix}_[a-z0-9]*_[a-z2-7]{{8,}}_[a-z2-7]{{16,}}([&#].*)?"
    guard = copy.deepcopy(route)
    guard["name"] = route["name"] + ":key_in_query"
    guard["match"].setdefault("headers", []).append({"name": ":path", "string_match": {"safe_regex": {"regex": regex}}})
    guard.setdefault("typed_per_filter_config", {})[FILTER_AUTHZ] = authz_on(api.name, {})
    return guard


def _shared_retry_policy(routes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Move the most common retry policy to the virtual host, when more routes retry that way
    than not at all: routes with it say nothing, routes without retries say so
    (``num_retries: 0``), as a route's policy replaces the virtual host's whole."""
    counts: Counter[tuple[tuple[str, Any], ...]] = Counter()
    for r in routes:
        if "route" in r:
            policy = r["route"].get("retry_policy")
            counts[tuple(sorted(policy.items())) if policy else ()] += 1
    common = [key for key, _ in counts.most_common() if key]
    if not common or counts[common[0]] <= counts[()]:
        return None
    shared = dict(common[0])
    for r in routes:
        if "route" in r:
            action = r["route"]
            policy = action.get("retry_policy")
            if policy is None:
                action["retry_policy"] = NO_RETRIES
            elif policy == shared:
                del action["retry_policy"]
    return shared


NO_RETRIES = {"num_retries": 0}
