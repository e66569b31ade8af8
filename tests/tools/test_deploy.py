"""The Kubernetes manifests of deploy/, checked without a cluster, in both layouts: ``pod``
(deploy/: the sidecars as a container in Envoy's pod, on Unix sockets in a shared emptyDir) and
``tcp`` (deploy/tcp/: a Deployment per sidecar over TCP, behind a NetworkPolicy).

This module owns the agreement between deploy/ and the rest of the tree. It renders each
kustomization.yaml the way ``kubectl apply -k`` does (its resources, its ConfigMap
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

from sidegate import cli, compiler, config, contract, devcerts, server, serving
from sidegate.config import Gateway, HostPort
from sidegate.envoy_bin import envoy_binary
from sidegate.settings import ENV, Settings, socket_gid
from tests.envoy_bootstrap import endpoints, tls_files

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Each layout is a kustomization folder holding its gateway.yaml and the envoy.yaml compiled from it.
LAYOUTS = {"pod": DEPLOY, "tcp": DEPLOY / "tcp"}
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
SIDECAR_METRICS = "sidecar-metrics"  # the sidecars' port in Envoy's pod, where admin-proxy has METRICS_PORT
PLACEHOLDER = "CHANGE-ME"
SECRET_SETTINGS = ("key_pepper", "admin_token")
TLS_KEYS = {"tls.crt", "tls.key"}  # the keys of a kubernetes.io/tls Secret
ENVOY = "envoy"  # the Deployment, Service and container running Envoy
SETTING = re.compile(r"\bSIDEGATE_[A-Z0-9_]+\b")
PYTHONS = ("python", "python3")


# --- rendering ----------------------------------------------------------------------------


def _kustomization(root: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((root / "kustomization.yaml").read_text())
    return loaded


def _render(root: Path) -> list[dict[str, Any]]:
    """``root``/kustomization.yaml → the objects ``kubectl apply -k root`` would send. A resource
    that is a folder is a kustomization of its own, rendered the same way.

    Generated ConfigMaps keep their plain name: kustomize appends a content hash and rewrites
    every reference to it, which changes no agreement checked here.
    """
    kustomization = _kustomization(root)
    where = (root / "kustomization.yaml").relative_to(ROOT)
    unknown = set(kustomization) - KUSTOMIZE_KEYS
    assert not unknown, f"{where}: {sorted(unknown)} not modelled by {Path(__file__).name}"
    namespace = kustomization.get("namespace")
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (root / resource).resolve()
        if path.is_dir():
            objects += _render(path)
            continue
        assert path.is_file(), f"{where}: resource {resource} does not exist"
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator["files"]:
            key, _, source = entry.rpartition("=")
            path = root / source
            assert path.is_file(), f"{where}: configMapGenerator {generator['name']}: no {source}"
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
        if argv[2] == "sidegate.health":  # the probe's light entry point: `sidegate health`'s code
            return ["health", *argv[3:]]
        if argv[2] in contract.SIDECARS:
            return ["serve", "--sidecars", argv[2], *argv[3:]]
    return None


def _serve_settings(args: argparse.Namespace, env: dict[str, str], gateway_file: Path) -> Settings:
    """The settings a parsed ``serve`` or ``health`` runs with in its container, resolved by the
    CLI's own code, reading ``gateway_file`` where the container reads SIDEGATE_CONFIG
    (``test_config_maps_hold_gateway_yaml_where_the_sidecars_read_it`` checks that it does)."""
    env = {**env, ENV["config"]: str(gateway_file)} if ENV["config"] in env else env
    return serving.serve_settings(args, [s.strip() for s in args.sidecars.split(",")], env)


def _served(objects: list[dict[str, Any]], gateway_file: Path) -> list[Served]:
    served = []
    for name, pod, container in _containers(objects):
        args = _sidegate_args(_argv(container))
        if args is None:
            continue
        parsed = _parse(args, f"Deployment/{name} container {container['name']}")
        if parsed.command == "serve":
            settings = _serve_settings(parsed, _env(container), gateway_file)
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
        for container in _running(_pod(deployment)):
            number = _port(container, target)
            if number is not None:
                found.append((name, number))
    return found


def _running(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers that run as long as the pod: its containers and its native sidecars (init
    containers with restartPolicy Always)."""
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    containers: list[dict[str, Any]] = pod["containers"]
    return sidecars + containers


def _clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


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


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> str:
    """Which layout a test checks: every test runs on both unless it names one (``indirect``)."""
    return str(request.param)


@pytest.fixture(scope="module")
def root(layout: str) -> Path:
    return LAYOUTS[layout]


@pytest.fixture(scope="module")
def objects(root: Path) -> list[dict[str, Any]]:
    return _render(root)


@pytest.fixture(scope="module")
def gateway(root: Path) -> Gateway:
    return config.load(root / "gateway.yaml")


@pytest.fixture(scope="module")
def bootstrap(root: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((root / "envoy.yaml").read_text())
    return loaded


@pytest.fixture(scope="module")
def served(objects: list[dict[str, Any]], root: Path) -> list[Served]:
    return _served(objects, root / "gateway.yaml")


TCP_ONLY = pytest.mark.parametrize("layout", ["tcp"], indirect=True)
POD_ONLY = pytest.mark.parametrize("layout", ["pod"], indirect=True)


# --- the manifests as Kubernetes sees them -----------------------------------------------


def test_every_manifest_is_in_a_layout() -> None:
    """Every manifest under deploy/ (not the policy, its compiled bootstrap or a kustomization)
    is a resource of one of the layouts, or of the base both include."""
    folders = (*LAYOUTS.values(), DEPLOY / "base")
    listed = {(folder / r).resolve() for folder in folders for r in _kustomization(folder)["resources"]}
    policy = {"gateway.yaml", "envoy.yaml", "kustomization.yaml"}
    manifests = {p.resolve() for folder in folders for p in folder.glob("*.yaml") if p.name not in policy}
    missing = sorted(str(p.relative_to(ROOT)) for p in manifests - listed)
    assert not missing, f"in no kustomization: {missing}"


def test_the_layouts_share_one_policy_but_for_the_sidecars() -> None:
    """deploy/tcp/gateway.yaml is deploy/gateway.yaml with other sidecar addresses: the same APIs,
    plans and limits whichever layout runs them."""
    pod, tcp = (yaml.safe_load((root / "gateway.yaml").read_text()) for root in LAYOUTS.values())
    assert {k: v for k, v in pod.items() if k != "sidecars"} == {k: v for k, v in tcp.items() if k != "sidecars"}
    for kind in contract.SIDECARS:
        assert {k: v for k, v in pod["sidecars"][kind].items() if k not in ("address", "workers")} == {
            k: v for k, v in tcp["sidecars"][kind].items() if k not in ("address", "workers")
        }, f"{kind}: the layouts give it other timeouts or failure modes"


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


@TCP_ONLY
def test_schema_validation_rejects_a_misspelt_field(objects: list[dict[str, Any]]) -> None:
    """The strict schemas catch what a typo would silently turn off (here: a probe's service)."""
    deployment = copy.deepcopy(_of(objects, "Deployment")["authz"])
    probe = _pod(deployment)["containers"][0]["readinessProbe"]["grpc"]
    probe["servce"] = probe.pop("service")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_names_are_unique_and_everything_lives_in_the_declared_namespace(
    objects: list[dict[str, Any]], root: Path
) -> None:
    names = [_name(o) for o in objects]
    assert len(names) == len(set(names)), f"duplicates: {sorted({n for n in names if names.count(n) > 1})}"
    namespaces = set(_of(objects, "Namespace"))
    assert namespaces == {_kustomization(root)["namespace"]}
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


def test_deployments_services_hpas_and_pdbs_select_what_exists(
    objects: list[dict[str, Any]], served: list[Served]
) -> None:
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
    expected = {_sidecar(served, kind).deployment for kind in contract.SIDECARS} | {ENVOY}
    assert expected <= autoscaled, f"no HPA for {sorted(expected - autoscaled)}"
    assert expected <= disrupted, f"no PodDisruptionBudget for {sorted(expected - disrupted)}"


def test_pods_meet_the_restricted_pod_security_standard(objects: list[dict[str, Any]], root: Path) -> None:
    assert _of(objects, "Namespace")[_kustomization(root)["namespace"]]["metadata"]["labels"][
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
    assert len(ours) >= 2, "expected the sidecars and echo to run the image of ./Dockerfile"
    for container in ours:
        assert container["image"].rpartition(":")[2] == version, f"{container['name']}: {container['image']}"


# --- the manifests against the code ------------------------------------------------------


def test_every_command_of_our_image_is_accepted_by_the_cli(
    objects: list[dict[str, Any]], served: list[Served], layout: str
) -> None:
    for name, _pod_spec, container in _containers(objects):
        if not _ours(container):
            continue
        args = _sidegate_args(_argv(container))
        assert args is not None, f"Deployment/{name}: {_argv(container)} does not run sidegate"
        parsed = _parse(args, f"Deployment/{name}")
        if parsed.command == "serve":
            unknown = set(parsed.sidecars.split(",")) - set(contract.SIDECARS)
            assert not unknown, f"Deployment/{name}: unknown sidecars {sorted(unknown)}"
    for kind in contract.SIDECARS:
        if layout == "tcp":  # each sidecar in a Deployment of its own, so each scales alone
            assert _sidecar(served, kind).sidecars == (kind,)
        else:  # one server for the three, in Envoy's pod
            assert (_sidecar(served, kind).deployment, _sidecar(served, kind).sidecars) == (ENVOY, contract.SIDECARS)
    assert [s.deployment for s in served if s.command == "echo"] == ["echo"]


def test_every_sidegate_variable_is_a_known_setting_with_a_valid_value(
    objects: list[dict[str, Any]], root: Path, served: list[Served]
) -> None:
    known = set(ENV.values())
    for path in [*sorted(root.glob("*.yaml")), *sorted((DEPLOY / "base").glob("*.yaml"))]:
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
    assert checked >= len({_sidecar(served, kind).container["name"] for kind in contract.SIDECARS})


@TCP_ONLY
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
        assert endpoints(cluster) == [(address.host, address.port)]


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
    assert endpoints(_clusters(bootstrap)["svc_echo"]) == [(address.host, address.port)]


@TCP_ONLY
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


@TCP_ONLY
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


def test_config_maps_hold_gateway_yaml_where_the_sidecars_read_it(
    objects: list[dict[str, Any]], served: list[Served], root: Path
) -> None:
    config_maps = _of(objects, "ConfigMap")
    for host in served:
        if host.settings is None:
            continue
        container_path = _env(host.container).get(ENV["config"])
        assert container_path is not None, f"{host.deployment}: SIDEGATE_CONFIG is not set"
        volume, key = _mount_source(host.pod, host.container, PurePosixPath(container_path))
        assert "configMap" in volume, f"{host.deployment}: {container_path} is not from a ConfigMap"
        assert config_maps[volume["configMap"]["name"]]["data"][key] == (root / "gateway.yaml").read_text()


def test_envoy_runs_the_compiled_envoy_yaml(objects: list[dict[str, Any]], root: Path) -> None:
    deployment = _of(objects, "Deployment")[ENVOY]
    envoy = next(c for c in _pod(deployment)["containers"] if c["name"] == ENVOY)
    assert envoy["image"].startswith("envoyproxy/envoy:v1.40")
    argv = _argv(envoy)
    assert "--disable-hot-restart" in argv
    path = PurePosixPath(argv[argv.index("-c") + 1])
    volume, key = _mount_source(_pod(deployment), envoy, path)
    assert _of(objects, "ConfigMap")[volume["configMap"]["name"]]["data"][key] == (root / "envoy.yaml").read_text()


def test_envoy_yaml_is_compiled_from_gateway_yaml(gateway: Gateway, bootstrap: dict[str, Any], root: Path) -> None:
    policy, compiled_file = (root / "gateway.yaml").relative_to(ROOT), (root / "envoy.yaml").relative_to(ROOT)
    compiled = compiler.compile_bootstrap(gateway, listen_address=LISTEN_ADDRESS)
    assert bootstrap == yaml.safe_load(yaml.safe_dump(compiled)), f"{compiled_file} is stale: make envoy-config"
    header = (root / "envoy.yaml").read_text().splitlines()[0]
    assert f"--config {policy} --listen-address {LISTEN_ADDRESS}" in header
    assert (
        f"--config {policy} --listen-address {LISTEN_ADDRESS} --output {compiled_file}"
        in (ROOT / "Makefile").read_text()
    )
    for listener in bootstrap["static_resources"]["listeners"]:
        assert listener["address"]["socket_address"]["address"] == LISTEN_ADDRESS, listener["name"]


def test_envoy_accepts_the_bootstrap(tmp_path: Path, bootstrap: dict[str, Any], root: Path) -> None:
    """``envoy --mode validate`` (binds nothing), with a development pair at the TLS paths."""
    devcerts.ensure(tmp_path / "tls")
    text = (root / "envoy.yaml").read_text()
    for name in tls_files(bootstrap):
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


def test_envoy_serves_the_listeners_and_finds_itstls_files(
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
    files = tls_files(bootstrap)
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
        if host.deployment == ENVOY:
            # In Envoy's pod, whose admin-proxy has METRICS_PORT: a port of their own, named for a
            # second scrape (ops/prometheus/prometheus.yml says how).
            port = host.settings.metrics_port
            assert port, f"{kind}: no metrics"
            assert port != METRICS_PORT, f"{kind}: metrics on {port}, which the pod's admin-proxy has"
            assert _port(host.container, SIDECAR_METRICS) == port, f"{kind}: no port {SIDECAR_METRICS} = {port}"
            others = [c for c in _running(host.pod) if c is not host.container]
            assert not any(_port(c, port) for c in others), f"{kind}: port {port} is another container's too"
            continue
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
                host = _sidecar(served, "authz")
                assert (name, container["name"]) == (host.deployment, host.container["name"]), (
                    f"Deployment/{name} container {container['name']} gets {var['name']}"
                )
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
        assert all(p != port for _h, p in endpoints(cluster)), f"Envoy cluster {cluster['name']} reaches port {port}"


# --- the default layout: the sidecars in Envoy's pod, on Unix sockets ---------------------


def _envoy_container(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == ENVOY)


def _pipe_targets(bootstrap: dict[str, Any], kind: str) -> list[str]:
    return [host for host, _port in endpoints(_clusters(bootstrap)[compiler.SIDECAR_CLUSTER[kind]])]


@POD_ONLY
def test_sidecars_in_envoys_pod_serve_the_sockets_envoy_lists(served: list[Served], bootstrap: dict[str, Any]) -> None:
    """One server for the three sidecars, in Envoy's pod, listening on exactly the worker sockets
    Envoy's clusters list, in an emptyDir both containers mount at the same path."""
    for kind in contract.SIDECARS:
        host = _sidecar(served, kind)
        assert host.settings is not None
        assert host.deployment == ENVOY, f"{kind}: not in Envoy's pod"
        targets = serving.targets(host.settings)
        assert targets == _pipe_targets(bootstrap, kind), f"{kind}: serves {targets}, Envoy calls another set"
        assert len(targets) >= 2, f"{kind}: one worker: Envoy has nothing to balance"
        assert host.settings.socket is not None
        folder = PurePosixPath(host.settings.socket.parent.as_posix())
        envoy = _envoy_container(host.pod)
        theirs, _ = _mount_source(host.pod, host.container, folder / "x.sock")
        ours, _ = _mount_source(host.pod, envoy, folder / "x.sock")
        assert theirs is ours, f"{folder}: Envoy and the sidecars mount other volumes"
        assert "emptyDir" in theirs, f"{folder}: not an emptyDir of the pod"
        mounts = {m["mountPath"]: m for m in envoy["volumeMounts"]}
        assert mounts[str(folder)].get("readOnly") is True, "Envoy only connects: mount the sockets read-only"


@POD_ONLY
def test_envoy_of_another_user_may_connect_through_the_socket_group(served: list[Served]) -> None:
    """Envoy (101) and the sidecars (10001) run as different users: the sockets are 0660 and
    given the pod's fsGroup, which Kubernetes adds to every container's groups."""
    host = _sidecar(served, "authz")
    assert host.settings is not None
    pod_context = host.pod["securityContext"]
    envoy = _envoy_container(host.pod)

    def uid(container: dict[str, Any]) -> int:
        return int(container.get("securityContext", {}).get("runAsUser", pod_context.get("runAsUser", 0)))

    assert uid(envoy) != uid(host.container), "same user: drop SIDEGATE_SOCKET_GROUP, 0600 serves"
    assert host.settings.socket_group is not None, "Envoy runs as another user: set SIDEGATE_SOCKET_GROUP"
    assert socket_gid(host.settings.socket_group) == pod_context.get("fsGroup"), (
        f"the sockets' group {host.settings.socket_group} is not the pod's fsGroup {pod_context.get('fsGroup')}"
    )


@POD_ONLY
def test_the_sidecars_start_before_envoy_and_stop_after_it(served: list[Served]) -> None:
    """A native sidecar container: Envoy starts once the sidecars' startup probe passes, and on
    termination they get SIGTERM only after Envoy has exited, then finish their calls in flight."""
    host = _sidecar(served, "authz")
    assert host.settings is not None
    assert host.container in host.pod.get("initContainers", []), "the sidecars are not an init container"
    assert host.container.get("restartPolicy") == "Always", "an init container without restartPolicy Always exits"
    assert "startupProbe" in host.container, "without a startup probe Envoy starts before the sidecars serve"
    envoy = _envoy_container(host.pod)
    pre_stop = envoy["lifecycle"]["preStop"]["sleep"]["seconds"]
    period = host.pod["terminationGracePeriodSeconds"]
    assert period > pre_stop + host.settings.grace, (
        f"killed after {period}s; Envoy's preStop {pre_stop}s + the sidecars' grace {host.settings.grace}s"
    )


@POD_ONLY
def test_the_sidecars_probes_ask_every_worker_socket(served: list[Served], root: Path) -> None:
    """kubelet's gRPC probes reach TCP ports only: the probes run `sidegate health`, which the
    CLI resolves from the same variables to the same worker sockets, for every sidecar served."""
    host = _sidecar(served, "authz")
    assert host.settings is not None
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        argv = [str(a) for a in host.container[probe]["exec"]["command"]]
        args = _sidegate_args(argv)
        assert args is not None, f"sidecars: {probe} does not run sidegate"
        parsed = _parse(args, f"sidecars {probe}")
        assert parsed.command == "health", f"sidecars: {probe} runs sidegate {parsed.command}"
        checked = _serve_settings(parsed, _env(host.container), root / "gateway.yaml")
        assert serving.targets(checked) == serving.targets(host.settings), f"sidecars: {probe} asks other targets"
        assert set(parsed.sidecars.split(",")) == set(host.sidecars), f"sidecars: {probe} asks for other sidecars"


# --- the TCP layout: a Deployment per sidecar, only Envoy's pods admitted ------------------


def _admits(rule: dict[str, Any], port: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether an ingress ``rule`` lets a pod with ``labels`` (in this namespace) reach ``port``
    (a container port: its name and number)."""
    ports = rule.get("ports")
    if ports is not None and not any(p.get("port") in (port.get("name"), port["containerPort"]) for p in ports):
        return False
    sources = rule.get("from")
    if sources is None:
        return True
    for source in sources:
        if "ipBlock" in source or "podSelector" not in source:
            return True  # addresses, or whole namespaces: treat as open
        # A pod selector (with or without a namespace selector): pods with those labels.
        if _selects(source["podSelector"].get("matchLabels", {}), labels) or source["podSelector"] == {}:
            return True
    return False


@TCP_ONLY
def test_only_envoys_pods_may_reach_the_sidecars_grpc_port(objects: list[dict[str, Any]], served: list[Served]) -> None:
    """On the pod network a NetworkPolicy selects every sidecar pod, and its rules admit only
    Envoy's pods to the gRPC port Envoy calls; every other Deployment's pods are refused."""
    policies = list(_of(objects, "NetworkPolicy").values())
    deployments = _of(objects, "Deployment")
    for kind in contract.SIDECARS:
        host = _sidecar(served, kind)
        labels = _labels(deployments[host.deployment])
        selecting = [
            p
            for p in policies
            if _selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        ]
        assert selecting, f"{kind}: no NetworkPolicy selects its pods, so any pod may call it"
        [grpc] = [p for p in host.container["ports"] if p["containerPort"] == host.port]
        rules = [rule for p in selecting for rule in p["spec"].get("ingress", [])]
        for name, deployment in deployments.items():
            admitted = any(_admits(rule, grpc, _labels(deployment)) for rule in rules)
            assert admitted == (name == ENVOY), f"{kind}: Deployment/{name} {'may' if admitted else 'may not'} call it"
        # A mesh service whose sidecar Envoy calls authz or ratelimit carries the label that
        # `sidegate mesh inject` adds (tests/tools/test_mesh_deploy.py), in any namespace.
        assert any(_admits(rule, grpc, {contract.SIDECAR_CALLER_LABEL: "true"}) for rule in rules)
        # Prometheus and the key-management API still reach their ports.
        for named in ("metrics", "admin"):
            port = next((p for p in host.container["ports"] if p.get("name") == named), None)
            if port is not None:
                other = {"app.kubernetes.io/name": "prometheus"}  # a pod of this namespace that is not Envoy
                assert any(_admits(rule, port, other) for rule in rules), f"{kind}: the policy shuts its {named} port"
