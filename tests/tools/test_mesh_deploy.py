"""The mesh offline: `sidegate check` on the mesh configs (every sidecar through envoy --mode
validate), and `sidegate mesh inject` giving Kubernetes objects that validate and agree with the
sidecar's bootstrap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sidegate import cli, config, contract, envoy_bin, meshcerts
from sidegate.cli import mesh_inject

ROOT = Path(__file__).resolve().parents[2]
MESH_CONFIGS = (ROOT / "examples" / "mesh.yaml", ROOT / "deploy" / "mesh" / "gateway.yaml")


def _sidegate(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidegate", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("path", MESH_CONFIGS, ids=lambda p: p.name)
def test_check_validates_the_edge_and_every_sidecar(path: Path) -> None:
    result = _sidegate("check", str(path))
    assert result.returncode == 0, result.stderr


def test_check_names_the_sidecar_envoy_rejects(tmp_path: Path) -> None:
    # The model takes a host name for a sidecar's admin; Envoy binds only an IP address. Only
    # inventory's sidecar bootstrap has it, so only that check can find it.
    text = (ROOT / "examples" / "mesh.yaml").read_text().replace('admin: "127.0.0.1:15903"', 'admin: "localhost:15903"')
    bad = tmp_path / "mesh.yaml"
    bad.write_text(text)
    result = _sidegate("check", str(bad))
    assert result.returncode == 2
    assert "Envoy rejects the mesh sidecar of inventory" in result.stderr


@pytest.fixture(scope="module")
def injected() -> list[dict[str, Any]]:
    result = _sidegate(
        "mesh", "inject", "--config", "deploy/mesh/gateway.yaml", "--service", "orders", "deploy/mesh/orders.yaml"
    )
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


@pytest.mark.parametrize("version", ["1.30", "1.35"])
def test_injected_objects_validate_against_kubernetes(injected: list[dict[str, Any]], version: str) -> None:
    assert [obj["kind"] for obj in injected] == ["Deployment", "ConfigMap"]
    for obj in injected:
        kubernetes_validate.validate(obj, version, strict=True)


def test_injected_pod_holds_the_sidecar_its_certificates_and_keeps_the_app(injected: list[dict[str, Any]]) -> None:
    deployment, config_map = injected
    pod = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["orders", "sidegate-envoy"]
    [certs] = pod["initContainers"]
    assert certs["restartPolicy"] == "Always"  # a native sidecar: certificates before Envoy starts
    cli.parser().parse_args([*certs["command"][1:], *certs["args"]])  # a command the CLI takes
    assert config_map["metadata"]["name"] == mesh_inject.config_map_name("orders")
    envoy = pod["containers"][1]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["sidegate-mesh"]["emptyDir"] == {"medium": "Memory"}
    assert volumes["sidegate-envoy"]["configMap"]["name"] == config_map["metadata"]["name"]
    # Both containers see the SDS files where the bootstrap names them.
    bootstrap = yaml.safe_load(config_map["data"]["envoy.yaml"])
    inbound = bootstrap["static_resources"]["listeners"][0]
    common = inbound["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    sds = Path(common["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]["path"])
    for container in (certs, envoy):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert sds.is_relative_to(mounts["sidegate-mesh"])
    assert envoy["ports"][0]["containerPort"] == inbound["address"]["socket_address"]["port_value"]
    # Only the certificates container holds the CA's key.
    assert "sidegate-mesh-ca" not in {m["name"] for m in envoy["volumeMounts"]}


def test_injected_bootstrap_validates_with_envoy(injected: list[dict[str, Any]], tmp_path: Path) -> None:
    gateway = config.load(ROOT / "deploy" / "mesh" / "gateway.yaml")
    assert gateway.mesh is not None
    stand_in = gateway.model_copy(update={"mesh": gateway.mesh.model_copy(update={"ca": None})})
    meshcerts.ensure(stand_in, tmp_path, only="orders")
    text = injected[1]["data"]["envoy.yaml"].replace(str(mesh_inject.STATE_DIR), str(tmp_path))
    (tmp_path / "envoy.yaml").write_text(text)
    argv = [envoy_bin.envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml"), "--disable-hot-restart"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-1000:]


def _tcp_services() -> dict[str, set[int]]:
    """deploy/tcp's Services: name → ports (the layout whose sidecars a pod can reach by TCP)."""
    found: dict[str, set[int]] = {}
    for path in (ROOT / "deploy" / "tcp").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Service":
                found[doc["metadata"]["name"]] = {p["port"] for p in doc["spec"]["ports"]}
    return found


@pytest.mark.parametrize("policy", ["none", "limits", "authz"])
def test_a_sidecar_that_calls_authz_or_ratelimit_is_labelled_for_the_tcp_layouts_policy(policy: str) -> None:
    """`mesh.limits` or `mesh.authz` on a service make its sidecar Envoy call the ratelimit or
    authz sidecar: inject labels the pod so deploy/tcp's NetworkPolicy admits it (checked in
    tests/tools/test_deploy.py), and the bootstrap calls a Service deploy/tcp has, on its port."""
    doc = yaml.safe_load((ROOT / "deploy" / "mesh" / "gateway.yaml").read_text())
    if policy == "limits":
        doc["mesh"]["limits"] = [{"to": "orders", "requests": 100, "window": "1s"}]
    elif policy == "authz":
        doc["mesh"]["authz"] = {"orders": {"api_key": True}}
    gateway = config.parse(yaml.safe_dump(doc, sort_keys=False), str(ROOT / "deploy" / "mesh" / "gateway.yaml"))
    deployment, config_map = mesh_inject.inject(
        yaml.safe_load((ROOT / "deploy" / "mesh" / "orders.yaml").read_text()), gateway, "orders"
    )
    labels = deployment["spec"]["template"].get("metadata", {}).get("labels", {})
    assert (labels.get(contract.SIDECAR_CALLER_LABEL) == "true") == (policy != "none")
    if policy == "none":
        return
    bootstrap = yaml.safe_load(config_map["data"]["envoy.yaml"])
    sidecar = "ratelimit" if policy == "limits" else "authz"
    addresses = [
        endpoint["endpoint"]["address"]["socket_address"]
        for cluster in bootstrap["static_resources"]["clusters"]
        for group in cluster.get("load_assignment", {}).get("endpoints", [])
        for endpoint in group["lb_endpoints"]
        if "socket_address" in endpoint["endpoint"]["address"]
    ]
    services = _tcp_services()
    assert any(a["address"] == sidecar and a["port_value"] in services[sidecar] for a in addresses), addresses
