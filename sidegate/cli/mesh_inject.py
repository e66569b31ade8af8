"""``sidegate mesh inject``: add a mesh service's sidecar Envoy and its certificates to a Deployment.

The pod gets two more containers and three volumes. ``sidegate-mesh-certs`` (a native sidecar:
an init container with ``restartPolicy: Always``, so it has issued the certificates before Envoy
starts) runs ``sidegate mesh certs --service X --watch`` and writes the SDS files into an
``emptyDir`` shared with ``sidegate-envoy``, which runs the bootstrap of ``sidegate mesh-config``
from a ConfigMap. The mesh CA comes from the Secret ``sidegate-mesh-ca`` (``ca.crt``,
``ca.key``), mounted into the certificates container only. The output is the Deployment and
that ConfigMap, as one YAML stream.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from sidegate.compiler import mesh as mesh_compiler
from sidegate.config import Gateway
from sidegate.contract import SIDECAR_CALLER_LABEL
from sidegate.errors import SettingsError

STATE_DIR = Path("/var/run/sidegate")  # the emptyDir both containers share
CONFIG_DIR = "/etc/sidegate"  # gateway.yaml (ConfigMap sidegate-config, as in deploy/)
CA_DIR = "/etc/sidegate-mesh-ca"
ENVOY_IMAGE = "envoyproxy/envoy:v1.40-latest"
SIDEGATE_IMAGE = "sidegate:0.1.0"
CA_SECRET = "sidegate-mesh-ca"  # noqa: S105 - the name of a Secret, not one
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def config_map_name(service: str) -> str:
    return f"sidegate-mesh-{service}"


def inject(deployment: dict[str, Any], gateway: Gateway, service: str) -> list[dict[str, Any]]:
    """The Deployment with ``service``'s mesh sidecar added, and the ConfigMap of its bootstrap."""
    if deployment.get("kind") != "Deployment":
        raise SettingsError(f"not a Deployment: kind {deployment.get('kind')!r}")
    bootstrap = mesh_compiler.render(gateway, service, source=f"{CONFIG_DIR}/gateway.yaml", state_dir=STATE_DIR)
    mesh = gateway.mesh
    assert mesh is not None  # render checked it
    me = mesh.services[service]
    out = copy.deepcopy(deployment)
    pod = out["spec"]["template"]["spec"]
    names = {c["name"] for c in [*pod.get("containers", []), *pod.get("initContainers", [])]}
    if "sidegate-envoy" in names:
        raise SettingsError("this Deployment already has a sidegate-envoy container")
    identity = f"{STATE_DIR}/mesh/{service}/identity.yaml"
    certs = {
        "name": "sidegate-mesh-certs",
        "image": SIDEGATE_IMAGE,
        "restartPolicy": "Always",
        "command": ["sidegate", "mesh", "certs", "--config", f"{CONFIG_DIR}/gateway.yaml"],
        "args": ["--state-dir", str(STATE_DIR), "--service", service, "--watch"],
        "startupProbe": {"exec": {"command": ["test", "-s", identity]}, "periodSeconds": 1, "failureThreshold": 30},
        "securityContext": copy.deepcopy(RESTRICTED),
        "volumeMounts": [
            {"name": "sidegate-mesh", "mountPath": str(STATE_DIR)},
            {"name": "sidegate-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "sidegate-mesh-ca", "mountPath": CA_DIR, "readOnly": True},
        ],
    }
    envoy = {
        "name": "sidegate-envoy",
        "image": ENVOY_IMAGE,
        "args": ["-c", "/etc/sidegate-envoy/envoy.yaml", "--log-level", "warn"],
        "ports": [{"name": "mesh-inbound", "containerPort": me.inbound.port}],
        # Envoy's admin stays on the pod's loopback, out of the kubelet's reach: probe the listener.
        "readinessProbe": {"tcpSocket": {"port": me.inbound.port}},
        "securityContext": copy.deepcopy(RESTRICTED),
        "volumeMounts": [
            {"name": "sidegate-mesh", "mountPath": str(STATE_DIR), "readOnly": True},
            {"name": "sidegate-envoy", "mountPath": "/etc/sidegate-envoy", "readOnly": True},
        ],
    }
    if mesh.authz.get(service) is not None or mesh.limits_of(service):
        # Its sidecar Envoy calls authz or ratelimit: the TCP layout's NetworkPolicy admits it.
        labels = out["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {})
        labels[SIDECAR_CALLER_LABEL] = "true"
    pod["initContainers"] = [*pod.get("initContainers", []), certs]
    pod["containers"] = [*pod.get("containers", []), envoy]
    pod["volumes"] = [
        *pod.get("volumes", []),
        {"name": "sidegate-mesh", "emptyDir": {"medium": "Memory"}},  # private keys never touch a disk
        {"name": "sidegate-envoy", "configMap": {"name": config_map_name(service)}},
        {"name": "sidegate-mesh-ca", "secret": {"secretName": CA_SECRET}},
    ]
    if not any(v.get("name") == "sidegate-config" for v in pod["volumes"]):
        pod["volumes"].append({"name": "sidegate-config", "configMap": {"name": "sidegate-config"}})
    metadata: dict[str, Any] = {
        "name": config_map_name(service),
        "labels": {"app.kubernetes.io/part-of": "sidegate-mesh"},
    }
    namespace = deployment.get("metadata", {}).get("namespace")
    if namespace:
        metadata["namespace"] = namespace
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"envoy.yaml": bootstrap}}
    return [out, config_map]


def inject_text(text: str, gateway: Gateway, service: str) -> str:
    """``inject`` on a YAML Deployment; the YAML stream it gives."""
    return yaml.safe_dump_all(inject(yaml.safe_load(text), gateway, service), sort_keys=False, width=100)
