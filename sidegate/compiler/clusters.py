"""Clusters: one per upstream service (timeouts, health checks, circuit breakers, outlier
detection), one per sidecar (health-checked gRPC over HTTP/2), and the OTLP collector's."""

from __future__ import annotations

from typing import Any

from sidegate.compiler.envoy import TYPE, address, duration
from sidegate.config import HostPort, Service, Sidecar, UnixSocket
from sidegate.contract import (
    AUTHZ,
    EXTPROC,
    RATELIMIT,
    SIDECAR_GRPC_SERVICE,
    worker_socket,
)

SIDECAR_CLUSTER = {AUTHZ: "sidegate_authz", RATELIMIT: "sidegate_ratelimit", EXTPROC: "sidegate_extproc"}


OTLP_CLUSTER = "sidegate_otlp"


def cluster_base(name: str, endpoints: tuple[HostPort, ...], connect_timeout: float) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC" if all(ep.is_ip for ep in endpoints) else "STRICT_DNS",
        "connect_timeout": duration(connect_timeout),
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(ep.host, ep.port)}} for ep in endpoints]}],
        },
    }


def http2() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def service_cluster(name: str) -> str:
    return f"svc_{name}"


def upstream_cluster(name: str, service: Service) -> dict[str, Any]:
    cluster = cluster_base(service_cluster(name), service.endpoints, service.connect_timeout)
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
        cluster["typed_extension_protocol_options"] = http2()
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


def sidecar_sockets(sidecar: Sidecar, socket_dir: str) -> list[str]:
    """Every worker socket of ``sidecar``'s ``unix:`` addresses (``workers`` of each, 1 unset),
    a relative one under ``socket_dir``."""
    workers = sidecar.workers or 1
    return [
        worker_socket(ep.resolve(socket_dir), n)
        for ep in sidecar.endpoints
        if isinstance(ep, UnixSocket)
        for n in range(workers)
    ]


def sidecar_cluster(kind: str, sidecar: Sidecar, socket_dir: str = ".sidegate") -> dict[str, Any]:
    tcp = tuple(ep for ep in sidecar.endpoints if isinstance(ep, HostPort))
    cluster = cluster_base(SIDECAR_CLUSTER[kind], tcp, 0.25)
    # One endpoint per worker socket: Envoy health-checks each worker and balances calls over
    # them, where on one TCP port its few connections land on whichever workers accepted them.
    pipes = [{"endpoint": {"address": {"pipe": {"path": path}}}} for path in sidecar_sockets(sidecar, socket_dir)]
    if pipes:
        if not tcp:
            cluster["type"] = "STATIC"
            cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": []}]
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] += pipes
    cluster["typed_extension_protocol_options"] = http2()
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
    # A worker that dies refuses connections at once: three local failures in a row (refused
    # connects, resets, timeouts) take it out of the balancing for 3 s, long enough for its
    # replacement to start, where the health checks need two intervals. Not one failure: a
    # single slow call is no reason to halve the capacity. Never the last one (at most half the
    # endpoints), and never longer than 3 s (a worker that only hung is back with the next).
    cluster["outlier_detection"] = {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 3,
        "enforcing_consecutive_local_origin_failure": 100,
        "consecutive_5xx": 1_000_000,  # a sidecar's answers are not errors of the host
        "consecutive_gateway_failure": 1_000_000,
        "enforcing_success_rate": 0,
        "enforcing_local_origin_success_rate": 0,
        "interval": "1s",
        "base_ejection_time": "3s",
        "max_ejection_time": "3s",
        "max_ejection_percent": 50,
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


def collector_cluster(otlp: HostPort) -> dict[str, Any]:
    """The OpenTelemetry collector's cluster: OTLP over gRPC."""
    collector = cluster_base(OTLP_CLUSTER, (otlp,), 1.0)
    collector["typed_extension_protocol_options"] = http2()
    return collector


def grpc_service(kind: str, sidecar: Sidecar) -> dict[str, Any]:
    # No retry_policy: measured here, Envoy 1.40's async gRPC client did not retry a failed
    # connect to a draining replica. Drain via health checks instead (``--drain``).
    return {"envoy_grpc": {"cluster_name": SIDECAR_CLUSTER[kind]}, "timeout": duration(sidecar.timeout)}
