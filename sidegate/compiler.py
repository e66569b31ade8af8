"""Compile a ``Gateway`` into an Envoy v3 bootstrap (a plain dict, dumped as YAML).

Filter order in every listener: ext_authz → ratelimit → ext_proc → router. Each route turns
off the filters it does not need (``disabled`` per route), so Envoy makes no callout that
cannot change the outcome. Routes are ordered most specific first. The compiler checks its
own references: ``envoy --mode validate`` does not notice a gRPC service naming a missing
cluster.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from sidegate import versioning
from sidegate.config import Api, Gateway, HostPort, Listener, Service, Sidecar
from sidegate.contract import (
    AUTHZ,
    AUTHZ_METADATA_NAMESPACE,
    EXTPROC,
    IDENTITY_HEADERS,
    RATELIMIT,
    RATELIMIT_DOMAIN,
    RL_API,
    RL_CONSUMER,
    RL_DEFAULT_CONSUMER,
    RL_IP,
    RL_METHOD,
    RL_NO_PLAN,
    RL_PLAN,
    SIDECAR_GRPC_SERVICE,
    rate_limit_shapes,
    route_key,
)

SIDECAR_CLUSTER = {AUTHZ: "sidegate_authz", RATELIMIT: "sidegate_ratelimit", EXTPROC: "sidegate_extproc"}

_FILTER_AUTHZ = "envoy.filters.http.ext_authz"
_FILTER_RATELIMIT = "envoy.filters.http.ratelimit"
_FILTER_EXTPROC = "envoy.filters.http.ext_proc"
_TYPE = "type.googleapis.com/"
MAX_DOWNSTREAM_CONNECTIONS = 50_000
_JSON = "application/json"


def duration(seconds: float) -> str:
    """Seconds → Envoy's Duration string (``"0.25s"``, ``"86400s"``)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:.3f}".rstrip("0") + "s"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _cluster_base(name: str, endpoints: tuple[HostPort, ...], connect_timeout: float) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC" if all(ep.is_ip for ep in endpoints) else "STRICT_DNS",
        "connect_timeout": duration(connect_timeout),
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(ep.host, ep.port)}} for ep in endpoints]}
            ],
        },
    }


def _http2() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def service_cluster(name: str) -> str:
    return f"svc_{name}"


def _service_cluster(name: str, service: Service) -> dict[str, Any]:
    cluster = _cluster_base(service_cluster(name), service.endpoints, service.connect_timeout)
    breaker = service.circuit_breaker
    cluster["circuit_breakers"] = {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "max_connections": breaker.max_connections,
                "max_pending_requests": breaker.max_pending_requests,
                "max_requests": breaker.max_requests,
                "max_retries": breaker.max_retries,
            }
        ]
    }
    if service.protocol in ("http2", "grpc"):
        cluster["typed_extension_protocol_options"] = _http2()
    if service.health_check is not None:
        hc = service.health_check
        check: dict[str, Any] = {
            "timeout": duration(hc.timeout),
            "interval": duration(hc.interval),
            "no_traffic_interval": duration(hc.interval),
            "healthy_threshold": hc.healthy_threshold,
            "unhealthy_threshold": hc.unhealthy_threshold,
        }
        if service.protocol == "grpc":
            check["grpc_health_check"] = {}
        else:
            check["http_health_check"] = {"path": hc.path}
        cluster["health_checks"] = [check]
    if service.outlier_detection is not None:
        od = service.outlier_detection
        cluster["outlier_detection"] = {
            "consecutive_5xx": od.consecutive_5xx,
            "interval": duration(od.interval),
            "base_ejection_time": duration(od.base_ejection_time),
            "max_ejection_percent": od.max_ejection_percent,
        }
    return cluster


def _sidecar_cluster(kind: str, sidecar: Sidecar) -> dict[str, Any]:
    cluster = _cluster_base(SIDECAR_CLUSTER[kind], sidecar.endpoints, 0.25)
    cluster["typed_extension_protocol_options"] = _http2()
    # A sidecar that says NOT_SERVING (draining) gets no more calls, even when few are left:
    # no "panic mode" spreading calls over replicas that are shutting down.
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    # Every request may call a sidecar: Envoy's defaults (1024 requests, 3 retries in flight)
    # would turn a burst during a replica's drain into refused checks.
    cluster["circuit_breakers"] = {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "max_connections": 1024,
                "max_pending_requests": 65536,
                "max_requests": 65536,
                "max_retries": 1024,
            }
        ]
    }
    cluster["health_checks"] = [
        {
            "timeout": "0.5s",
            "interval": "1s",
            "no_traffic_interval": "2s",
            "healthy_threshold": 1,
            "unhealthy_threshold": 2,
            "grpc_health_check": {"service_name": SIDECAR_GRPC_SERVICE[kind]},
        }
    ]
    return cluster


def _grpc_service(kind: str, sidecar: Sidecar) -> dict[str, Any]:
    # No retry_policy: measured here, Envoy 1.40's async gRPC client did not retry a failed
    # connect to a draining replica. Drain via health checks instead (``--drain``).
    return {"envoy_grpc": {"cluster_name": SIDECAR_CLUSTER[kind]}, "timeout": duration(sidecar.timeout)}


def authz_headers(gateway: Gateway) -> list[str]:
    """The request headers the authz sidecar reads (authz/credentials.py, its log lines)."""
    return sorted({gateway.api_keys.header.lower(), "authorization", "x-request-id", "traceparent"})


def _http_filters(gateway: Gateway) -> list[dict[str, Any]]:
    sc = gateway.sidecars
    return [
        {
            "name": _FILTER_AUTHZ,
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3",
                "grpc_service": _grpc_service(AUTHZ, sc.authz),
                "failure_mode_allow": sc.authz.failure_mode == "allow",
                # Authz unreachable is an outage, not a forbidden client: say so.
                "status_on_error": {"code": "ServiceUnavailable"},
                # Re-match the route after authz only where a route depends on what authz sets
                # or strips: a consumer's version pin. Elsewhere the re-match is wasted work
                # (~10 % of Envoy's CPU per request, measured with `sidegate bench -s authz`).
                "clear_route_cache": versioning.pin_routes(gateway),
                # Only the headers authz reads: the credentials, and the ids its log lines carry.
                # Envoy builds, and the sidecar parses, a smaller CheckRequest, and no other header
                # (cookies, say) leaves Envoy for authz.
                "allowed_headers": {"patterns": [{"exact": name} for name in authz_headers(gateway)]},
            },
        },
        {
            "name": _FILTER_RATELIMIT,
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": RATELIMIT_DOMAIN,
                "timeout": duration(sc.ratelimit.timeout),
                "failure_mode_deny": sc.ratelimit.failure_mode == "deny",
                "rate_limit_service": {
                    "transport_api_version": "V3",
                    "grpc_service": _grpc_service(RATELIMIT, sc.ratelimit),
                },
            },
        },
        {
            "name": _FILTER_EXTPROC,
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": _grpc_service(EXTPROC, sc.extproc),
                "failure_mode_allow": sc.extproc.failure_mode == "allow",
                "message_timeout": duration(sc.extproc.timeout),
                "allow_mode_override": True,
                "processing_mode": {
                    "request_header_mode": "SEND",
                    "response_header_mode": "SKIP",
                    "request_body_mode": "NONE",
                    "response_body_mode": "NONE",
                },
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _disabled(kind: str) -> dict[str, Any]:
    if kind == AUTHZ:
        return {"@type": _TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", "disabled": True}
    if kind == EXTPROC:
        return {"@type": _TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}
    return {"@type": _TYPE + "envoy.config.route.v3.FilterConfig", "disabled": True}


def _translating(api: Api) -> dict[str, Any] | None:
    """ext_proc on an API that translates bodies or protocols, for its route alone; None if not."""
    return None if api.translate is None else versioning.extproc_override(route_key(api.name))


def _match(api: Api) -> dict[str, Any]:
    prefix = api.match.prefix
    match: dict[str, Any] = {"prefix": prefix} if prefix.endswith("/") else {"path_separated_prefix": prefix}
    if api.match.methods:
        regex = "^(" + "|".join(api.match.methods) + ")$"
        match["headers"] = [{"name": ":method", "string_match": {"safe_regex": {"regex": regex}}}]
    return match


def route(
    api: Api,
    gateway: Gateway,
    *,
    name: str | None = None,
    match: dict[str, Any] | None = None,
    service_name: str | None = None,
    rewrite: str | None = None,
    authz_context: dict[str, str] | None = None,
    extproc: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Envoy route of ``api``: its upstream, timeouts, retries, limits, and per-filter config.

    Versioned APIs call this once per (version, way of asking) with their own name, match,
    upstream, prefix rewrite, authz context and ext_proc override.
    """
    service_name = service_name or api.service
    service = gateway.services[service_name]
    action: dict[str, Any] = {
        "cluster": service_cluster(service_name),
        "timeout": duration(api.timeout or service.timeout),
    }
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
    per_filter: dict[str, Any] = {}
    result: dict[str, Any] = {"name": name or api.name, "match": match or _match(api), "route": action}
    if api.auth.anonymous:
        # No authz on this route, so nobody else strips identity headers a client forged
        # (nor the headers issuers map token claims to).
        result["request_headers_to_remove"] = [*IDENTITY_HEADERS, *gateway.claim_headers]
    if gateway.ratelimit.in_authz and rate_limit_shapes(api, gateway):
        authz_context = {**(authz_context or {}), "limits": "1"}  # authz counts this route
    if api.auth.anonymous and not authz_context:
        per_filter[_FILTER_AUTHZ] = _disabled(AUTHZ)
    else:
        per_filter[_FILTER_AUTHZ] = {
            "@type": _TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {"context_extensions": {"api": api.name, **(authz_context or {})}},
        }
    rate_limits = route_rate_limits(api, gateway)
    if rate_limits:
        action["rate_limits"] = rate_limits
    else:
        per_filter[_FILTER_RATELIMIT] = _disabled(RATELIMIT)
    per_filter[_FILTER_EXTPROC] = extproc or _disabled(EXTPROC)
    result["typed_per_filter_config"] = per_filter
    return result


def _direct(name: str, match: dict[str, Any], status: int, body: str) -> dict[str, Any]:
    """A route Envoy answers itself, with a JSON body and no callout."""
    return {
        "name": name,
        "match": match,
        "direct_response": {"status": status, "body": {"inline_string": body}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": _JSON}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ],
        "typed_per_filter_config": {
            _FILTER_AUTHZ: _disabled(AUTHZ),
            _FILTER_RATELIMIT: _disabled(RATELIMIT),
            _FILTER_EXTPROC: _disabled(EXTPROC),
        },
    }


def _metadata_action(key: str, default: str) -> dict[str, Any]:
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
        RL_CONSUMER: _metadata_action(RL_CONSUMER, RL_DEFAULT_CONSUMER),
        RL_PLAN: _metadata_action(RL_PLAN, RL_NO_PLAN),
        RL_IP: {"remote_address": {}},
        RL_METHOD: {"request_headers": {"header_name": ":method", "descriptor_key": RL_METHOD}},
    }
    return [{"actions": [actions[key] for key in shape]} for shape in rate_limit_shapes(api, gateway)]


def _not_found() -> dict[str, Any]:
    body = '{"error": "not_found", "message": "no API matches this path"}\n'
    return _direct("not_found", {"prefix": "/"}, 404, body)


def _routes(gateway: Gateway, today: dt.date) -> list[dict[str, Any]]:
    # Most specific first: longer prefixes, then routes that name methods.
    ordered = sorted(gateway.apis, key=lambda a: (-len(a.match.prefix.rstrip("/")), not a.match.methods))
    routes: list[dict[str, Any]] = []
    for api in ordered:
        if api.versioning is None:
            routes.append(route(api, gateway, extproc=_translating(api)))
        else:
            routes += versioning.routes(api, gateway, today, route, _direct)
    return [*routes, _not_found()]


def _tls(listener: Listener, state_dir: str) -> dict[str, Any]:
    assert listener.tls is not None
    cert = listener.tls.cert or str(Path(state_dir) / "tls" / "server.crt")
    key = listener.tls.key or str(Path(state_dir) / "tls" / "server.key")
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_" + listener.tls.min_version[-1]},
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [{"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}],
            },
        },
    }


OTLP_CLUSTER = "sidegate_otlp"


def _tracing(gateway: Gateway) -> dict[str, Any]:
    """Envoy traces every sampled request with OpenTelemetry (W3C traceparent), exported by
    OTLP/gRPC; its calls to the sidecars carry the trace, and their spans join it."""
    telemetry = gateway.telemetry
    return {
        "random_sampling": {"value": telemetry.sampling},
        "spawn_upstream_span": True,
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": _TYPE + "envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
                "service_name": telemetry.service_name,
            },
        },
    }


def _listener(listener: Listener, gateway: Gateway, state_dir: str, today: dt.date) -> dict[str, Any]:
    hcm = {
        "@type": _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": listener.name,
        "codec_type": "AUTO",
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "route_config": {
            "name": "sidegate",
            "virtual_hosts": [{"name": "sidegate", "domains": ["*"], "routes": _routes(gateway, today)}],
        },
        "http_filters": _http_filters(gateway),
    }
    if gateway.telemetry.otlp is not None:
        hcm["tracing"] = _tracing(gateway)
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if listener.tls is not None:
        chain["transport_socket"] = _tls(listener, state_dir)
    return {
        "name": listener.name,
        "address": _address(listener.address, listener.port),
        "filter_chains": [chain],
    }


def compile_bootstrap(
    gateway: Gateway, *, state_dir: str = ".sidegate", listen_address: str | None = None, today: dt.date | None = None
) -> dict[str, Any]:
    """Return the Envoy bootstrap for ``gateway``; TLS files default to ``state_dir/tls``.

    ``listen_address`` replaces every listener's address (containers listen on 0.0.0.0 while
    the same gateway.yaml on a laptop stays on loopback). ``today`` (UTC by default) decides
    which versions are already past their sunset and answered 410 by Envoy itself.
    """
    today = today or dt.datetime.now(dt.UTC).date()
    if listen_address is not None:
        listeners = tuple(lst.model_copy(update={"address": listen_address}) for lst in gateway.listeners)
        gateway = gateway.model_copy(update={"listeners": listeners})
    clusters = [_service_cluster(name, svc) for name, svc in gateway.services.items()]
    clusters += [_sidecar_cluster(kind, getattr(gateway.sidecars, kind)) for kind in (AUTHZ, RATELIMIT, EXTPROC)]
    if gateway.telemetry.otlp is not None:
        collector = _cluster_base(OTLP_CLUSTER, (gateway.telemetry.otlp,), 1.0)
        collector["typed_extension_protocol_options"] = _http2()
        clusters.append(collector)
    bootstrap = {
        "admin": {"address": _address(gateway.admin.address, gateway.admin.port)},
        "static_resources": {
            "listeners": [_listener(lst, gateway, state_dir, today) for lst in gateway.listeners],
            "clusters": clusters,
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPE
                        + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
    }
    _check_references(bootstrap)
    return bootstrap


def _check_references(bootstrap: dict[str, Any]) -> None:
    """Every cluster a route or gRPC service names must exist (Envoy's validate misses gRPC ones)."""
    names = {c["name"] for c in bootstrap["static_resources"]["clusters"]}
    wanted: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("cluster", "cluster_name") and isinstance(value, str):
                    wanted.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(bootstrap["static_resources"]["listeners"])
    missing = wanted - names
    if missing:
        raise AssertionError(f"compiler bug: clusters referenced but not defined: {sorted(missing)}")


def file_xds(bootstrap: dict[str, Any], directory: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split a static bootstrap for live reload: (bootstrap, CDS file, LDS file).

    The bootstrap keeps the admin interface and points Envoy's dynamic resources at two files
    it watches; replacing a file (a rename, never an in-place write) hands Envoy new clusters or
    listeners without a restart. Listeners that keep their name are updated in place and drain
    their old connections, so no request in flight is dropped.
    """
    static = bootstrap["static_resources"]
    version = hashlib.sha256(json.dumps(static, sort_keys=True).encode()).hexdigest()[:16]

    def resources(kind: str, type_url: str) -> dict[str, Any]:
        return {"version_info": version, "resources": [{"@type": _TYPE + type_url, **r} for r in static[kind]]}

    def source(name: str) -> dict[str, Any]:
        return {"path_config_source": {"path": str(directory / name)}, "resource_api_version": "V3"}

    dynamic = {k: v for k, v in bootstrap.items() if k != "static_resources"}
    dynamic["node"] = {"id": "sidegate", "cluster": "sidegate"}
    dynamic["dynamic_resources"] = {"cds_config": source("cds.yaml"), "lds_config": source("lds.yaml")}
    return (
        dynamic,
        resources("clusters", "envoy.config.cluster.v3.Cluster"),
        resources("listeners", "envoy.config.listener.v3.Listener"),
    )


HEADER = "# Generated by `sidegate envoy-config --config {source}{flags}`. Do not edit by hand.\n"


def render(gateway: Gateway, *, source: str, state_dir: str = ".sidegate", listen_address: str | None = None) -> str:
    """The bootstrap as YAML text, with a header naming the command that made it."""
    bootstrap = compile_bootstrap(gateway, state_dir=state_dir, listen_address=listen_address)
    body = yaml.safe_dump(bootstrap, sort_keys=False, width=100)
    flags = f" --listen-address {listen_address}" if listen_address else ""
    return HEADER.format(source=source, flags=flags) + body
