"""The Envoy compiler: gateway.yaml models in, an Envoy v3 bootstrap dict out, no I/O.

Expected Envoy names are spelled out here rather than read from ``sidegate.compiler``, so a
renamed filter, cluster or gRPC service fails a test instead of changing with the code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidegate import compiler, config
from sidegate.compiler import bootstrap as bootstrap_module
from sidegate.compiler import groups
from tests.unit import envoy_routes
from tests.unit.envoy_routes import FILTER_OFF, calls, in_force, rate_limits, retry_policy, vhost

ROOT = Path(__file__).resolve().parents[2]

AUTHZ = "envoy.filters.http.ext_authz"
RATELIMIT = "envoy.filters.http.ratelimit"
EXTPROC = "envoy.filters.http.ext_proc"
ROUTER = "envoy.filters.http.router"
T = "type.googleapis.com/"
HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
STRIP = "envoy.filters.http.header_mutation"
IDENTITY_HEADERS = {"x-consumer-id", "x-consumer-plan", "x-auth-method", "x-auth-scopes", "x-auth-key-id"}

DEFAULT_LISTENERS: list[dict[str, Any]] = [{"name": "http", "port": 8080}]
DEFAULT_SERVICES: dict[str, Any] = {"echo": {"endpoints": ["127.0.0.1:9080"]}}
DEFAULT_APIS: list[dict[str, Any]] = [{"name": "orders", "match": {"prefix": "/orders"}, "service": "echo"}]


# --- helpers ------------------------------------------------------------------------------


def gateway(
    *,
    listeners: list[dict[str, Any]] | None = None,
    services: dict[str, Any] | None = None,
    apis: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> config.Gateway:
    """A Gateway parsed from YAML text, as ``load`` would see it; omitted sections get defaults."""
    doc = {
        "listeners": listeners or DEFAULT_LISTENERS,
        **sections,
        "services": services or DEFAULT_SERVICES,
        "apis": apis or DEFAULT_APIS,
    }
    return config.parse(yaml.safe_dump(doc, sort_keys=False))


def build(state_dir: str = ".sidegate", **kwargs: Any) -> dict[str, Any]:
    return compiler.compile_bootstrap(gateway(**kwargs), state_dir=state_dir)


def api(name: str, prefix: str, *, methods: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    match: dict[str, Any] = {"prefix": prefix}
    if methods:
        match["methods"] = methods
    return {"name": name, "match": match, "service": "echo", **extra}


def listeners(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {lst["name"]: lst for lst in bootstrap["static_resources"]["listeners"]}


def hcm(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    (network_filter,) = chain["filters"]
    assert network_filter["name"] == "envoy.filters.network.http_connection_manager"
    typed_config: dict[str, Any] = network_filter["typed_config"]
    return typed_config


def http_filters(bootstrap: dict[str, Any], listener: str = "http") -> dict[str, dict[str, Any]]:
    return {f["name"]: f["typed_config"] for f in hcm(listeners(bootstrap)[listener])["http_filters"]}


def routes(bootstrap: dict[str, Any], listener: str = "http") -> list[dict[str, Any]]:
    (vhost,) = hcm(listeners(bootstrap)[listener])["route_config"]["virtual_hosts"]
    found: list[dict[str, Any]] = vhost["routes"]
    return found


def route(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in routes(bootstrap) if r["name"] == name)


def cluster(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name]
    assert len(found) == 1, f"want exactly one cluster {name!r}, got {len(found)}"
    return found[0]


def endpoints(cluster_: dict[str, Any]) -> list[tuple[str, int]]:
    (locality,) = cluster_["load_assignment"]["endpoints"]
    return [
        (
            ep["endpoint"]["address"]["socket_address"]["address"],
            ep["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for ep in locality["lb_endpoints"]
    ]


def tls_context(bootstrap: dict[str, Any], listener: str) -> dict[str, Any]:
    (chain,) = listeners(bootstrap)[listener]["filter_chains"]
    socket = chain["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    assert socket["typed_config"]["@type"] == T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
    context: dict[str, Any] = socket["typed_config"]["common_tls_context"]
    return context


# --- filters ------------------------------------------------------------------------------


def test_filter_order_is_limits_strip_authz_ratelimit_extproc_router_on_every_listener() -> None:
    bootstrap = build(listeners=[{"name": "http", "port": 8080}, {"name": "https", "port": 8443, "tls": {}}])
    for name in ("http", "https"):
        assert [f["name"] for f in hcm(listeners(bootstrap)[name])["http_filters"]] == [
            "envoy.filters.http.rbac",
            STRIP,
            AUTHZ,
            RATELIMIT,
            EXTPROC,
            ROUTER,
        ]


def test_filters_call_their_sidecar_with_its_timeout_and_failure_mode() -> None:
    sidecars = {
        "authz": {"address": "127.0.0.1:9101", "timeout": "250ms", "failure_mode": "allow"},
        "ratelimit": {"address": "127.0.0.1:9102", "timeout": "100ms", "failure_mode": "deny"},
        "extproc": {"address": "127.0.0.1:9103", "timeout": "2s", "failure_mode": "allow"},
    }
    filters = http_filters(build(sidecars=sidecars))
    authz = filters[AUTHZ]
    assert authz["grpc_service"] == {"envoy_grpc": {"cluster_name": "sidegate_authz"}, "timeout": "0.25s"}
    assert authz["failure_mode_allow"] is True
    assert authz["transport_api_version"] == "V3"
    ratelimit = filters[RATELIMIT]
    assert ratelimit["rate_limit_service"]["grpc_service"] == {
        "envoy_grpc": {"cluster_name": "sidegate_ratelimit"},
        "timeout": "0.1s",
    }
    assert ratelimit["timeout"] == "0.1s"
    assert ratelimit["failure_mode_deny"] is True
    extproc = filters[EXTPROC]
    assert extproc["grpc_service"] == {"envoy_grpc": {"cluster_name": "sidegate_extproc"}, "timeout": "2s"}
    assert extproc["message_timeout"] == "2s"
    assert extproc["failure_mode_allow"] is True


def test_the_header_map_has_room_for_what_the_gateway_adds_over_what_a_client_may_send() -> None:
    issuers = {
        "corp": {
            "issuer": "https://idp.example",
            "jwks_uri": "https://idp.example/jwks",
            "audiences": ["api"],
            "max_token_bytes": 16384,
            "claims": {"email": "x-user-email", "tenant": "x-tenant-id"},
        }
    }
    plain, with_claims = (hcm(listeners(build(**extra))["http"]) for extra in ({}, {"issuers": issuers}))
    client, client_kb = bootstrap_module.CLIENT_HEADERS, bootstrap_module.CLIENT_HEADERS_KB
    count = plain["common_http_protocol_options"]["max_headers_count"]
    assert count >= client + 6 + 12  # authz's identity headers and the pin, Envoy's own
    assert with_claims["common_http_protocol_options"]["max_headers_count"] == count + 2
    assert with_claims["max_request_headers_kb"] == plain["max_request_headers_kb"] + 16 > client_kb
    rbac = http_filters(build())["envoy.filters.http.rbac"]["rules"]
    assert rbac["action"] == "DENY"
    condition = rbac["policies"]["sidegate_header_limits"]["condition"]["call_expr"]
    limits = [arg["call_expr"]["args"][1]["const_expr"]["int64_value"] for arg in condition["args"]]
    assert limits == [str(client), str(client_kb * 1024)]


def test_default_failure_modes_deny_authz_and_extproc_but_allow_ratelimit() -> None:
    filters = http_filters(build())
    assert filters[AUTHZ]["failure_mode_allow"] is False
    assert filters[RATELIMIT]["failure_mode_deny"] is False
    assert filters[EXTPROC]["failure_mode_allow"] is False


# --- routes -------------------------------------------------------------------------------


def test_anonymous_route_skips_authz_and_strips_the_pin_header() -> None:
    bootstrap = build(apis=[api("public", "/public", auth={"anonymous": True})])
    public = route(bootstrap, "public")
    assert in_force(vhost(bootstrap), public, AUTHZ) == FILTER_OFF
    assert public["request_headers_to_remove"] == ["x-sidegate-version"]


def stripped(bootstrap: dict[str, Any]) -> tuple[set[str], set[str]]:
    """What the listener's first filter removes: (names, family prefixes)."""
    mutations = http_filters(bootstrap)[STRIP]["mutations"]["request_mutations"]
    names = {m["remove"] for m in mutations if "remove" in m}
    prefixes = {m["remove_on_match"]["key_matcher"]["prefix"] for m in mutations if "remove_on_match" in m}
    assert len(names) + len(prefixes) == len(mutations)
    return names, prefixes


def test_the_first_filter_strips_identity_headers_and_families_on_every_route() -> None:
    names, prefixes = stripped(build())
    assert prefixes == {"x-auth-", "x-user-", "x-consumer-"}
    for name in ("x-client-id", "x-scopes", "x-authenticated-user", "x-forwarded-user", "x-forwarded-email"):
        assert name in names
    for name in ("x-forwarded-groups", "x-jwt-payload", "x-principal", "x-api-key-id"):
        assert name in names
    assert "x-sidegate-version" not in names  # routes own the pin header
    assert not any(name.startswith(tuple(prefixes)) for name in names)  # a family covers its names


def test_operators_extend_and_narrow_the_strip_list() -> None:
    policy = {"strip": ["x-acme-*", "x-tenant"], "keep": ["x-principal", "x-user-*"]}
    names, prefixes = stripped(build(identity_headers=policy))
    assert prefixes == {"x-auth-", "x-consumer-", "x-acme-"}
    assert "x-tenant" in names
    assert "x-principal" not in names


def test_what_authz_sets_is_stripped_even_when_its_family_is_kept() -> None:
    names, _prefixes = stripped(build(identity_headers={"keep": ["x-consumer-*", "x-auth-*"]}))
    assert names | {"x-sidegate-version"} >= IDENTITY_HEADERS


def test_authenticated_route_tells_authz_its_api() -> None:
    bootstrap = build(apis=[api("orders", "/orders"), api("public", "/public", auth={"anonymous": True})])
    orders = route(bootstrap, "orders")
    assert orders["typed_per_filter_config"][AUTHZ] == {
        "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
        "check_settings": {"context_extensions": {"api": "orders"}},
    }
    assert "request_headers_to_remove" not in orders


def test_ratelimit_and_extproc_are_disabled_on_every_route() -> None:
    bootstrap = build(apis=[api("orders", "/orders"), api("public", "/public", auth={"anonymous": True})])
    for r in routes(bootstrap):
        assert rate_limits(vhost(bootstrap), r) == [], r["name"]
        assert in_force(vhost(bootstrap), r, EXTPROC) == FILTER_OFF, r["name"]


def test_routes_most_specific_first_and_404_last() -> None:
    apis = [
        api("root", "/"),
        api("v1", "/v1"),
        api("v1-orders", "/v1/orders"),
        api("v1-orders-read", "/v1/orders", methods=["GET"]),
        api("v1-orders-items", "/v1/orders/items/"),
    ]
    bootstrap = build(apis=apis)
    assert [r["name"] for r in routes(bootstrap)] == [
        "v1-orders-items",
        "v1-orders-read",
        "v1-orders",
        "v1",
        "root",
        "not_found",
    ]


def test_catch_all_answers_404_json() -> None:
    bootstrap = build()
    last = routes(bootstrap)[-1]
    assert last["match"] == {"prefix": "/"}
    assert last["direct_response"]["status"] == 404
    assert yaml.safe_load(last["direct_response"]["body"]["inline_string"]) == {
        "error": "not_found",
        "message": "no API matches this path",
    }
    assert {"key": "content-type", "value": "application/json"} in [
        h["header"] for h in last["response_headers_to_add"]
    ]
    assert not any(calls(vhost(bootstrap), last, name) for name in (AUTHZ, EXTPROC))
    assert rate_limits(vhost(bootstrap), last) == []


def test_prefix_without_trailing_slash_matches_whole_segments() -> None:
    bootstrap = build(apis=[api("orders", "/orders"), api("files", "/files/")])
    assert route(bootstrap, "orders")["match"] == {"path_separated_prefix": "/orders"}
    assert route(bootstrap, "files")["match"] == {"prefix": "/files/"}


def test_methods_become_a_method_header_regex() -> None:
    bootstrap = build(apis=[api("read", "/read", methods=["GET", "HEAD"])])
    (header,) = route(bootstrap, "read")["match"]["headers"]
    assert header["name"] == ":method"
    regex = header["string_match"]["safe_regex"]["regex"]
    # Envoy's safe_regex must match the whole value (RE2 full match).
    assert [m for m in ("GET", "HEAD", "POST", "GETS", "XGET", "get") if re.fullmatch(regex, m)] == ["GET", "HEAD"]
    assert "headers" not in route(build(), "orders")["match"]


def test_route_action_takes_timeout_and_retries_from_the_service() -> None:
    services = {
        "echo": {
            "endpoints": ["127.0.0.1:9080"],
            "timeout": "20s",
            "retries": {"attempts": 3, "retry_on": ["5xx", "reset"], "per_try_timeout": "2s"},
        },
        "once": {"endpoints": ["127.0.0.1:9081"], "retries": {"attempts": 0}},
    }
    apis = [
        api("orders", "/orders"),
        api("slow", "/slow", timeout="90s"),
        {"name": "once", "match": {"prefix": "/once"}, "service": "once"},
    ]
    bootstrap = build(services=services, apis=apis)
    orders = route(bootstrap, "orders")
    assert (orders["route"]["cluster"], orders["route"]["timeout"]) == ("svc_echo", "20s")
    retries = {"retry_on": "5xx,reset", "num_retries": 3, "per_try_timeout": "2s"}
    assert retry_policy(vhost(bootstrap), orders) == retries
    assert route(bootstrap, "slow")["route"]["timeout"] == "90s"
    once = route(bootstrap, "once")
    assert once["route"]["cluster"] == "svc_once"
    assert "timeout" not in once["route"]  # Envoy's default route timeout is the service's default, 15 s
    assert retry_policy(vhost(bootstrap), once) is None


# --- listeners and admin ------------------------------------------------------------------


def test_tls_listener_with_dev_cert_under_state_dir() -> None:
    bootstrap = build(
        state_dir="/var/lib/sidegate",
        listeners=[{"name": "https", "port": 8443, "tls": {}}, {"name": "http", "port": 8080}],
    )
    tls = tls_context(bootstrap, "https")
    assert tls["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_2"}
    assert tls["alpn_protocols"] == ["h2", "http/1.1"]
    assert tls["tls_certificates"] == [
        {
            "certificate_chain": {"filename": "/var/lib/sidegate/tls/server.crt"},
            "private_key": {"filename": "/var/lib/sidegate/tls/server.key"},
        }
    ]
    (plain,) = listeners(bootstrap)["http"]["filter_chains"]
    assert "transport_socket" not in plain


def test_tls_listener_with_configured_cert() -> None:
    tls_config = {"cert": "/etc/gw/server.pem", "key": "/etc/gw/server-key.pem", "min_version": "1.3"}
    bootstrap = build(state_dir="/var/lib/sidegate", listeners=[{"name": "https", "port": 8443, "tls": tls_config}])
    tls = tls_context(bootstrap, "https")
    assert tls["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_3"}
    assert tls["tls_certificates"] == [
        {"certificate_chain": {"filename": "/etc/gw/server.pem"}, "private_key": {"filename": "/etc/gw/server-key.pem"}}
    ]


def test_listener_address_and_port() -> None:
    bootstrap = build(listeners=[{"name": "http", "address": "0.0.0.0", "port": 8081}])
    assert listeners(bootstrap)["http"]["address"] == {"socket_address": {"address": "0.0.0.0", "port_value": 8081}}
    assert hcm(listeners(bootstrap)["http"])["stat_prefix"] == "http"


def test_admin_listens_on_loopback() -> None:
    assert build()["admin"] == {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}}
    assert build(admin={"port": 9911})["admin"]["address"]["socket_address"]["port_value"] == 9911


# --- clusters -----------------------------------------------------------------------------


def test_service_cluster_carries_the_service_policy() -> None:
    services = {
        "echo": {
            "endpoints": ["10.0.0.1:8000", "10.0.0.2:8000"],
            "connect_timeout": "500ms",
            "health_check": {"path": "/ready", "interval": "3s", "timeout": "1s", "unhealthy_threshold": 4},
            "circuit_breaker": {
                "max_connections": 10,
                "max_pending_requests": 20,
                "max_requests": 30,
                "max_retries": 2,
            },
            "outlier_detection": {
                "consecutive_5xx": 7,
                "interval": "15s",
                "base_ejection_time": "1m",
                "max_ejection_percent": 25,
            },
        }
    }
    svc = cluster(build(services=services), "svc_echo")
    assert svc["type"] == "STATIC"
    assert svc["connect_timeout"] == "0.5s"
    assert endpoints(svc) == [("10.0.0.1", 8000), ("10.0.0.2", 8000)]
    assert svc["circuit_breakers"] == {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "max_connections": 10,
                "max_pending_requests": 20,
                "max_requests": 30,
                "max_retries": 2,
            }
        ]
    }
    assert svc["outlier_detection"] == {
        "consecutive_5xx": 7,
        "interval": "15s",
        "base_ejection_time": "60s",
        "max_ejection_percent": 25,
    }
    (check,) = svc["health_checks"]
    assert check["http_health_check"] == {"path": "/ready"}
    assert (check["interval"], check["timeout"], check["healthy_threshold"], check["unhealthy_threshold"]) == (
        "3s",
        "1s",
        1,
        4,
    )
    assert "typed_extension_protocol_options" not in svc  # http1 by default


def test_service_without_optional_policy() -> None:
    svc = cluster(build(services={"echo": {"endpoints": ["echo.internal:80"]}}), "svc_echo")
    assert svc["type"] == "STRICT_DNS"
    assert endpoints(svc) == [("echo.internal", 80)]
    assert "health_checks" not in svc
    assert "outlier_detection" not in svc


@pytest.mark.parametrize(("protocol", "http2"), [("http1", False), ("http2", True), ("grpc", True)])
def test_upstream_protocol(protocol: str, http2: bool) -> None:
    services = {"echo": {"endpoints": ["127.0.0.1:9080"], "protocol": protocol, "health_check": {}}}
    svc = cluster(build(services=services), "svc_echo")
    assert svc.get("typed_extension_protocol_options") == (HTTP2 if http2 else None)
    (check,) = svc["health_checks"]
    if protocol == "grpc":
        assert check["grpc_health_check"] == {}
        assert "http_health_check" not in check
    else:
        assert check["http_health_check"] == {"path": "/healthz"}


@pytest.mark.parametrize(
    ("kind", "port", "grpc_service"),
    [
        ("authz", 9101, "envoy.service.auth.v3.Authorization"),
        ("ratelimit", 9102, "envoy.service.ratelimit.v3.RateLimitService"),
        ("extproc", 9103, "envoy.service.ext_proc.v3.ExternalProcessor"),
    ],
)
def test_sidecar_cluster_is_http2_with_grpc_health_check(kind: str, port: int, grpc_service: str) -> None:
    sidecars = {
        name: {"address": f"127.0.0.1:{p}"} for name, p in (("authz", 9101), ("ratelimit", 9102), ("extproc", 9103))
    }
    side = cluster(build(sidecars=sidecars), f"sidegate_{kind}")
    assert side["typed_extension_protocol_options"] == HTTP2
    assert endpoints(side) == [("127.0.0.1", port)]
    (check,) = side["health_checks"]
    assert check["grpc_health_check"] == {"service_name": grpc_service}
    # A dead worker or replica is ejected after three refused connections, never the last one.
    outlier = side["outlier_detection"]
    assert outlier["split_external_local_origin_errors"] is True
    assert outlier["consecutive_local_origin_failure"] == 3
    assert outlier["max_ejection_percent"] == 50


def _pipes(cluster_: dict[str, Any]) -> list[str]:
    (locality,) = cluster_["load_assignment"]["endpoints"]
    return [ep["endpoint"]["address"]["pipe"]["path"] for ep in locality["lb_endpoints"]]


def test_a_unix_sidecar_is_one_pipe_endpoint_per_worker_socket() -> None:
    unix = {"address": "unix:/run/sidegate/sidecars.sock", "workers": 3}
    sidecars = {"authz": unix, "ratelimit": unix, "extproc": {"address": "unix:extproc.sock"}}
    bootstrap = build("/var/sidegate", sidecars=sidecars)
    authz = cluster(bootstrap, "sidegate_authz")
    assert authz["type"] == "STATIC"
    assert _pipes(authz) == [f"/run/sidegate/sidecars-{n}.sock" for n in range(3)]
    assert authz["health_checks"][0]["grpc_health_check"] == {"service_name": "envoy.service.auth.v3.Authorization"}
    # A relative path lives in the state folder; no workers given: one socket.
    assert _pipes(cluster(bootstrap, "sidegate_extproc")) == ["/var/sidegate/extproc-0.sock"]


def test_a_relative_unix_sidecar_lives_in_the_socket_dir_when_one_is_given() -> None:
    """Compose compiles with --socket-dir: the sockets' volume, apart from the state and TLS files."""
    sidecars = {kind: {"address": "unix:sidecars.sock", "workers": 2} for kind in ("authz", "ratelimit", "extproc")}
    compiled = compiler.compile_bootstrap(
        gateway(sidecars=sidecars, listeners=[{"name": "https", "port": 8443, "tls": {}}]),
        state_dir=".sidegate",
        socket_dir="/run/sidegate",
    )
    assert _pipes(cluster(compiled, "sidegate_ratelimit")) == [
        "/run/sidegate/sidecars-0.sock",
        "/run/sidegate/sidecars-1.sock",
    ]
    tls = listeners(compiled)["https"]["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificates"][0]["certificate_chain"] == {"filename": ".sidegate/tls/server.crt"}


def test_every_cluster_is_defined_once() -> None:
    bootstrap = build(services={"echo": {"endpoints": ["127.0.0.1:9080"]}, "users": {"endpoints": ["127.0.0.1:9090"]}})
    names = [c["name"] for c in bootstrap["static_resources"]["clusters"]]
    assert sorted(names) == ["sidegate_authz", "sidegate_extproc", "sidegate_ratelimit", "svc_echo", "svc_users"]


# --- formatting and the committed bootstrap -----------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "0.25s"),
        (86400 * 90, "7776000s"),
        (1, "1s"),
        (1.0, "1s"),
        (0.1, "0.1s"),
        (0.001, "0.001s"),
        (2.5, "2.5s"),
    ],
)
def test_duration(seconds: float, text: str) -> None:
    assert compiler.duration(seconds) == text


def test_render_is_yaml_with_a_header_naming_the_source() -> None:
    text = compiler.render(gateway(), source="conf/gw.yaml")
    first, _, _ = text.partition("\n")
    assert first == "# Generated by `sidegate envoy-config --config conf/gw.yaml`. Do not edit by hand."
    assert yaml.safe_load(text) == compiler.compile_bootstrap(gateway())


def test_committed_envoy_config_is_up_to_date() -> None:
    committed = (ROOT / "envoy" / "gateway.yaml").read_text(encoding="utf-8")
    fresh = compiler.render(config.load(ROOT / "examples" / "gateway.yaml"), source="examples/gateway.yaml")
    assert committed == fresh, "envoy/gateway.yaml is stale: run `make envoy-config` and commit the result"


# --- file-based xDS for sidegate up ---------------------------------------------------------


def test_file_xds_shares_one_route_table_and_an_edit_of_one_api_changes_only_it(tmp_path: Path) -> None:
    two = [{"name": "http", "port": 8080}, {"name": "other", "port": 8081}]
    before = compiler.file_xds(build(listeners=two, apis=[api("a", "/a"), api("b", "/b")]), tmp_path)
    main, files = before
    assert list(files) == ["cds.json", "rds_sidegate.json", "lds.json"]  # the order a live edit writes them
    assert main["dynamic_resources"]["lds_config"]["path_config_source"]["path"] == str(tmp_path / "lds.json")
    [table] = files["rds_sidegate.json"]["resources"]
    assert [r["name"] for r in envoy_routes.routes(table["virtual_hosts"][0])][:2] == ["a", "b"]
    for listener in files["lds.json"]["resources"]:
        [network] = listener["filter_chains"][0]["filters"]
        assert "route_config" not in network["typed_config"]
        rds = network["typed_config"]["rds"]
        assert rds["route_config_name"] == table["name"]
        assert rds["config_source"]["path_config_source"]["path"] == str(tmp_path / "rds_sidegate.json")
    _, after = compiler.file_xds(build(listeners=two, apis=[api("a", "/a"), api("b", "/bee")]), tmp_path)
    changed = {name for name in files if files[name]["version_info"] != after[name]["version_info"]}
    assert changed == {"rds_sidegate.json"}


# --- a big gateway stays compact -------------------------------------------------------------


def scale_bootstrap(apis: int) -> dict[str, Any]:
    from bench import scale  # noqa: PLC0415 - the issue-18 fixture's generator

    return compiler.compile_bootstrap(config.parse(yaml.safe_dump(scale.gateway(10, apis), sort_keys=False)))


def test_the_scale_fixture_stays_under_its_size(tmp_path: Path) -> None:
    # 80 APIs of the bench/scale.py mix: 141,423 bytes of file xDS when this was written (1,200
    # APIs: 1,942,150); 158,270 since each anonymous route has a twin that strips API keys sent
    # in the query (routes.key_in_query_guard). A route that repeats what its virtual host says
    # again grows this.
    main, files = compiler.file_xds(scale_bootstrap(80), tmp_path)
    size = sum(len(compiler.json_text(part)) for part in (main, *files.values()))
    assert size <= 165_000, size
    (table,) = files["rds_sidegate.json"]["resources"]
    names = [r["name"] for r in envoy_routes.routes(table["virtual_hosts"][0])]
    assert len([n for n in names if not n.endswith(":key_in_query")]) == 80 // 4 * 3 + 80 // 4 * 7 + 1


def test_a_big_table_costs_its_last_route_what_it_costs_its_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # Envoy walks a route list in order: grouped by path prefix, the list a request walks is
    # as short for the last API as for the first, and picks what the flat table would.
    from bench import scale  # noqa: PLC0415 - the issue-18 fixture's generator

    grouped = vhost(scale_bootstrap(200))
    monkeypatch.setattr(groups, "GROUP_FROM", 10**6)
    flat = vhost(scale_bootstrap(200))
    assert "routes" not in grouped
    assert "matcher" not in flat
    walked = [len(envoy_routes.walked(grouped, scale.api_prefix(n) + "/x")) for n in range(200)]
    assert max(walked) <= groups.GROUP_SIZE + 1, max(walked)  # and the catch-all
    requests = [scale.api_prefix(n) + tail for n in range(200) for tail in ("", "/x", "0", "?q=1")]
    requests += [f"/{v}{scale.api_prefix(n)}/x" for n in range(3, 200, 4) for v in ("v1", "v2", "v3", "x")]
    requests += ["/", "/nope", "/v", "/v1", "/v1/", "*"]
    for path in requests:
        for headers in ({}, {"api-version": "v1"}, {"api-version": "v9"}, {"x-sidegate-version": "v1"}):
            as_grouped, as_flat = (envoy_routes.pick(host, path, headers) or {} for host in (grouped, flat))
            assert as_grouped.get("name") == as_flat.get("name"), (path, headers)


def test_routes_say_only_where_they_differ_from_the_virtual_host() -> None:
    host = vhost(scale_bootstrap(40))
    shared = host["typed_per_filter_config"]
    assert shared == {AUTHZ: FILTER_OFF, EXTPROC: FILTER_OFF}
    assert host["rate_limits"]
    assert host["retry_policy"]
    for r in envoy_routes.routes(host):
        own = r.get("typed_per_filter_config", {})
        assert all(own.get(name) != config_ for name, config_ in shared.items()), r["name"]
        action = r.get("route", {})
        assert action.get("rate_limits") != host["rate_limits"], r["name"]
        assert action.get("retry_policy") != host["retry_policy"], r["name"]
        assert action.get("timeout") != "15s", r["name"]  # Envoy's default
