"""The whole bootstrap: the sidecars' HTTP filters, listeners with TLS and tracing, the clusters,
the overload manager; its file-based xDS split for live reload; and the YAML text."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from sidegate.compiler import mesh, versions
from sidegate.compiler.clusters import (
    OTLP_CLUSTER,
    cluster_base,
    grpc_service,
    http2,
    sidecar_cluster,
)
from sidegate.compiler.envoy import (
    FILTER_AUTHZ,
    FILTER_EXTPROC,
    FILTER_RATELIMIT,
    FILTER_STRIP,
    TYPE,
    address,
    duration,
)
from sidegate.compiler.routes import table
from sidegate.config import Gateway, Listener
from sidegate.contract import (
    AUTHZ,
    EXTPROC,
    RATELIMIT,
    RATELIMIT_DOMAIN,
)

MAX_DOWNSTREAM_CONNECTIONS = 50_000


def authz_headers(gateway: Gateway) -> list[str]:
    """The request headers the authz sidecar reads (authz/credentials.py, its log lines)."""
    return sorted({gateway.api_keys.header.lower(), "authorization", "x-request-id", "traceparent"})


def identity_strip(gateway: Gateway) -> dict[str, Any]:
    """The first filter of every listener: it removes the identity headers a client may have
    forged (``Gateway.stripped_headers``), on every route, before any other filter reads the
    request. Families are prefix matchers (``remove_on_match``), which a route's
    ``request_headers_to_remove`` cannot express. What authz sets comes later in the chain, so
    the gateway's own identity headers are set after the strip."""
    names, prefixes = gateway.stripped_headers
    mutations: list[dict[str, Any]] = [{"remove": name} for name in names]
    mutations += [{"remove_on_match": {"key_matcher": {"prefix": prefix}}} for prefix in prefixes]
    return {
        "name": FILTER_STRIP,
        "typed_config": {
            "@type": TYPE + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": mutations},
        },
    }


def _http_filters(gateway: Gateway) -> list[dict[str, Any]]:
    sc = gateway.sidecars
    return [
        identity_strip(gateway),
        {
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
                "clear_route_cache": versions.pin_routes(gateway),
                # Only the headers authz reads: the credentials, and the ids its log lines carry.
                # Envoy builds, and the sidecar parses, a smaller CheckRequest, and no other header
                # (cookies, say) leaves Envoy for authz.
                "allowed_headers": {"patterns": [{"exact": name} for name in authz_headers(gateway)]},
            },
        },
        {
            "name": FILTER_RATELIMIT,
            "typed_config": {
                "@type": TYPE + "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": RATELIMIT_DOMAIN,
                "timeout": duration(sc.ratelimit.timeout),
                "failure_mode_deny": sc.ratelimit.failure_mode == "deny",
                "rate_limit_service": {
                    "transport_api_version": "V3",
                    "grpc_service": grpc_service(RATELIMIT, sc.ratelimit),
                },
            },
        },
        {
            "name": FILTER_EXTPROC,
            "typed_config": {
                "@type": TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": grpc_service(EXTPROC, sc.extproc),
                "failure_mode_allow": sc.extproc.failure_mode == "allow",
                "message_timeout": duration(sc.extproc.timeout),
                # extproc unreachable or too slow is an outage, as for authz: 503, not 500.
                "status_on_error": {"code": "ServiceUnavailable"},
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
            "typed_config": {"@type": TYPE + "envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _tls(listener: Listener, state_dir: str) -> dict[str, Any]:
    assert listener.tls is not None
    cert = listener.tls.cert or str(Path(state_dir) / "tls" / "server.crt")
    key = listener.tls.key or str(Path(state_dir) / "tls" / "server.key")
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_" + listener.tls.min_version[-1]},
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [{"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}],
            },
        },
    }


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
                "@type": TYPE + "envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
                "service_name": telemetry.service_name,
            },
        },
    }


# Envoy's own answers when a sidecar cannot be asked (unreachable, too slow, broken) carry no
# body. Give them the JSON body every other error has; a sidecar's own answers keep theirs.
SIDECAR_ERROR = {
    "error": "sidecar_unavailable",
    "message": "the gateway cannot check this request now; try again later",
}


def _local_replies() -> dict[str, Any]:
    errors = "response.code_details.startsWith('ext_authz_error') || response.code_details.startsWith('ext_proc_error')"
    return {
        "mappers": [
            {
                "filter": {
                    "extension_filter": {
                        "name": "envoy.access_loggers.extension_filters.cel",
                        "typed_config": {
                            "@type": TYPE + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                            "expression": errors,
                        },
                    }
                },
                "status_code": 503,
                "body_format_override": {"json_format": SIDECAR_ERROR},
            }
        ]
    }


def _listener(listener: Listener, gateway: Gateway, state_dir: str, today: dt.date) -> dict[str, Any]:
    hcm = {
        "@type": TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": listener.name,
        "codec_type": "AUTO",
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        # %2F and %5C (any case) are decoded before normalizing and routing: /public/..%2Forders
        # is /orders, with its credentials, and never an anonymous route's path sent on as is.
        "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
        "request_headers_timeout": duration(listener.timeouts.request_headers),
        "request_timeout": duration(listener.timeouts.request),
        "stream_idle_timeout": duration(listener.timeouts.stream_idle),
        "route_config": {
            "name": "sidegate",
            "virtual_hosts": [{"name": "sidegate", "domains": ["*"], "routes": table(gateway, today)}],
        },
        "http_filters": _http_filters(gateway),
        "local_reply_config": _local_replies(),
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
        "address": address(listener.address, listener.port),
        "filter_chains": [chain],
    }


def compile_bootstrap(
    gateway: Gateway,
    *,
    state_dir: str = ".sidegate",
    listen_address: str | None = None,
    socket_dir: str | None = None,
    today: dt.date | None = None,
) -> dict[str, Any]:
    """Return the Envoy bootstrap for ``gateway``; TLS files default to ``state_dir/tls``.

    ``listen_address`` replaces every listener's address (containers listen on 0.0.0.0 while
    the same gateway.yaml on a laptop stays on loopback). A relative ``unix:`` sidecar address
    is found under ``socket_dir`` (``state_dir`` when None): a container stack keeps its sockets
    on a volume of their own, shared with Envoy, apart from the state. ``today`` (UTC by default) decides
    which versions are already past their sunset and answered 410 by Envoy itself.
    """
    today = today or dt.datetime.now(dt.UTC).date()
    if listen_address is not None:
        listeners = tuple(lst.model_copy(update={"address": listen_address}) for lst in gateway.listeners)
        gateway = gateway.model_copy(update={"listeners": listeners})
    clusters = [mesh.edge_cluster(gateway, name, Path(state_dir)) for name in gateway.services]
    sockets = socket_dir or state_dir
    clusters += [sidecar_cluster(k, getattr(gateway.sidecars, k), sockets) for k in (AUTHZ, RATELIMIT, EXTPROC)]
    if gateway.telemetry.otlp is not None:
        collector = cluster_base(OTLP_CLUSTER, (gateway.telemetry.otlp,), 1.0)
        collector["typed_extension_protocol_options"] = http2()
        clusters.append(collector)
    bootstrap = {
        "admin": {"address": address(gateway.admin.address, gateway.admin.port)},
        "static_resources": {
            "listeners": [_listener(lst, gateway, state_dir, today) for lst in gateway.listeners],
            "clusters": clusters,
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": TYPE
                        + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
    }
    if gateway.mesh is not None:  # SDS (the mesh certificates) needs a node name
        bootstrap["node"] = {"id": "sidegate", "cluster": "sidegate"}
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


def file_xds(bootstrap: dict[str, Any], directory: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split a static bootstrap for live reload: (bootstrap, {file name: its resources}).

    The bootstrap keeps the admin interface and points Envoy's dynamic resources at files it
    watches: the clusters (CDS), each route table (RDS, ``rds_<name>.json``) and the listeners
    (LDS), in the order a live edit writes them. Listeners that share a route table share its
    file, so it is written once however many listeners there are. Replacing a file (a rename,
    never an in-place write) hands Envoy new resources of that kind without a restart, and each
    file's version is the hash of its own resources: an edit
    that changes one API changes the route table alone. Listeners that keep their name are
    updated in place and drain their old connections, so no request in flight is dropped.
    JSON, which Envoy reads natively, is written and parsed far faster than YAML.
    """
    static = bootstrap["static_resources"]

    def source(name: str) -> dict[str, Any]:
        return {"path_config_source": {"path": str(directory / name)}, "resource_api_version": "V3"}

    routes: dict[str, dict[str, Any]] = {}
    listeners = []
    for original in static["listeners"]:
        listener = copy.deepcopy(original)
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                hcm = network_filter["typed_config"]
                if "route_config" not in hcm:
                    continue
                table = hcm.pop("route_config")
                if routes.setdefault(table["name"], table) != table:
                    raise AssertionError(f"compiler bug: two route tables named {table['name']!r}")
                hcm["rds"] = {"route_config_name": table["name"], "config_source": source(_rds_file(table["name"]))}
        listeners.append(listener)

    def resources(items: list[dict[str, Any]], type_url: str) -> dict[str, Any]:
        version = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]
        return {"version_info": version, "resources": [{"@type": TYPE + type_url, **r} for r in items]}

    dynamic = {k: v for k, v in bootstrap.items() if k != "static_resources"}
    dynamic["node"] = {"id": "sidegate", "cluster": "sidegate"}
    dynamic["dynamic_resources"] = {"cds_config": source("cds.json"), "lds_config": source("lds.json")}
    # Envoy's RDS takes one route table per file: one file per table name.
    tables = {
        _rds_file(name): resources([table], "envoy.config.route.v3.RouteConfiguration")
        for name, table in routes.items()
    }
    return dynamic, {
        "cds.json": resources(static["clusters"], "envoy.config.cluster.v3.Cluster"),
        **tables,
        "lds.json": resources(listeners, "envoy.config.listener.v3.Listener"),
    }


def _rds_file(table: str) -> str:
    return f"rds_{table}.json"


HEADER = "# Generated by `sidegate envoy-config --config {source}{flags}`. Do not edit by hand.\n"


def render(
    gateway: Gateway,
    *,
    source: str,
    state_dir: str = ".sidegate",
    listen_address: str | None = None,
    socket_dir: str | None = None,
) -> str:
    """The bootstrap as YAML text, with a header naming the command that made it."""
    bootstrap = compile_bootstrap(gateway, state_dir=state_dir, listen_address=listen_address, socket_dir=socket_dir)
    body = yaml.dump(bootstrap, Dumper=yaml.CSafeDumper, sort_keys=False, width=100)
    flags = f" --listen-address {listen_address}" if listen_address else ""
    flags += f" --socket-dir {socket_dir}" if socket_dir else ""
    return HEADER.format(source=source, flags=flags) + body
