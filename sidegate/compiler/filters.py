"""The HTTP filters that call the authz and ratelimit sidecars, and Envoy's tracing: the edge's
listeners and a mesh sidecar's inbound listener build them alike."""

from __future__ import annotations

from typing import Any

from sidegate.compiler.clusters import OTLP_CLUSTER, grpc_service
from sidegate.compiler.envoy import FILTER_AUTHZ, FILTER_RATELIMIT, TYPE, duration
from sidegate.config import Gateway
from sidegate.contract import AUTHZ, RATELIMIT, RATELIMIT_DOMAIN


def authz_headers(gateway: Gateway) -> list[str]:
    """The request headers the authz sidecar reads (authz/credentials.py, its log lines)."""
    return sorted({gateway.api_keys.header.lower(), "authorization", "x-request-id", "traceparent"})


def authz_filter(gateway: Gateway, *, clear_route_cache: bool = False) -> dict[str, Any]:
    """Envoy's ext_authz filter, calling the authz sidecar."""
    sc = gateway.sidecars
    return {
        "name": FILTER_AUTHZ,
        "typed_config": {
            "@type": TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "grpc_service": grpc_service(AUTHZ, sc.authz),
            "failure_mode_allow": sc.authz.failure_mode == "allow",
            # Authz unreachable is an outage, not a forbidden client: say so.
            "status_on_error": {"code": "ServiceUnavailable"},
            # Re-match the route after authz only where a route depends on what authz sets
            # or strips: a consumer's version pin. Elsewhere the re-match is wasted work
            # (~10 % of Envoy's CPU per request, measured with `sidegate bench -s authz`).
            "clear_route_cache": clear_route_cache,
            # Only the headers authz reads: the credentials, and the ids its log lines carry.
            # Envoy builds, and the sidecar parses, a smaller CheckRequest, and no other header
            # (cookies, say) leaves Envoy for authz.
            "allowed_headers": {"patterns": [{"exact": name} for name in authz_headers(gateway)]},
        },
    }


def ratelimit_filter(gateway: Gateway) -> dict[str, Any]:
    """Envoy's ratelimit filter, calling the ratelimit sidecar in the gateway's domain."""
    sc = gateway.sidecars
    return {
        "name": FILTER_RATELIMIT,
        "typed_config": {
            "@type": TYPE + "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": RATELIMIT_DOMAIN,
            "timeout": duration(sc.ratelimit.timeout),
            "failure_mode_deny": sc.ratelimit.failure_mode == "deny",
            # The rate-limit service unreachable with failure_mode: deny is an outage: 503 (with
            # the edge's JSON body), as for authz and extproc, where Envoy's default is 500.
            "status_on_error": {"code": "ServiceUnavailable"},
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": grpc_service(RATELIMIT, sc.ratelimit),
            },
        },
    }


def tracing(gateway: Gateway, service_name: str) -> dict[str, Any]:
    """Envoy traces every sampled request with OpenTelemetry (W3C traceparent), exported by
    OTLP/gRPC as ``service_name``; its calls to the sidecars carry the trace, and their spans
    join it. A request that arrives with a ``traceparent`` continues that trace."""
    telemetry = gateway.telemetry
    return {
        "random_sampling": {"value": telemetry.sampling},
        "spawn_upstream_span": True,
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": TYPE + "envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
                "service_name": service_name,
            },
        },
    }
