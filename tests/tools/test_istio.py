"""deploy/istio/ offline: the AuthorizationPolicy and the EnvoyFilter against Istio's CRD schemas
(the pydantic models of the ``cloudcoil-models-istio`` package, generated from Istio 1.24's CRDs:
a round trip must keep every key, so a misspelt field fails as a wrong value does), the mesh
config's ext_authz provider against the fields of Istio's MeshConfig, the names they share with
deploy/ and the sidecars, and the Envoy config the EnvoyFilter adds with ``envoy --mode validate``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloudcoil.models.istio.networking.v1alpha3 import EnvoyFilter
from cloudcoil.models.istio.security.v1 import AuthorizationPolicy
from pydantic import BaseModel, ValidationError

from sidegate import config
from sidegate.contract import (
    AUTHZ_METADATA_NAMESPACE,
    RATELIMIT_DOMAIN,
    RL_CONSUMER,
    RL_DEFAULT_CONSUMER,
    RL_METHOD,
    RL_NO_PLAN,
    RL_PLAN,
)
from sidegate.envoy_bin import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
TYPE = "type.googleapis.com/"
ISTIO = ROOT / "deploy" / "istio"
CRDS: dict[str, type[BaseModel]] = {
    "authorization-policy.yaml": AuthorizationPolicy,
    "ratelimit-envoyfilter.yaml": EnvoyFilter,
}
# Istio's MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider (mesh/v1alpha1/config.proto).
GRPC_PROVIDER_FIELDS = {
    "service",
    "port",
    "timeout",
    "failOpen",
    "clearRouteCache",
    "statusOnError",
    "includeRequestBodyInCheck",
}


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ISTIO / name).read_text())
    return doc


def _validated(model: type[BaseModel], doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` through Istio's schema and back: what the schema kept of it."""
    kept: dict[str, Any] = model.model_validate(doc).model_dump(by_alias=True, exclude_none=True, mode="json")
    return kept


@pytest.mark.parametrize("name", sorted(CRDS))
def test_each_object_is_valid_under_istios_crd_schema(name: str) -> None:
    doc = _load(name)
    assert _validated(CRDS[name], doc) == doc  # nothing unknown dropped, nothing changed


def test_the_schema_check_catches_a_wrong_value_and_a_misspelt_key() -> None:
    doc = _load("authorization-policy.yaml")
    doc["spec"]["action"] = "EXTERNAL"
    with pytest.raises(ValidationError):
        _validated(AuthorizationPolicy, doc)
    doc = _load("authorization-policy.yaml")
    doc["spec"]["rules"][0]["to"][0]["operation"]["path"] = ["/orders"]  # paths, misspelt
    assert _validated(AuthorizationPolicy, doc) != doc


def _services() -> dict[tuple[str, str], set[int]]:
    """Every Service of deploy/tcp (the layout Istio's sidecars can reach): (name, namespace) → its ports."""
    found: dict[tuple[str, str], set[int]] = {}
    for path in (ROOT / "deploy" / "tcp").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Service":
                key = (doc["metadata"]["name"], doc["metadata"]["namespace"])
                found[key] = {p["port"] for p in doc["spec"]["ports"]}
    return found


def _service_of(host: str) -> tuple[str, str]:
    name, namespace, *rest = host.split(".")
    assert rest == ["svc", "cluster", "local"], host
    return name, namespace


def test_the_authz_provider_names_the_authz_service_and_only_istios_fields() -> None:
    doc = _load("mesh-config.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("install.istio.io/v1alpha1", "IstioOperator")
    (provider,) = doc["spec"]["meshConfig"]["extensionProviders"]
    grpc = provider["envoyExtAuthzGrpc"]
    assert set(grpc) <= GRPC_PROVIDER_FIELDS
    assert grpc["port"] in _services()[_service_of(grpc["service"])]
    assert _service_of(grpc["service"])[0] == "authz"
    assert config.parse_duration(grpc["timeout"]) > 0
    assert isinstance(grpc["failOpen"], bool)
    assert grpc["statusOnError"].isdigit()
    # The CUSTOM policy names this provider: Istio refuses a policy naming an unknown one.
    policy = _load("authorization-policy.yaml")["spec"]
    assert (policy["action"], policy["provider"]["name"]) == ("CUSTOM", provider["name"])


def _patches() -> tuple[dict[str, Any], dict[str, Any]]:
    http_filter, route = (p["patch"]["value"] for p in _load("ratelimit-envoyfilter.yaml")["spec"]["configPatches"])
    return http_filter, route


def test_the_ratelimit_patch_sends_the_edges_plan_descriptor_to_the_ratelimit_service() -> None:
    http_filter, route = _patches()
    typed = http_filter["typed_config"]
    assert typed["domain"] == RATELIMIT_DOMAIN
    cluster = typed["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    direction, port, _, host = cluster.split("|")
    assert direction == "outbound"
    assert _service_of(host)[0] == "ratelimit"
    assert int(port) in _services()[_service_of(host)]
    (entry,) = route["route"]["rate_limits"]
    keys = []
    for action in entry["actions"]:
        if "metadata" in action:
            meta = action["metadata"]
            assert meta["metadata_key"]["key"] == AUTHZ_METADATA_NAMESPACE
            keys.append(meta["descriptor_key"])
            # Without a default Envoy drops the descriptor and skips the call: a silent bypass.
            assert meta["default_value"] == {RL_PLAN: RL_NO_PLAN, RL_CONSUMER: RL_DEFAULT_CONSUMER}[keys[-1]]
        else:
            keys.append(action["request_headers"]["descriptor_key"])
    assert keys == [RL_PLAN, RL_CONSUMER, RL_METHOD]  # contract.rate_limit_shapes' plan shape


def test_envoy_accepts_what_the_envoyfilter_adds(tmp_path: Path) -> None:
    """The filter and the route's rate limits in a bootstrap like the inbound one Istio makes."""
    http_filter, route = _patches()
    cluster = http_filter["typed_config"]["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    hcm = {
        "@type": TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "inbound|http|8080",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app", **route["route"]}}],
                }
            ]
        },
        "http_filters": [
            http_filter,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": TYPE + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    listener = {
        "name": "inbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15006}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }

    def cluster_of(name: str) -> dict[str, Any]:
        endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9001}}}}
        return {
            "name": name,
            "type": "STATIC",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
        }

    bootstrap = {"static_resources": {"listeners": [listener], "clusters": [cluster_of("app"), cluster_of(cluster)]}}
    path = tmp_path / "istio-inbound.json"
    path.write_text(json.dumps(bootstrap))
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_authz_picks_the_api_by_path_when_istio_names_none() -> None:
    gateway = config.load(ROOT / "deploy" / "gateway.yaml")
    assert (api := gateway.api_at("/orders/7?x=1", "GET")) is not None
    assert api.name == "orders"
    assert gateway.api_at("/ordersx", "GET") is None  # segment boundaries, as Envoy's routes
    assert gateway.api_at("/public/hello", "POST") is None  # public takes GET and HEAD only
