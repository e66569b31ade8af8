"""The mesh's optional policies, compiled: east-west rate limits (Envoy's actions and the
ratelimit sidecar's rules), authz for calls that carry an end user's credential, and tracing in
every sidecar. A mesh without them keeps Python off the east-west path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ratelimit import limits
from ratelimit.limits import Descriptor, Request
from sidegate import config
from sidegate.compiler import mesh as compiler
from sidegate.compiler.clusters import OTLP_CLUSTER, SIDECAR_CLUSTER
from sidegate.contract import (
    AUTHZ,
    RATELIMIT,
    RATELIMIT_DOMAIN,
    RL_MESH_CALLER,
    RL_MESH_SERVICE,
    RL_METHOD,
    mesh_api,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "examples" / "mesh.yaml").read_text()
STATE = Path("/state")
POLICY = """
  limits:
    - {to: inventory, requests: 100, window: 1s}
    - {from: orders, to: payments, requests: 10, window: 1m, methods: [POST]}
  authz:
    payments: {jwt: [shop], api_key: true, scopes: {POST: [payments:charge]}}
    inventory: {api_key: true, required: true}
issuers:
  shop: {issuer: "https://idp.example", audiences: [shop], algorithms: [HS256], shared_secret_env: SHOP_SECRET}
"""


def _with(text: str, extra: str) -> config.Gateway:
    """examples/mesh.yaml with ``extra`` after the mesh's last key (``apis`` moved to the end)."""
    head, _, apis = text.partition("\napis:\n")
    return config.parse(head.rstrip("\n") + "\n" + extra.lstrip("\n") + "apis:\n" + apis)


@pytest.fixture(scope="module")
def plain() -> config.Gateway:
    return config.parse(EXAMPLE)


@pytest.fixture(scope="module")
def policy() -> config.Gateway:
    return _with(EXAMPLE, POLICY)


def _inbound_hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    inbound = next(x for x in bootstrap["static_resources"]["listeners"] if x["name"] == "inbound")
    hcm: dict[str, Any] = inbound["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _filters(hcm: dict[str, Any]) -> list[str]:
    return [f["name"] for f in hcm["http_filters"]]


def _clusters(bootstrap: dict[str, Any]) -> set[str]:
    return {c["name"] for c in bootstrap["static_resources"]["clusters"]}


def test_without_limits_authz_or_telemetry_no_python_and_no_tracing(plain: config.Gateway) -> None:
    for service in ("orders", "payments", "inventory"):
        bootstrap = compiler.sidecar_bootstrap(plain, service, STATE)
        hcm = _inbound_hcm(bootstrap)
        assert _filters(hcm) == ["sidegate.mesh.strip_identity", "envoy.filters.http.rbac", "envoy.filters.http.router"]
        assert "tracing" not in hcm
        assert not _clusters(bootstrap) & {*SIDECAR_CLUSTER.values(), OTLP_CLUSTER}
        assert "rate_limits" not in str(bootstrap)


def test_limits_count_the_caller_by_its_certificate_never_a_header(policy: config.Gateway) -> None:
    bootstrap = compiler.sidecar_bootstrap(policy, "inventory", STATE)
    hcm = _inbound_hcm(bootstrap)
    # rbac first: a caller no rule allows never costs a callout.
    assert _filters(hcm)[1:] == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.router",
    ]
    ratelimit = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ratelimit")["typed_config"]
    assert ratelimit["domain"] == RATELIMIT_DOMAIN
    assert SIDECAR_CLUSTER[RATELIMIT] in _clusters(bootstrap)
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        (actions,) = [entry["actions"] for entry in route["route"]["rate_limits"]]
        assert actions[0] == {"generic_key": {"descriptor_key": RL_MESH_SERVICE, "descriptor_value": "inventory"}}
        caller = actions[1]["extension"]["typed_config"]
        assert (caller["descriptor_key"], caller["text"]) == (RL_MESH_CALLER, "connection.uri_san_peer_certificate")
        assert actions[2]["request_headers"]["descriptor_key"] == RL_METHOD
    # orders has no limits on its own calls: no ratelimit filter there.
    orders = _inbound_hcm(compiler.sidecar_bootstrap(policy, "orders", STATE))
    assert "envoy.filters.http.ratelimit" not in _filters(orders)


def _mesh_request(callee: str, caller: str, method: str = "GET") -> Request:
    entries = ((RL_MESH_SERVICE, callee), (RL_MESH_CALLER, f"spiffe://sidegate.local/{caller}"), (RL_METHOD, method))
    return Request(RATELIMIT_DOMAIN, (Descriptor(entries),))


def test_the_ratelimit_sidecar_counts_each_caller_apart(policy: config.Gateway) -> None:
    rules = limits.from_gateway(policy)
    by_orders = rules.match(_mesh_request("inventory", "orders")).hits
    by_payments = rules.match(_mesh_request("inventory", "payments")).hits
    assert [h.rule.limit for h in by_orders] == [100] == [h.rule.limit for h in by_payments]
    assert by_orders[0].rule is by_payments[0].rule
    assert by_orders[0].key != by_payments[0].key  # two counters: one caller never spends another's
    assert by_orders[0].rule.policy == "mesh-inventory-1s"


def test_a_limit_naming_its_caller_and_methods_counts_only_those(policy: config.Gateway) -> None:
    rules = limits.from_gateway(policy)
    assert [h.rule.limit for h in rules.match(_mesh_request("payments", "orders", "POST")).hits] == [10]
    assert rules.match(_mesh_request("payments", "orders", "GET")).hits == ()
    assert rules.match(_mesh_request("payments", "gateway", "POST")).hits == ()
    assert rules.match(_mesh_request("orders", "gateway")).hits == ()  # no limits on orders


def test_authz_runs_only_for_calls_that_carry_a_credential(policy: config.Gateway) -> None:
    bootstrap = compiler.sidecar_bootstrap(policy, "payments", STATE)
    hcm = _inbound_hcm(bootstrap)
    assert "envoy.filters.http.ext_authz" in _filters(hcm)
    assert SIDECAR_CLUSTER[AUTHZ] in _clusters(bootstrap)
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    checked = {"api": mesh_api("payments")}
    by_header = {r["match"]["headers"][0]["name"]: r for r in routes if "headers" in r["match"]}
    assert sorted(by_header) == ["authorization", "x-api-key"]
    for route in by_header.values():
        per_route = route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
        assert per_route["check_settings"]["context_extensions"] == checked
    last = routes[-1]
    assert "headers" not in last["match"]
    assert last["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] is True


def test_required_authz_checks_every_call(policy: config.Gateway) -> None:
    routes = _inbound_hcm(compiler.sidecar_bootstrap(policy, "inventory", STATE))["route_config"]["virtual_hosts"][0]
    (route,) = routes["routes"]
    per_route = route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
    assert per_route["check_settings"]["context_extensions"] == {"api": mesh_api("inventory")}


def test_authz_knows_a_mesh_service_as_an_api_no_edge_api_can_be(policy: config.Gateway) -> None:
    api = policy.api(mesh_api("payments"))
    assert api is not None
    assert api.name == "mesh:payments"
    assert (api.auth.jwt, api.auth.api_key, api.auth.required_scopes("POST")) == (("shop",), True, ("payments:charge",))
    assert policy.api("payments") is None
    assert policy.api(mesh_api("orders")) is None


def test_rbac_403_gets_the_mesh_body_and_authz_denials_keep_theirs(policy: config.Gateway) -> None:
    hcm = _inbound_hcm(compiler.sidecar_bootstrap(policy, "payments", STATE))
    (mapper,) = hcm["local_reply_config"]["mappers"]
    expression = mapper["filter"]["extension_filter"]["typed_config"]["expression"]
    assert expression == "response.code_details.startsWith('rbac_access_denied')"


def test_with_telemetry_both_listeners_of_every_sidecar_trace(plain: config.Gateway) -> None:
    traced = plain.model_copy(update={"telemetry": config.Telemetry.model_validate({"otlp": "127.0.0.1:4317"})})
    bootstrap = compiler.sidecar_bootstrap(traced, "orders", STATE)
    for listener in bootstrap["static_resources"]["listeners"]:
        tracing = listener["filter_chains"][0]["filters"][0]["typed_config"]["tracing"]
        assert tracing["provider"]["typed_config"]["service_name"] == "sidegate-envoy.orders"
    assert OTLP_CLUSTER in _clusters(bootstrap)
