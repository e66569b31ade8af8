"""The whole bootstrap: the sidecars' HTTP filters, listeners with TLS and tracing, the clusters,
the overload manager; its file-based xDS split for live reload; and the YAML text."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from sidegate.compiler import mesh, transcoder, versions, yamltext
from sidegate.compiler.clusters import (
    collector_cluster,
    grpc_service,
    sidecar_cluster,
)
from sidegate.compiler.envoy import (
    FILTER_EXTPROC,
    FILTER_HEADER_LIMITS,
    FILTER_STRIP,
    TYPE,
    address,
    cel,
    duration,
)
from sidegate.compiler.filters import authz_filter, ratelimit_filter, tracing
from sidegate.compiler.routes import virtual_host
from sidegate.config import Gateway, Listener
from sidegate.contract import (
    AUTHZ,
    EXTPROC,
    IDENTITY_HEADERS,
    RATELIMIT,
)

MAX_DOWNSTREAM_CONNECTIONS = 50_000
# What a client may send: Envoy's defaults (100 headers, 60 KiB of them). More is a 431.
CLIENT_HEADERS = 100
CLIENT_HEADERS_KB = 60
# Headers Envoy itself adds on the way in (x-forwarded-for, x-forwarded-proto, x-request-id,
# x-envoy-external-address, x-envoy-original-path, traceparent, tracestate, x-envoy-*), and
# what ext_proc may set on a transformed request (content-type, content-length, version fields).
ENVOY_ADDED_HEADERS = 12
EXTPROC_ADDED_HEADERS = 8
ADDED_HEADERS_KB = 8  # those, and authz's identity headers from an API key
HEADER_LIMITS_POLICY = "sidegate_header_limits"
HEADERS_TOO_LARGE = {
    "error": "request_header_fields_too_large",
    "message": f"send at most {CLIENT_HEADERS} request headers, {CLIENT_HEADERS_KB} KiB in all",
}


def header_limits(gateway: Gateway) -> tuple[int, int]:
    """Envoy's limits for a request's header map (count, KiB): what a client may send, plus room
    for every header the gateway adds after it (Envoy, authz's identity and claim headers, the
    version pin, ext_proc). ext_authz answers 500 when the headers it sets take the map past
    these limits, and the codec enforces the same numbers: so the map gets the room, and the
    first filter refuses a client over ``CLIENT_HEADERS`` / ``CLIENT_HEADERS_KB`` with 431."""
    added = ENVOY_ADDED_HEADERS + len(IDENTITY_HEADERS) + len(gateway.claim_headers) + EXTPROC_ADDED_HEADERS
    claims_kb = max((-(-issuer.max_token_bytes // 1024) for issuer in gateway.issuers.values()), default=0)
    return CLIENT_HEADERS + added, CLIENT_HEADERS_KB + ADDED_HEADERS_KB + claims_kb


def _cel_gt(operand: dict[str, Any], limit: int) -> dict[str, Any]:
    return {"call_expr": {"function": "_>_", "args": [operand, {"const_expr": {"int64_value": str(limit)}}]}}


def _request(field: str) -> dict[str, Any]:
    return {"select_expr": {"operand": {"ident_expr": {"name": "request"}}, "field": field}}


def header_limits_filter() -> dict[str, Any]:
    """The first filter of every listener: a request whose client sent more than
    ``CLIENT_HEADERS`` headers or ``CLIENT_HEADERS_KB`` KiB of them is refused (431, JSON body by
    the local reply mappers) before any filter adds one. RBAC with a CEL condition: native, no
    callout. ``request.total_size`` is the header map's size while no body has been read."""
    condition = {
        "call_expr": {
            "function": "_||_",
            "args": [
                _cel_gt({"call_expr": {"function": "size", "args": [_request("headers")]}}, CLIENT_HEADERS),
                _cel_gt(_request("total_size"), CLIENT_HEADERS_KB * 1024),
            ],
        }
    }
    return {
        "name": FILTER_HEADER_LIMITS,
        "typed_config": {
            "@type": TYPE + "envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "DENY",
                "policies": {
                    HEADER_LIMITS_POLICY: {
                        "permissions": [{"any": True}],
                        "principals": [{"any": True}],
                        "condition": condition,
                    }
                },
            },
        },
    }


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
    transcoding = transcoder.http_filter(gateway)
    return [
        header_limits_filter(),
        identity_strip(gateway),
        authz_filter(gateway, clear_route_cache=versions.pin_routes(gateway)),
        ratelimit_filter(gateway),
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
                # Request headers first; a route that turns ext_proc on asks for the response's
                # too (routes.extproc_override), and the session for the bodies it needs. Not
                # here: a local reply with no route (the codec's 431) would wait on ext_proc and
                # the client get no answer at all.
                "processing_mode": {
                    "request_header_mode": "SEND",
                    "response_header_mode": "SKIP",
                    "request_body_mode": "NONE",
                    "response_body_mode": "NONE",
                    "request_trailer_mode": "SKIP",
                    "response_trailer_mode": "SKIP",
                },
            },
        },
        *([transcoding] if transcoding else []),
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


# Envoy's own answers when a sidecar cannot be asked (unreachable, too slow, broken) carry no
# body. Give them the JSON body every other error has; a sidecar's own answers keep theirs.
SIDECAR_ERROR = {
    "error": "sidecar_unavailable",
    "message": "the gateway cannot check this request now; try again later",
}


# Envoy's response code details when a sidecar could not be asked: ext_authz, ext_proc, and the
# ratelimit filter failing closed.
SIDECAR_ERROR_DETAILS = ("ext_authz_error", "ext_proc_error", "rate_limiter_error")


def _local_replies(gateway: Gateway) -> dict[str, Any]:
    errors = " || ".join(f"response.code_details.startsWith('{details}')" for details in SIDECAR_ERROR_DETAILS)
    too_large = f"response.code_details == 'rbac_access_denied_matched_policy[{HEADER_LIMITS_POLICY}]'"
    header_limits = {
        "filter": cel(too_large),
        "status_code": 431,
        "body_format_override": {"json_format": HEADERS_TOO_LARGE},
    }
    # the codec's own 431, past the header map's limits
    codec = {
        "filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": 431}}}},
        "body_format_override": {"json_format": HEADERS_TOO_LARGE},
    }
    sidecar = {"filter": cel(errors), "status_code": 503, "body_format_override": {"json_format": SIDECAR_ERROR}}
    return {"mappers": [header_limits, codec, sidecar, *transcoder.local_replies(gateway)]}


def _listener(listener: Listener, gateway: Gateway, state_dir: str, route_config: dict[str, Any]) -> dict[str, Any]:
    headers_count, headers_kb = header_limits(gateway)
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
        "max_request_headers_kb": headers_kb,
        "common_http_protocol_options": {"max_headers_count": headers_count},
        "route_config": route_config,
        "http_filters": _http_filters(gateway),
        "local_reply_config": _local_replies(gateway),
    }
    if gateway.telemetry.otlp is not None:
        hcm["tracing"] = tracing(gateway, gateway.telemetry.service_name)
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
    # One route table, the same object in every listener: built once, and written once (a YAML
    # anchor in the static bootstrap, one RDS file with file_xds).
    route_config = {"name": "sidegate", "virtual_hosts": [virtual_host(gateway, today)]}
    clusters = [mesh.edge_cluster(gateway, name, Path(state_dir)) for name in gateway.services]
    sockets = socket_dir or state_dir
    clusters += [sidecar_cluster(k, getattr(gateway.sidecars, k), sockets) for k in (AUTHZ, RATELIMIT, EXTPROC)]
    if gateway.telemetry.otlp is not None:
        clusters.append(collector_cluster(gateway.telemetry.otlp))
    bootstrap = {
        "admin": {"address": address(gateway.admin.address, gateway.admin.port)},
        "static_resources": {
            "listeners": [_listener(lst, gateway, state_dir, route_config) for lst in gateway.listeners],
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
    seen: set[int] = set()  # the route table and other shared parts, walked once

    def walk(node: Any) -> None:
        if isinstance(node, dict | list):
            if id(node) in seen:
                return
            seen.add(id(node))
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
        version = hashlib.sha256(json_text(items).encode()).hexdigest()[:16]
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


def json_text(doc: Any) -> str:
    """A file-xDS document as Envoy reads it: compact JSON. The compiler builds every part in a
    fixed order, so the same gateway gives the same text (and the same version hashes)."""
    return json.dumps(doc, separators=(",", ":"))


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
    # The route table every listener shares is written once: an anchor, then aliases.
    body = yamltext.dump(bootstrap, anchors=("virtual_hosts",))
    flags = f" --listen-address {listen_address}" if listen_address else ""
    flags += f" --socket-dir {socket_dir}" if socket_dir else ""
    return HEADER.format(source=source, flags=flags) + body
