"""The Kubernetes manifests of deploy/, checked without a cluster.

This module owns the agreement between deploy/ and the rest of the tree. It renders
deploy/kustomization.yaml the way ``kubectl apply -k`` does (its resources, its ConfigMap
generators, its namespace; it refuses any kustomize feature it does not model), validates every
object against the API schemas of Kubernetes (``kubernetes-validate``, offline, strict), and
checks the objects against the code: every command against the CLI, every ``SIDEGATE_*`` name
and value against the settings, ports and Service names against deploy/gateway.yaml, probes
against the gRPC services the sidecars register, selectors against pod labels, drain timings
against the compiled Envoy health checks, and deploy/envoy.yaml against the compiler.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from sidegate import cli, compiler, config, contract, devcerts, server
from sidegate.config import Gateway, HostPort
from sidegate.envoy_bin import envoy_binary
from sidegate.settings import ENV, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
GATEWAY = DEPLOY / "gateway.yaml"
BOOTSTRAP = DEPLOY / "envoy.yaml"
LISTEN_ADDRESS = "0.0.0.0"
# The oldest Kubernetes the manifests support (grpc probes, the preStop sleep action) and a recent one.
KUBERNETES_VERSIONS = ("1.30", "1.35")
# What the renderer below models; anything else in the kustomization would be silently ignored.
KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}
# Made by the operator, never committed: the certificate Envoy serves (see deploy/kustomization.yaml).
EXTERNAL_SECRETS = {"sidegate-tls"}
IMAGE = "sidegate"  # the repository name of the image built from ./Dockerfile
METRICS_PORT = 9464  # every Sidegate pod serves Prometheus metrics here, at /metrics
PLACEHOLDER = "CHANGE-ME"
SECRET_SETTINGS = ("key_pepper", "admin_token")
TLS_KEYS = {"tls.crt", "tls.key"}  # the keys of a kubernetes.io/tls Secret
ENVOY = "envoy"  # the Deployment, Service and container running Envoy
SETTING = re.compile(r"\bSIDEGATE_[A-Z0-9_]+\b")
PYTHONS = ("python", "python3")


# --- rendering ----------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(KUSTOMIZATION.read_text())
    return loaded


def _render() -> list[dict[str, Any]]:
    """deploy/kustomization.yaml → the objects ``kubectl apply -k deploy/`` would send.

    Generated ConfigMaps keep their plain name: kustomize appends a content hash and rewrites
    every reference to it, which changes no agreement checked here.
    """
    kustomization = _kustomization()
    unknown = set(kustomization) - KUSTOMIZE_KEYS
    assert not unknown, f"{KUSTOMIZATION.name}: {sorted(unknown)} not modelled by {Path(__file__).name}"
    namespace = kustomization.get("namespace")
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = DEPLOY / resource
        assert path.is_file(), f"{KUSTOMIZATION.name}: resource {resource} does not exist"
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator["files"]:
            key, _, source = entry.rpartition("=")
            path = DEPLOY / source
            assert path.is_file(), f"{KUSTOMIZATION.name}: configMapGenerator {generator['name']}: no {source}"
            data[key or PurePosixPath(source).name] = path.read_text()
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            declared = obj["metadata"].get("namespace", namespace)
            assert declared == namespace, f"{_name(obj)}: namespace {declared}, kustomization sets {namespace}"
            obj["metadata"]["namespace"] = namespace
    return objects


def _name(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _of(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def _labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"].get("labels", {})
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def _containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(Deployment name, pod spec, container) for every container of every Deployment."""
    for name, deployment in _of(objects, "Deployment").items():
        pod = _pod(deployment)
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield name, pod, container


def _ours(container: dict[str, Any]) -> bool:
    return str(container["image"]).rpartition(":")[0].rsplit("/", 1)[-1] == IMAGE


def _argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in container.get("command", []) + container.get("args", [])]


def _env(container: dict[str, Any]) -> dict[str, str]:
    """Literal values; a value taken from a Secret or ConfigMap reads as ``<from NAME/KEY>``."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            ref = var["valueFrom"].get("secretKeyRef") or var["valueFrom"].get("configMapKeyRef") or {}
            env[var["name"]] = f"<from {ref.get('name')}/{ref.get('key')}>"
    return env


def _port(container: dict[str, Any], name_or_number: int | str) -> int | None:
    """The container port a probe or a Service's targetPort names, if the container has it."""
    for port in container.get("ports", []):
        if name_or_number in (port.get("name"), port["containerPort"]):
            return int(port["containerPort"])
    return None


def _cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


@dataclass(frozen=True)
class Served:
    """A container running ``sidegate serve`` or ``sidegate echo``: what and where."""

    deployment: str
    container: dict[str, Any]
    pod: dict[str, Any]
    command: str
    sidecars: tuple[str, ...]
    settings: Settings | None  # serve only
    host: str
    port: int


def _parse(args: list[str], where: str) -> argparse.Namespace:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return cli.parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: the CLI rejects `sidegate {shlex.join(args)}`: {stderr.getvalue().strip()}")


def _sidegate_args(argv: list[str]) -> list[str] | None:
    """The ``sidegate`` CLI arguments ``argv`` amounts to; ``python -m authz …`` is ``serve --sidecars authz …``."""
    if argv[:1] == ["sidegate"]:
        return argv[1:]
    if argv[:1] and argv[0] in PYTHONS and argv[1:2] == ["-m"] and len(argv) > 2:
        if argv[2] == "sidegate":
            return argv[3:]
        if argv[2] in contract.SIDECARS:
            return ["serve", "--sidecars", argv[2], *argv[3:]]
    return None


def _served(objects: list[dict[str, Any]]) -> list[Served]:
    served = []
    for name, pod, container in _containers(objects):
        args = _sidegate_args(_argv(container))
        if args is None:
            continue
        parsed = _parse(args, f"Deployment/{name} container {container['name']}")
        if parsed.command == "serve":
            settings = Settings.from_env(_env(container), host=parsed.host, port=parsed.port, workers=parsed.workers)
            sidecars = tuple(s.strip() for s in parsed.sidecars.split(","))
            served.append(Served(name, container, pod, "serve", sidecars, settings, settings.host, settings.port))
        elif parsed.command == "echo":
            served.append(Served(name, container, pod, "echo", (), None, parsed.host, parsed.port))
    return served


def _sidecar(served: list[Served], kind: str) -> Served:
    hosts = [s for s in served if kind in s.sidecars]
    assert len(hosts) == 1, f"expected one Deployment serving {kind}, found {[s.deployment for s in hosts]}"
    return hosts[0]


def _service_for(objects: list[dict[str, Any]], address: HostPort) -> dict[str, Any]:
    """The Service a DNS address (``name``, ``name.namespace``, ``name.namespace.svc…``) resolves to."""
    name, _, rest = address.host.partition(".")
    service = _of(objects, "Service").get(name)
    assert service is not None, f"{address}: no Service named {name!r}"
    if rest:
        assert rest.split(".")[0] == service["metadata"]["namespace"], f"{address}: not the namespace of Service/{name}"
    return service


def _backends(objects: list[dict[str, Any]], service: dict[str, Any], port: int) -> list[tuple[str, int]]:
    """(Deployment, container port) behind ``port`` of ``service``: selected pods having the target port."""
    spec = service["spec"]
    [entry] = [p for p in spec["ports"] if p["port"] == port] or [None]
    assert entry is not None, f"{_name(service)}: no port {port}"
    target = entry.get("targetPort", port)
    found = []
    for name, deployment in _of(objects, "Deployment").items():
        if not _selects(spec.get("selector", {}), _labels(deployment)):
            continue
        for container in _pod(deployment)["containers"]:
            number = _port(container, target)
            if number is not None:
                found.append((name, number))
    return found


def _clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def _endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    out = []
    for group in cluster["load_assignment"]["endpoints"]:
        for lb in group["lb_endpoints"]:
            socket = lb["endpoint"]["address"]["socket_address"]
            out.append((str(socket["address"]), int(socket["port_value"])))
    return out


def _tls_files(node: object) -> set[str]:
    if isinstance(node, dict):
        own = {str(node["filename"])} if "filename" in node else set()
        return own.union(*(_tls_files(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_tls_files(v) for v in node))
    return set()


def _mount_source(pod: dict[str, Any], container: dict[str, Any], path: PurePosixPath) -> tuple[dict[str, Any], str]:
    """The volume holding ``path`` in ``container`` and the key (file name) inside it."""
    for mount in container.get("volumeMounts", []):
        root = PurePosixPath(mount["mountPath"])
        if path.is_relative_to(root) and path != root:
            assert "subPath" not in mount, f"{container['name']}: {root} is a subPath mount (it never updates)"
            [volume] = [v for v in pod.get("volumes", []) if v["name"] == mount["name"]]
            return volume, path.relative_to(root).as_posix()
    pytest.fail(f"container {container['name']}: nothing is mounted at {path}")


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return _render()


@pytest.fixture(scope="module")
def gateway() -> Gateway:
    return config.load(GATEWAY)


@pytest.fixture(scope="module")
def bootstrap() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(BOOTSTRAP.read_text())
    return loaded


@pytest.fixture(scope="module")
def served(objects: list[dict[str, Any]]) -> list[Served]:
    return _served(objects)


# --- the manifests as Kubernetes sees them -----------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = {DEPLOY / r for r in _kustomization()["resources"]}
    on_disk = set((DEPLOY / "base").glob("*.yaml"))
    assert on_disk <= listed, f"not in {KUSTOMIZATION.name}: {sorted(p.name for p in on_disk - listed)}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_matches_the_kubernetes_schema(objects: list[dict[str, Any]], version: str) -> None:
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{_name(obj)} (Kubernetes {version}): {exc.caused_by.message} at {list(exc.caused_by.path)}")
    assert {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= {
        o["kind"] for o in objects
    }


def test_schema_validation_rejects_a_misspelt_field(objects: list[dict[str, Any]]) -> None:
    """The strict schemas catch what a typo would silently turn off (here: a probe's service)."""
    deployment = copy.deepcopy(_of(objects, "Deployment")["authz"])
    probe = _pod(deployment)["containers"][0]["readinessProbe"]["grpc"]
    probe["servce"] = probe.pop("service")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_names_are_unique_and_everything_lives_in_the_declared_namespace(objects: list[dict[str, Any]]) -> None:
    names = [_name(o) for o in objects]
    assert len(names) == len(set(names)), f"duplicates: {sorted({n for n in names if names.count(n) > 1})}"
    namespaces = set(_of(objects, "Namespace"))
    assert namespaces == {_kustomization()["namespace"]}
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] in namespaces, _name(obj)


def test_every_reference_names_an_object_that_exists(objects: list[dict[str, Any]]) -> None:
    config_maps, secrets = set(_of(objects, "ConfigMap")), set(_of(objects, "Secret")) | EXTERNAL_SECRETS
    claims = set(_of(objects, "PersistentVolumeClaim"))
    for name, pod, container in _containers(objects):
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"Deployment/{name}: {volume}"
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, f"Deployment/{name}: {volume}"
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"Deployment/{name}: {volume}"
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"Deployment/{name}: mounts unknown volume {mount['name']}"
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret = _of(objects, "Secret").get(ref["name"])
                assert secret is not None, f"Deployment/{name}: {var['name']} from missing Secret {ref['name']}"
                assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {}), f"{var['name']}: {ref}"


def test_deployments_services_hpas_and_pdbs_select_what_exists(objects: list[dict[str, Any]]) -> None:
    deployments = _of(objects, "Deployment")
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert _selects(selector, _labels(deployment)), f"Deployment/{name}: selector {selector} misses its pods"
        others = [n for n, d in deployments.items() if n != name and _selects(selector, _labels(d))]
        assert not others, f"Deployment/{name}: its selector also matches {others}"
    for name, service in _of(objects, "Service").items():
        for port in service["spec"]["ports"]:
            backends = _backends(objects, service, port["port"])
            assert backends, f"Service/{name} port {port['port']}: no selected pod has {port.get('targetPort')}"
    autoscaled = set()
    for name, hpa in _of(objects, "HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["apiVersion"]) == ("Deployment", "apps/v1"), f"HPA/{name}: {target}"
        assert target["name"] in deployments, f"HPA/{name}: no Deployment {target['name']}"
        assert hpa["spec"]["minReplicas"] >= 2, f"HPA/{name}: one replica is no availability"
        [metric] = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu", f"HPA/{name}: scales on {metric}"
        autoscaled.add(target["name"])
    for name in autoscaled:
        # kubectl apply would reset the count the HPA chose to the manifest's.
        assert "replicas" not in deployments[name]["spec"], f"Deployment/{name}: has an HPA, so set no replicas"
    disrupted = set()
    for name, pdb in _of(objects, "PodDisruptionBudget").items():
        matched = [n for n, d in deployments.items() if _selects(pdb["spec"]["selector"]["matchLabels"], _labels(d))]
        assert len(matched) == 1, f"PDB/{name}: selects {matched}"
        disrupted.add(matched[0])
    expected = {*contract.SIDECARS, ENVOY}
    assert expected <= autoscaled, f"no HPA for {sorted(expected - autoscaled)}"
    assert expected <= disrupted, f"no PodDisruptionBudget for {sorted(expected - disrupted)}"


def test_pods_meet_the_restricted_pod_security_standard(objects: list[dict[str, Any]]) -> None:
    assert _of(objects, "Namespace")[_kustomization()["namespace"]]["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"
    ] == ("restricted")
    for name, pod, container in _containers(objects):
        where = f"Deployment/{name} container {container['name']}"
        pod_context, context = pod.get("securityContext", {}), container.get("securityContext", {})
        assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, where
        assert context.get("runAsUser", pod_context.get("runAsUser", 0)) != 0, where
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", where
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("capabilities", {}).get("drop") == ["ALL"], where
        assert context.get("readOnlyRootFilesystem") is True, where
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: no {kind} for cpu and memory"
        image = str(container["image"])
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in image or (tag and tag != "latest"), f"{where}: image {image} is not pinned"


def test_our_image_is_the_projects_version(objects: list[dict[str, Any]]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    ours = [c for _n, _p, c in _containers(objects) if _ours(c)]
    assert len(ours) >= 4, "expected the three sidecars and echo to run the image of ./Dockerfile"
    for container in ours:
        assert container["image"].rpartition(":")[2] == version, f"{container['name']}: {container['image']}"


# --- the manifests against the code ------------------------------------------------------


def test_every_command_of_our_image_is_accepted_by_the_cli(objects: list[dict[str, Any]], served: list[Served]) -> None:
    for name, _pod_spec, container in _containers(objects):
        if not _ours(container):
            continue
        args = _sidegate_args(_argv(container))
        assert args is not None, f"Deployment/{name}: {_argv(container)} does not run sidegate"
        parsed = _parse(args, f"Deployment/{name}")
        if parsed.command == "serve":
            unknown = set(parsed.sidecars.split(",")) - set(contract.SIDECARS)
            assert not unknown, f"Deployment/{name}: unknown sidecars {sorted(unknown)}"
    for kind in contract.SIDECARS:  # each sidecar in a Deployment of its own, so each scales alone
        assert _sidecar(served, kind).sidecars == (kind,)
    assert [s.deployment for s in served if s.command == "echo"] == ["echo"]


def test_every_sidegate_variable_is_a_known_setting_with_a_valid_value(objects: list[dict[str, Any]]) -> None:
    known = set(ENV.values())
    for path in [KUSTOMIZATION, *sorted((DEPLOY / "base").glob("*.yaml"))]:
        named = set(SETTING.findall(path.read_text()))
        assert named <= known, (
            f"{path.relative_to(ROOT)}: unknown settings {sorted(named - known)} (sidegate/settings.py)"
        )
    checked = 0
    for name, _pod_spec, container in _containers(objects):
        env = _env(container)
        for var in env:
            assert not var.startswith("SIDEGATE_") or var in known, f"Deployment/{name}: {var} is no setting"
        if any(var.startswith("SIDEGATE_") for var in env):
            Settings.from_env(env)  # raises SettingsError on a bad number or path
            checked += 1
    assert checked >= len(contract.SIDECARS)


def test_sidecars_listen_where_envoy_finds_them(
    objects: list[dict[str, Any]], served: list[Served], gateway: Gateway, bootstrap: dict[str, Any]
) -> None:
    clusters = _clusters(bootstrap)
    for kind in contract.SIDECARS:
        address = getattr(gateway.sidecars, kind).address
        host = _sidecar(served, kind)
        assert host.host in ("0.0.0.0", "::"), f"{kind}: listens on {host.host}, unreachable from Envoy's pods"
        assert host.port == address.port, f"{kind}: serves port {host.port}, gateway.yaml says {address}"
        assert _port(host.container, host.port) == host.port, f"{kind}: containerPort {host.port} not declared"
        service = _service_for(objects, address)
        # Headless: Envoy sees every pod, balances over them and ejects a draining one alone.
        assert service["spec"].get("clusterIP") == "None", f"Service/{service['metadata']['name']} is not headless"
        assert _backends(objects, service, address.port) == [(host.deployment, host.port)], (
            f"{address}: Service/{service['metadata']['name']} does not reach Deployment/{host.deployment}"
        )
        cluster = clusters[compiler.SIDECAR_CLUSTER[kind]]
        assert cluster["type"] == "STRICT_DNS", f"{kind}: Envoy resolves {address} once (type {cluster['type']})"
        assert _endpoints(cluster) == [(address.host, address.port)]


def test_echo_serves_the_echo_service(
    objects: list[dict[str, Any]], served: list[Served], gateway: Gateway, bootstrap: dict[str, Any]
) -> None:
    [echo] = [s for s in served if s.command == "echo"]
    [address] = gateway.services["echo"].endpoints
    assert echo.host == "0.0.0.0"
    assert echo.port == address.port
    service = _service_for(objects, address)
    assert service["spec"].get("clusterIP") == "None", "echo: Envoy health-checks and ejects pods; make it headless"
    assert _backends(objects, service, address.port) == [(echo.deployment, echo.port)]
    probe = echo.container["readinessProbe"]["httpGet"]
    assert probe["path"] == gateway.services["echo"].health_check.path  # type: ignore[union-attr]
    assert _port(echo.container, probe["port"]) == echo.port
    assert _endpoints(_clusters(bootstrap)["svc_echo"]) == [(address.host, address.port)]


def test_probes_check_the_grpc_service_each_sidecar_registers(served: list[Served], bootstrap: dict[str, Any]) -> None:
    clusters = _clusters(bootstrap)
    for kind in contract.SIDECARS:
        host = _sidecar(served, kind)
        name = server.sidecar(kind, Settings()).service
        assert name == contract.SIDECAR_GRPC_SERVICE[kind]
        [check] = clusters[compiler.SIDECAR_CLUSTER[kind]]["health_checks"]
        assert check["grpc_health_check"]["service_name"] == name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe == "startupProbe" and probe not in host.container:
                continue
            grpc = host.container[probe].get("grpc")
            assert grpc is not None, f"{kind}: {probe} is not a gRPC health check"
            assert grpc == {"port": host.port, "service": name}, f"{kind}: {probe} checks {grpc}"


def test_drain_outlasts_envoys_ejection_and_the_pod_outlasts_the_drain(
    served: list[Served], bootstrap: dict[str, Any]
) -> None:
    clusters = _clusters(bootstrap)
    for kind in contract.SIDECARS:
        host = _sidecar(served, kind)
        assert host.settings is not None
        [check] = clusters[compiler.SIDECAR_CLUSTER[kind]]["health_checks"]
        ejection = _seconds(check["interval"]) * check["unhealthy_threshold"]
        drain, grace = host.settings.drain, host.settings.grace
        assert drain > ejection, f"{kind}: drains {drain}s, Envoy needs {ejection}s to stop sending"
        period = host.pod["terminationGracePeriodSeconds"]
        assert period > drain + grace, f"{kind}: killed after {period}s, drain + grace = {drain + grace}s"
        liveness = host.container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain, f"{kind}: restarted while draining"


def test_workers_and_envoy_concurrency_match_the_cpu_limit(objects: list[dict[str, Any]], served: list[Served]) -> None:
    for kind in contract.SIDECARS:
        host = _sidecar(served, kind)
        assert host.settings is not None
        cores = _cores(str(host.container["resources"]["limits"]["cpu"]))
        assert host.settings.workers == cores, f"{kind}: {host.settings.workers} workers on {cores} CPUs"
    envoy = next(c for c in _pod(_of(objects, "Deployment")[ENVOY])["containers"] if c["name"] == ENVOY)
    argv = _argv(envoy)
    assert "--concurrency" in argv, "Envoy would start a worker per core of the node"
    assert int(argv[argv.index("--concurrency") + 1]) == _cores(str(envoy["resources"]["limits"]["cpu"]))


def test_config_maps_hold_deploy_gateway_yaml_where_the_sidecars_read_it(
    objects: list[dict[str, Any]], served: list[Served]
) -> None:
    config_maps = _of(objects, "ConfigMap")
    for host in served:
        if host.settings is None:
            continue
        assert host.settings.config is not None, f"{host.deployment}: SIDEGATE_CONFIG is not set"
        volume, key = _mount_source(host.pod, host.container, PurePosixPath(host.settings.config.as_posix()))
        assert "configMap" in volume, f"{host.deployment}: {host.settings.config} is not from a ConfigMap"
        assert config_maps[volume["configMap"]["name"]]["data"][key] == GATEWAY.read_text()


def test_envoy_runs_deploy_envoy_yaml(objects: list[dict[str, Any]]) -> None:
    deployment = _of(objects, "Deployment")[ENVOY]
    envoy = next(c for c in _pod(deployment)["containers"] if c["name"] == ENVOY)
    assert envoy["image"].startswith("envoyproxy/envoy:v1.40")
    argv = _argv(envoy)
    assert "--disable-hot-restart" in argv
    path = PurePosixPath(argv[argv.index("-c") + 1])
    volume, key = _mount_source(_pod(deployment), envoy, path)
    assert _of(objects, "ConfigMap")[volume["configMap"]["name"]]["data"][key] == BOOTSTRAP.read_text()


def test_deploy_envoy_yaml_is_compiled_from_deploy_gateway_yaml(gateway: Gateway, bootstrap: dict[str, Any]) -> None:
    compiled = compiler.compile_bootstrap(gateway, listen_address=LISTEN_ADDRESS)
    assert bootstrap == yaml.safe_load(yaml.safe_dump(compiled)), (
        f"{BOOTSTRAP.relative_to(ROOT)} is stale: make envoy-config"
    )
    header = BOOTSTRAP.read_text().splitlines()[0]
    assert f"--config {GATEWAY.relative_to(ROOT)} --listen-address {LISTEN_ADDRESS}" in header
    assert f"--output {BOOTSTRAP.relative_to(ROOT)}" in (ROOT / "Makefile").read_text()
    for listener in bootstrap["static_resources"]["listeners"]:
        assert listener["address"]["socket_address"]["address"] == LISTEN_ADDRESS, listener["name"]


def test_envoy_accepts_the_bootstrap(tmp_path: Path, bootstrap: dict[str, Any]) -> None:
    """``envoy --mode validate`` (binds nothing), with a development pair at the TLS paths."""
    devcerts.ensure(tmp_path / "tls")
    text = BOOTSTRAP.read_text()
    for name in _tls_files(bootstrap):
        stand_in = tmp_path / "tls" / ("server.key" if name.endswith(".key") else "server.crt")
        text = text.replace(name, str(stand_in))
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_serves_the_listeners_and_finds_its_tls_files(
    objects: list[dict[str, Any]], gateway: Gateway, bootstrap: dict[str, Any]
) -> None:
    deployment = _of(objects, "Deployment")[ENVOY]
    pod = _pod(deployment)
    envoy = next(c for c in pod["containers"] if c["name"] == ENVOY)
    service = _of(objects, "Service")[ENVOY]
    reached = {port for p in service["spec"]["ports"] for _d, port in _backends(objects, service, p["port"])}
    assert reached == {listener.port for listener in gateway.listeners}, f"Service/{ENVOY} reaches {reached}"
    for _name_, port in [(d, p) for p in service["spec"]["ports"] for d, p in _backends(objects, service, p["port"])]:
        assert _name_ == ENVOY, f"Service/{ENVOY} port {port} reaches Deployment/{_name_}"
    files = _tls_files(bootstrap)
    assert bool(files) == any(listener.tls for listener in gateway.listeners)
    for name in files:
        volume, key = _mount_source(pod, envoy, PurePosixPath(name))
        assert "secret" in volume, f"TLS file {name} is not from a Secret"
        assert key in TLS_KEYS, f"TLS file {name}: a kubernetes.io/tls Secret holds {sorted(TLS_KEYS)}"


def test_envoy_admin_stays_in_the_pod_and_only_its_stats_leave(objects: list[dict[str, Any]], gateway: Gateway) -> None:
    deployment = _of(objects, "Deployment")[ENVOY]
    pod = _pod(deployment)
    admin = gateway.admin
    for container in pod["containers"]:
        assert _port(container, admin.port) is None, f"{container['name']}: exposes Envoy's admin port {admin.port}"
    [proxy] = [c for c in pod["containers"] if c["name"] != ENVOY]
    volume, key = _mount_source(pod, proxy, PurePosixPath("/etc/nginx/conf.d/admin-proxy.conf"))
    conf = _of(objects, "ConfigMap")[volume["configMap"]["name"]]["data"][key]
    assert re.findall(r"^\s*listen\s+(\d+);", conf, re.MULTILINE) == [str(METRICS_PORT)]
    assert re.findall(r"proxy_pass\s+(\S+);", conf) == [f"http://{admin.address}:{admin.port}/stats/prometheus"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert _port(proxy, METRICS_PORT) == METRICS_PORT


def test_every_scraped_pod_declares_its_metrics_port(objects: list[dict[str, Any]], served: list[Served]) -> None:
    for name, deployment in _of(objects, "Deployment").items():
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        port = int(annotations["prometheus.io/port"])
        assert any(_port(c, port) for c in _pod(deployment)["containers"]), f"Deployment/{name}: no port {port}"
        assert annotations["prometheus.io/path"] == "/metrics"
    for kind in contract.SIDECARS:
        host = _sidecar(served, kind)
        assert host.settings is not None
        assert host.settings.metrics_port == METRICS_PORT, f"{kind}: metrics on {host.settings.metrics_port}"
        assert _port(host.container, METRICS_PORT) == METRICS_PORT, f"{kind}: containerPort {METRICS_PORT}"
        annotations = _of(objects, "Deployment")[host.deployment]["spec"]["template"]["metadata"]["annotations"]
        assert annotations.get("prometheus.io/scrape") == "true", f"{kind}: not scraped"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT), f"{kind}: scraped elsewhere"


def test_redis_url_names_the_redis_service_and_limits_know_the_replicas(
    objects: list[dict[str, Any]], served: list[Served], gateway: Gateway
) -> None:
    urls = {s.settings.redis_url for s in served if s.settings is not None and s.settings.redis_url}
    assert len(urls) == 1, f"the sidecars must share one Redis: {urls}"
    parts = urlsplit(urls.pop())
    assert parts.scheme in ("redis", "rediss"), parts
    assert parts.hostname, parts
    assert parts.port, parts
    service = _service_for(objects, HostPort.model_validate(f"{parts.hostname}:{parts.port}"))
    backends = _backends(objects, service, parts.port)
    assert len(backends) == 1, f"{parts.hostname}:{parts.port} reaches {backends}"
    for kind in ("authz", "ratelimit"):  # the key store and the counters
        host = _sidecar(served, kind)
        assert host.settings is not None
        assert host.settings.redis_url, f"{kind}: no SIDEGATE_REDIS_URL"
    # on_store_error local splits a limit by expected_replicas: it must be the replicas running.
    hpa = _of(objects, "HorizontalPodAutoscaler")[_sidecar(served, "ratelimit").deployment]
    assert gateway.ratelimit.expected_replicas == hpa["spec"]["minReplicas"]


def test_only_authz_gets_the_secrets_and_the_committed_ones_are_placeholders(
    objects: list[dict[str, Any]], served: list[Served]
) -> None:
    names = {ENV[s] for s in SECRET_SETTINGS}
    for name, _pod_spec, container in _containers(objects):
        for var in container.get("env", []):
            if var["name"] in names:
                assert "value" not in var, f"Deployment/{name}: {var['name']} is written in the manifest"
                assert name == _sidecar(served, "authz").deployment, f"Deployment/{name} gets {var['name']}"
    authz = _env(_sidecar(served, "authz").container)
    assert names <= set(authz), f"authz: needs {sorted(names - set(authz))} (else each pod makes its own)"
    for name, secret in _of(objects, "Secret").items():
        for key, value in (secret.get("stringData") or {}).items():
            assert str(value).startswith(PLACEHOLDER), f"Secret/{name}: {key} holds a real value; never commit one"
        assert not secret.get("data"), f"Secret/{name}: use stringData placeholders"


def test_key_admin_api_has_a_cluster_ip_service_and_no_route(
    objects: list[dict[str, Any]], served: list[Served], bootstrap: dict[str, Any]
) -> None:
    host = _sidecar(served, "authz")
    assert host.settings is not None
    port = host.settings.admin_port
    assert port, "authz: the key-management API is off"
    assert _port(host.container, port) == port, f"authz: containerPort {port} not declared"
    reaching = [
        s
        for s in _of(objects, "Service").values()
        for p in s["spec"]["ports"]
        if (host.deployment, port) in _backends(objects, s, p["port"])
    ]
    assert len(reaching) == 1, f"expected one Service for the admin API, found {[_name(s) for s in reaching]}"
    assert reaching[0]["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert reaching[0]["spec"].get("clusterIP") != "None"
    for cluster in _clusters(bootstrap).values():
        assert all(p != port for _h, p in _endpoints(cluster)), f"Envoy cluster {cluster['name']} reaches port {port}"
