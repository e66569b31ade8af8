"""The mesh: sidecar bootstraps compiled from examples/mesh.yaml, the edge's mTLS, certificates."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidegate import config, devcerts, meshcerts
from sidegate.compiler import compile_bootstrap
from sidegate.compiler import mesh as compiler
from sidegate.contract import IDENTITY_HEADERS
from sidegate.errors import SettingsError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mesh.yaml"
STATE = Path("/state")


@pytest.fixture(scope="module")
def gateway() -> config.Gateway:
    return config.load(EXAMPLE)


def _listener(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    listener: dict[str, Any] = next(x for x in bootstrap["static_resources"]["listeners"] if x["name"] == name)
    return listener


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    config_: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return config_


def _filter(hcm: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(f["typed_config"] for f in hcm["http_filters"] if f["name"] == name)
    return found


def _cluster(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    cluster: dict[str, Any] = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name)
    return cluster


def test_inbound_requires_a_client_certificate_from_the_mesh_ca(gateway: config.Gateway) -> None:
    inbound = _listener(compiler.sidecar_bootstrap(gateway, "payments", STATE), "inbound")
    assert inbound["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15102}
    tls = inbound["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    common = tls["common_tls_context"]
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    sds = common["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]["path"]
    assert sds == "/state/mesh/payments/identity.yaml"
    trust = common["validation_context_sds_secret_config"]["sds_config"]["path_config_source"]["path"]
    assert trust == "/state/mesh/payments/trust.yaml"


def test_rbac_allows_exactly_the_rules_naming_the_service(gateway: config.Gateway) -> None:
    hcm = _hcm(_listener(compiler.sidecar_bootstrap(gateway, "payments", STATE), "inbound"))
    rules = _filter(hcm, "envoy.filters.http.rbac")["rules"]
    assert rules["action"] == "ALLOW"
    [(name, policy)] = rules["policies"].items()
    assert name == "orders-0"
    principal = policy["principals"][0]["authenticated"]["principal_name"]
    assert principal == {"exact": "spiffe://sidegate.local/orders"}
    paths, methods = policy["permissions"][0]["and_rules"]["rules"]
    assert [r["url_path"]["path"] for r in paths["or_rules"]["rules"]] == [{"exact": "/charge"}, {"prefix": "/charge/"}]
    assert methods["or_rules"]["rules"] == [{"header": {"name": ":method", "string_match": {"exact": "POST"}}}]
    # The gateway may call orders, anything.
    hcm = _hcm(_listener(compiler.sidecar_bootstrap(gateway, "orders", STATE), "inbound"))
    policies = _filter(hcm, "envoy.filters.http.rbac")["rules"]["policies"]
    assert policies == {
        "gateway-0": {
            "permissions": [{"any": True}],
            "principals": [{"authenticated": {"principal_name": {"exact": "spiffe://sidegate.local/gateway"}}}],
        }
    }
    # Filters run in this order: identity headers, then rbac, then the router.
    assert [f["name"] for f in hcm["http_filters"]] == [
        "sidegate.mesh.strip_identity",
        "envoy.filters.http.rbac",
        "envoy.filters.http.router",
    ]
    assert hcm["normalize_path"] is True


def test_no_rule_means_no_policy_so_every_call_is_denied(gateway: config.Gateway) -> None:
    lonely = gateway.model_copy(update={"mesh": gateway.mesh.model_copy(update={"allow": ()})})  # type: ignore[union-attr]
    hcm = _hcm(_listener(compiler.sidecar_bootstrap(lonely, "orders", STATE), "inbound"))
    assert _filter(hcm, "envoy.filters.http.rbac")["rules"] == {"action": "ALLOW", "policies": {}}
    hosts = _hcm(_listener(compiler.sidecar_bootstrap(lonely, "orders", STATE), "outbound"))["route_config"]
    assert [h["name"] for h in hosts["virtual_hosts"]] == ["not_allowed"]


def test_identity_headers_are_stripped_unless_the_gateway_calls(gateway: config.Gateway) -> None:
    hcm = _hcm(_listener(compiler.sidecar_bootstrap(gateway, "orders", STATE), "inbound"))
    strip = _filter(hcm, "sidegate.mesh.strip_identity")
    removed = strip["extension_config"]["typed_config"]["mutations"]["request_mutations"]
    assert [m["remove"] for m in removed] == list(IDENTITY_HEADERS)
    skipped = strip["xds_matcher"]["matcher_tree"]["exact_match_map"]["map"]
    assert list(skipped) == ["spiffe://sidegate.local/gateway"]
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"


def test_outbound_routes_each_callee_with_its_service_settings(gateway: config.Gateway) -> None:
    bootstrap = compiler.sidecar_bootstrap(gateway, "orders", STATE)
    hosts = _hcm(_listener(bootstrap, "outbound"))["route_config"]["virtual_hosts"]
    assert [(h["name"], h["domains"]) for h in hosts] == [
        ("payments", ["payments", "payments:*"]),
        ("inventory", ["inventory", "inventory:*"]),
        ("not_allowed", ["*"]),
    ]
    action = hosts[0]["routes"][0]["route"]
    assert action["cluster"] == "svc_payments"
    assert action["timeout"] == "5s"
    assert action["retry_policy"]["num_retries"] == 2
    assert hosts[2]["routes"][0]["direct_response"]["status"] == 403
    payments = _cluster(bootstrap, "svc_payments")
    assert payments["circuit_breakers"]["thresholds"][0]["max_connections"] == 256
    tls = payments["transport_socket"]["typed_config"]
    assert tls["sni"] == "payments"
    validation = tls["common_tls_context"]["combined_validation_context"]
    assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://sidegate.local/payments"}}
    ]
    identity = tls["common_tls_context"]["tls_certificate_sds_secret_configs"][0]
    assert identity["sds_config"]["path_config_source"]["path"] == "/state/mesh/orders/identity.yaml"
    app = _cluster(bootstrap, "mesh_app")
    assert app["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9101,
    }
    assert "transport_socket" not in app


def test_the_edge_calls_mesh_services_with_the_gateways_identity(gateway: config.Gateway) -> None:
    services = dict(gateway.services) | {"plain": config.Service.model_validate({"endpoints": ["127.0.0.1:9080"]})}
    mixed = gateway.model_copy(update={"services": services})
    bootstrap = compile_bootstrap(mixed, state_dir="/state")
    tls = _cluster(bootstrap, "svc_orders")["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]["path"] == (
        "/state/mesh/gateway/identity.yaml"
    )
    assert "transport_socket" not in _cluster(bootstrap, "svc_plain")
    assert bootstrap["node"] == {"id": "sidegate", "cluster": "sidegate"}


def test_an_unknown_service_is_a_clear_error(gateway: config.Gateway) -> None:
    with pytest.raises(SettingsError, match="not a mesh service: 'billing'"):
        compiler.sidecar_bootstrap(gateway, "billing", STATE)


def _secret(path: Path) -> dict[str, Any]:
    resource: dict[str, Any] = yaml.safe_load(path.read_text())["resources"][0]
    return resource


def test_certificates_carry_one_spiffe_uri_and_keys_stay_private(gateway: config.Gateway, tmp_path: Path) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert meshcerts.ensure(gateway, tmp_path, now=now) == ["gateway", "orders", "payments", "inventory"]
    folder = meshcerts.identity_dir(tmp_path, "orders")
    cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://sidegate.local/orders"]
    assert len(list(sans)) == 1
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.not_valid_after_utc - now == dt.timedelta(hours=24)
    assert stat.S_IMODE((folder / "identity.yaml").stat().st_mode) == 0o600
    assert stat.S_IMODE((meshcerts.mesh_dir(tmp_path) / "ca.key").stat().st_mode) == 0o600
    assert "PRIVATE KEY" in _secret(folder / "identity.yaml")["tls_certificate"]["private_key"]["inline_string"]
    for public in (folder / "cert.pem", folder / "trust.yaml", meshcerts.mesh_dir(tmp_path) / "ca.crt"):
        assert "PRIVATE KEY" not in public.read_text()
    ca = (meshcerts.mesh_dir(tmp_path) / "ca.crt").read_text()
    assert _secret(folder / "trust.yaml")["validation_context"]["trusted_ca"]["inline_string"] == ca


def test_certificates_are_renewed_at_half_life_or_when_the_ca_changes(gateway: config.Gateway, tmp_path: Path) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    meshcerts.ensure(gateway, tmp_path, now=now)
    assert meshcerts.ensure(gateway, tmp_path, now=now + dt.timedelta(hours=11)) == []
    assert len(meshcerts.ensure(gateway, tmp_path, now=now + dt.timedelta(hours=13))) == 4
    assert len(meshcerts.ensure(gateway, tmp_path, force=True, now=now)) == 4
    # An operator's CA replaces the development one: every identity is issued again by it.
    key, cert = devcerts.new_ca("Operator CA", now)
    devcerts.write(tmp_path / "op" / "ca.key", devcerts.pem_key(key), secret=True)
    devcerts.write(tmp_path / "op" / "ca.crt", devcerts.pem_cert(cert))
    ca = config.MeshCa(cert=str(tmp_path / "op" / "ca.crt"), key=str(tmp_path / "op" / "ca.key"))
    operated = gateway.model_copy(update={"mesh": gateway.mesh.model_copy(update={"ca": ca})})  # type: ignore[union-attr]
    assert len(meshcerts.ensure(operated, tmp_path, now=now)) == 4
    issued = x509.load_pem_x509_certificate((meshcerts.identity_dir(tmp_path, "orders") / "cert.pem").read_bytes())
    assert issued.issuer == cert.subject
