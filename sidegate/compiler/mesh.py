"""A mesh service's sidecar Envoy, compiled from the ``mesh:`` section, and the edge's mTLS to it.

Each sidecar has two listeners. ``inbound`` accepts only mTLS from certificates of the mesh CA,
checks the caller's identity (the URI SAN of its certificate) with Envoy's native ``rbac``
filter against the ``allow`` rules (no rule: 403, default deny), strips the identity headers
unless the caller is the gateway, tells the service who called in ``x-forwarded-client-cert``,
and forwards to the service on loopback. ``outbound`` is where the service calls the others,
naming one in the Host header (``Host: payments``). Each service it may call is a cluster with
that service's timeout, retries, circuit breaker and outlier detection, originating mTLS with
this service's identity and accepting only the callee's. Certificates come from SDS files
(``sidegate.meshcerts``), so a renewal swaps them without a restart or a dropped connection.

Python joins the east-west path only where the mesh section asks for it, on the inbound
listener, after ``rbac``: ``authz`` sends a call that carries an end user's credential to the
authz sidecar, and ``limits`` count each caller's calls in the ratelimit sidecar (the caller is
the URI SAN of its certificate, read by a CEL descriptor). With ``telemetry.otlp`` both
listeners trace, so one trace runs from the edge through every service it reaches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sidegate.compiler.clusters import cluster_base, collector_cluster, sidecar_cluster, upstream_cluster
from sidegate.compiler.envoy import FILTER_AUTHZ, JSON, TYPE, address, disabled, duration, match
from sidegate.compiler.filters import authz_filter, ratelimit_filter, tracing
from sidegate.compiler.routes import upstream_action
from sidegate.config import Gateway, Mesh, MeshAllow
from sidegate.contract import AUTHZ, IDENTITY_HEADERS, RATELIMIT, RL_MESH_CALLER, RL_MESH_SERVICE, RL_METHOD, mesh_api
from sidegate.errors import SettingsError
from sidegate.meshcerts import IDENTITY_SECRET, TRUST_SECRET, identity_dir

APP_CLUSTER = "mesh_app"
HCM = "envoy.filters.network.http_connection_manager"
DENIED = '{"error": "mesh_forbidden", "message": "this service may not make this call"}'
NO_ROUTE = '{"error": "mesh_unknown_service", "message": "this service may not call the service it named"}'


def _sds(name: str, folder: Path, file: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {"path_config_source": {"path": str(folder / file)}, "resource_api_version": "V3"},
    }


def _common_tls(folder: Path, peer: str | None) -> dict[str, Any]:
    """This identity's certificate and the mesh CA, both from SDS files; ``peer``: the one
    identity the other side must present (any of the mesh CA's when None)."""
    trust = _sds(TRUST_SECRET, folder, "trust.yaml")
    context: dict[str, Any] = {
        # TLS 1.3 only: every peer is an Envoy of this mesh (an upstream's default maximum is 1.2).
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificate_sds_secret_configs": [_sds(IDENTITY_SECRET, folder, "identity.yaml")],
    }
    if peer is None:
        context["validation_context_sds_secret_config"] = trust
    else:
        context["combined_validation_context"] = {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer}}]
            },
            "validation_context_sds_secret_config": trust,
        }
    return context


def upstream_tls(mesh: Mesh, caller: str, callee: str, state_dir: Path) -> dict[str, Any]:
    """The transport socket of a cluster from ``caller`` to the sidecar of ``callee``: mTLS with
    ``caller``'s certificate, accepting only ``callee``'s."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": callee,
            "common_tls_context": _common_tls(identity_dir(state_dir, caller), mesh.identity(callee)),
        },
    }


def edge_cluster(gateway: Gateway, service: str, state_dir: Path) -> dict[str, Any]:
    """The edge Envoy's cluster of ``service``: mTLS as the gateway to its sidecar when it is in
    the mesh, else plain."""
    cluster = upstream_cluster(service, gateway.services[service])
    mesh = gateway.mesh
    if mesh is not None and service in mesh.services:
        cluster["transport_socket"] = upstream_tls(mesh, mesh.gateway, service, state_dir)
    return cluster


def _permission(rule: MeshAllow) -> dict[str, Any]:
    """What a rule allows: any request, or its paths (on segment boundaries) and methods."""
    parts: list[dict[str, Any]] = []
    if rule.paths:
        paths: list[dict[str, Any]] = []
        for path in rule.paths:
            if path.endswith("/"):
                paths.append({"url_path": {"path": {"prefix": path}}})
            else:
                paths.append({"url_path": {"path": {"exact": path}}})
                paths.append({"url_path": {"path": {"prefix": path + "/"}}})
        parts.append({"or_rules": {"rules": paths}})
    if rule.methods:
        methods = [{"header": {"name": ":method", "string_match": {"exact": m}}} for m in rule.methods]
        parts.append({"or_rules": {"rules": methods}})
    if not parts:
        return {"any": True}
    return {"and_rules": {"rules": parts}}


def rbac(mesh: Mesh, service: str) -> dict[str, Any]:
    """The ``rbac`` filter of ``service``'s inbound listener: one policy per rule naming it."""
    policies = {
        f"{rule.from_}-{i}": {
            "permissions": [_permission(rule)],
            "principals": [{"authenticated": {"principal_name": {"exact": mesh.identity(rule.from_)}}}],
        }
        for i, rule in enumerate(mesh.callers(service))
    }
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": TYPE + "envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": policies},  # no policy: every call is denied
        },
    }


def strip_identity_headers(mesh: Mesh) -> dict[str, Any]:
    """Remove the identity headers authz sets at the edge, unless the caller is the gateway:
    only the gateway's identity vouches for an end user. The matcher reads the peer
    certificate's URI SAN (a route table cannot), and skips the removal for the gateway."""
    return {
        "name": "sidegate.mesh.strip_identity",
        "typed_config": {
            "@type": TYPE + "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    "@type": TYPE + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {"request_mutations": [{"remove": name} for name in IDENTITY_HEADERS]},
                },
            },
            "xds_matcher": {
                "matcher_tree": {
                    "input": {
                        "name": "peer_uri_san",
                        "typed_config": {"@type": TYPE + "envoy.extensions.matching.common_inputs.ssl.v3.UriSanInput"},
                    },
                    "exact_match_map": {
                        "map": {
                            mesh.identity(mesh.gateway): {
                                "action": {
                                    "name": "skip",
                                    "typed_config": {
                                        "@type": TYPE + "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"
                                    },
                                }
                            }
                        }
                    },
                }
            },
        },
    }


def _router() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": TYPE + "envoy.extensions.filters.http.router.v3.Router"},
    }


def _hcm(name: str, routes: dict[str, Any], filters: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": HCM,
        "typed_config": {
            "@type": TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "codec_type": "AUTO",
            # Normalized before rbac reads the path: /charge/../refund is /refund.
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
            "route_config": routes,
            "http_filters": [*filters, _router()],
            **extra,
        },
    }


def _denied_as_json() -> dict[str, Any]:
    """rbac's 403 with a JSON body. Authz's own denials (401, 403) keep the body authz wrote."""
    rbac_denied = {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": TYPE + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": "response.code_details.startsWith('rbac_access_denied')",
            },
        }
    }
    return {
        "mappers": [
            {
                "filter": rbac_denied,
                "body": {"inline_string": DENIED},
                "body_format_override": {
                    "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                    "content_type": JSON,
                },
            }
        ]
    }


def rate_limits(service: str) -> list[dict[str, Any]]:
    """The inbound routes' rate-limit actions: the callee, the caller's identity (its
    certificate's URI SAN, never a header it could write) and the method."""
    caller = {
        "name": "envoy.rate_limit_descriptors.expr",
        "typed_config": {
            "@type": TYPE + "envoy.extensions.rate_limit_descriptors.expr.v3.Descriptor",
            "descriptor_key": RL_MESH_CALLER,
            "text": "connection.uri_san_peer_certificate",
        },
    }
    actions = [
        {"generic_key": {"descriptor_key": RL_MESH_SERVICE, "descriptor_value": service}},
        {"extension": caller},
        {"request_headers": {"header_name": ":method", "descriptor_key": RL_METHOD}},
    ]
    return [{"actions": actions}]


def credential_headers(gateway: Gateway, service: str) -> list[str]:
    """The headers whose presence sends a call to ``service`` through authz (an end user's
    credential); [] when every call goes (``required``) or none does (no ``authz``)."""
    mesh = gateway.mesh
    auth = mesh.authz.get(service) if mesh else None
    if auth is None or auth.required:
        return []
    names = ["authorization"] if auth.jwt else []
    if auth.api_key:
        names.append(gateway.api_keys.header.lower())
    return names


def inbound_routes(gateway: Gateway, service: str) -> list[dict[str, Any]]:
    """To the service, every path: first one route per credential header (authz on), then the
    rest (authz off, unless ``required``). Each carries the rate limits of the service's calls."""
    mesh = gateway.mesh
    assert mesh is not None
    action: dict[str, Any] = {"cluster": APP_CLUSTER, "timeout": duration(gateway.services[service].timeout)}
    if mesh.limits_of(service):
        action["rate_limits"] = rate_limits(service)
    checked = {
        "@type": TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
        "check_settings": {"context_extensions": {"api": mesh_api(service)}},
    }
    routes = [
        {
            "name": f"user_{name}",
            "match": {"prefix": "/", "headers": [{"name": name, "present_match": True}]},
            "route": action,
            "typed_per_filter_config": {FILTER_AUTHZ: checked},
        }
        for name in credential_headers(gateway, service)
    ]
    rest: dict[str, Any] = {"name": "service", "match": {"prefix": "/"}, "route": action}
    if service in mesh.authz:
        rest["typed_per_filter_config"] = {FILTER_AUTHZ: checked if mesh.authz[service].required else disabled(AUTHZ)}
    return [*routes, rest]


def _inbound(gateway: Gateway, mesh: Mesh, service: str, state_dir: Path) -> dict[str, Any]:
    me = mesh.services[service]
    filters = [strip_identity_headers(mesh), rbac(mesh, service)]
    if service in mesh.authz:
        filters.append(authz_filter(gateway))
    if mesh.limits_of(service):
        filters.append(ratelimit_filter(gateway))
    extra: dict[str, Any] = {}
    if gateway.telemetry.otlp is not None:
        extra["tracing"] = tracing(gateway, sidecar_service_name(gateway, service))
    routes = inbound_routes(gateway, service)
    hcm = _hcm(
        f"inbound_{service}",
        {"name": "inbound", "virtual_hosts": [{"name": service, "domains": ["*"], "routes": routes}]},
        filters,
        # The service learns who called: x-forwarded-client-cert: …;URI=spiffe://…/orders.
        forward_client_cert_details="SANITIZE_SET",
        set_current_client_cert_details={"uri": True},
        local_reply_config=_denied_as_json(),
        **extra,
    )
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _common_tls(identity_dir(state_dir, service), None),
        },
    }
    return {
        "name": "inbound",
        "address": address(me.inbound.host, me.inbound.port),
        "filter_chains": [{"filters": [hcm], "transport_socket": tls}],
    }


def _outbound(gateway: Gateway, mesh: Mesh, service: str) -> dict[str, Any]:
    me = mesh.services[service]
    hosts = [
        {
            "name": callee,
            "domains": [callee, f"{callee}:*"],
            "routes": [{"match": match("/"), "route": upstream_action(callee, gateway.services[callee])}],
        }
        for callee in mesh.callees(service)
    ]
    hosts.append(
        {
            "name": "not_allowed",
            "domains": ["*"],
            "routes": [
                {
                    "match": match("/"),
                    "direct_response": {"status": 403, "body": {"inline_string": NO_ROUTE}},
                    "response_headers_to_add": [{"header": {"key": "content-type", "value": JSON}}],
                }
            ],
        }
    )
    extra: dict[str, Any] = {}
    if gateway.telemetry.otlp is not None:
        extra["tracing"] = tracing(gateway, sidecar_service_name(gateway, service))
    hcm = _hcm(f"outbound_{service}", {"name": "outbound", "virtual_hosts": hosts}, [], **extra)
    return {
        "name": "outbound",
        "address": address(me.outbound.host, me.outbound.port),
        "filter_chains": [{"filters": [hcm]}],
    }


def sidecar_service_name(gateway: Gateway, service: str) -> str:
    """The name a sidecar's spans carry: the edge's, then the service (``sidegate-envoy.orders``)."""
    return f"{gateway.telemetry.service_name}.{service}"


HEADER = "# Generated by `sidegate mesh-config --config {source} --service {service}`. Do not edit by hand.\n"


def render(gateway: Gateway, service: str, *, source: str, state_dir: Path) -> str:
    """``service``'s sidecar bootstrap as YAML text, with a header naming the command."""
    body = yaml.safe_dump(sidecar_bootstrap(gateway, service, state_dir), sort_keys=False, width=100)
    return HEADER.format(source=source, service=service) + body


def sidecar_bootstrap(gateway: Gateway, service: str, state_dir: Path) -> dict[str, Any]:
    """The Envoy bootstrap of ``service``'s sidecar; certificates under ``state_dir/mesh``."""
    mesh = gateway.mesh
    if mesh is None or service not in mesh.services:
        known = ", ".join(sorted(mesh.services)) if mesh else "no mesh: section"
        raise SettingsError(f"not a mesh service: {service!r} ({known})")
    me = mesh.services[service]
    app = cluster_base(APP_CLUSTER, (me.app,), gateway.services[service].connect_timeout)
    clusters = [app]
    for callee in mesh.callees(service):
        cluster = upstream_cluster(callee, gateway.services[callee])
        cluster["transport_socket"] = upstream_tls(mesh, service, callee, state_dir)
        clusters.append(cluster)
    if service in mesh.authz:
        clusters.append(sidecar_cluster(AUTHZ, gateway.sidecars.authz, str(state_dir)))
    if mesh.limits_of(service):
        clusters.append(sidecar_cluster(RATELIMIT, gateway.sidecars.ratelimit, str(state_dir)))
    if gateway.telemetry.otlp is not None:
        clusters.append(collector_cluster(gateway.telemetry.otlp))
    return {
        "node": {"id": f"sidegate-mesh-{service}", "cluster": service},  # SDS needs a node name
        "admin": {"address": address(me.admin.host, me.admin.port)},
        "static_resources": {
            "listeners": [_inbound(gateway, mesh, service, state_dir), _outbound(gateway, mesh, service)],
            "clusters": clusters,
        },
    }
