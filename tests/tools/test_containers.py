"""The container files, checked without a Docker engine: Dockerfile, .dockerignore, docker-compose.yml.

This module owns the agreement between the containerised stack and the rest of the tree: the
compose file against the official Compose schema (``check-jsonschema``, offline); every
``sidegate`` command against the CLI's parser; every ``python -c`` one-liner against the modules
it names; every ``SIDEGATE_*`` variable against the settings; and the ports, addresses, mounts
and TLS paths against examples/gateway.yaml and the committed Envoy bootstrap, envoy/gateway.yaml.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import ipaddress
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from sidegate import cli, compiler, config, contract, devcerts, serving
from sidegate.config import Gateway, HostPort
from sidegate.settings import ENV, Settings
from tests.envoy_bootstrap import endpoints, tls_files

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BOOTSTRAP = ROOT / "envoy" / "compose.yaml"  # envoy/gateway.yaml with listeners on 0.0.0.0
LISTEN_ADDRESS = "0.0.0.0"
ENVOY = "envoy"
POD = "pod"  # the compose service whose network namespace the others share; it publishes the ports
PYTHONS = ("python", "python3")
SETTING = re.compile(r"\bSIDEGATE_[A-Z0-9_]+\b")


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def _instructions(text: str) -> list[Instruction]:
    """Dockerfile lines → instructions: comments dropped, ``\\`` continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return out


def _argv(form: str) -> list[str]:
    """The exec form (JSON) or the shell form of CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    return [str(a) for a in json.loads(form)] if form.startswith("[") else shlex.split(form)


def _last(instructions: list[Instruction], keyword: str) -> str | None:
    found = [i.args for i in instructions if i.keyword == keyword]
    return found[-1] if found else None


def _image_cmd(instructions: list[Instruction]) -> list[str]:
    cmd = _last(instructions, "CMD")
    assert cmd is not None, "Dockerfile: no CMD"
    return _argv(cmd)


def _image_healthcheck(instructions: list[Instruction]) -> list[str] | None:
    check = _last(instructions, "HEALTHCHECK")
    if check is None or check.upper() == "NONE":
        return None
    _options, _, command = re.split(r"(?:^|\s)(CMD)\s", check, maxsplit=1)
    return _argv(command.strip())


def _image_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in (i.args for i in instructions if i.keyword == "ENV"):
        words = shlex.split(args)
        if "=" not in words[0]:  # the legacy form: ENV NAME value with spaces
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def _image_user(instructions: list[Instruction]) -> str:
    return _last(instructions, "USER") or "root"


def _uid(user: str) -> str:
    uid = user.split(":", 1)[0]
    return "0" if uid == "root" else uid


def _copy_sources(instructions: list[Instruction]) -> list[str]:
    """Sources COPY/ADD take from the build context (not ``--from`` another stage)."""
    sources: list[str] = []
    for inst in instructions:
        if inst.keyword not in ("COPY", "ADD"):
            continue
        words = _argv(inst.args)
        if any(w.startswith("--from") for w in words):
            continue
        sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def _glob(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


# --- docker-compose.yml -------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    source: str
    target: PurePosixPath
    read_only: bool

    @property
    def bind(self) -> bool:
        return self.source.startswith((".", "/", "~"))


@dataclass(frozen=True)
class Served:
    """A long-running sidegate command in compose: what it serves and where.

    ``targets`` are the gRPC targets of a ``serve`` (each worker's ``unix:`` socket, or its
    port), as ``sidegate health`` computes them from the same flags and variables."""

    service: str
    command: str  # "serve" or "echo"
    sidecars: tuple[str, ...]
    address: HostPort | None  # echo's, or a serve's on TCP
    settings: Settings | None = None  # serve only
    targets: tuple[str, ...] = ()


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def _command(service: dict[str, Any], instructions: list[Instruction]) -> list[str]:
    """The argv a service runs: its own ``command``, else the image's CMD when built here."""
    if "command" in service:
        command = service["command"]
        return [str(a) for a in command] if isinstance(command, list) else shlex.split(command)
    return _image_cmd(instructions) if _built_here(service) else []


def _environment(service: dict[str, Any], instructions: list[Instruction]) -> dict[str, str]:
    env = _image_env(instructions) if _built_here(service) else {}
    raw = service.get("environment", {})
    pairs = raw.items() if isinstance(raw, dict) else (item.split("=", 1) for item in raw)
    env.update({str(k): str(v) for k, v in pairs})
    return env


def _built_here(service: dict[str, Any]) -> bool:
    """Whether the service runs the image of our Dockerfile: it builds it, or it runs the tag that
    another service builds and never pulls it."""
    build = service.get("build")
    if build is None:
        return service.get("pull_policy") == "never" and service.get("image") in _local_images()
    context, dockerfile = (
        (build, "Dockerfile")
        if isinstance(build, str)
        else (build.get("context", "."), build.get("dockerfile", "Dockerfile"))
    )
    return (COMPOSE.parent / context / dockerfile).resolve() == DOCKERFILE


def _local_images() -> set[str]:
    services = yaml.safe_load(COMPOSE.read_text())["services"].values()
    return {s["image"] for s in services if "build" in s and "image" in s}


def _user(service: dict[str, Any], instructions: list[Instruction]) -> str:
    return str(service.get("user") or (_image_user(instructions) if _built_here(service) else "root"))


def _healthcheck(service: dict[str, Any], instructions: list[Instruction]) -> list[str] | None:
    """The service's health probe argv: its own, else its image's (ours only); None if none."""
    check = service.get("healthcheck")
    if check is None:
        return _image_healthcheck(instructions) if _built_here(service) else None
    if check.get("disable"):
        return None
    test = check["test"]
    if isinstance(test, str):
        return shlex.split(test)
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    return None if test[0] == "NONE" else [str(a) for a in test[1:]]


def _mounts(service: dict[str, Any]) -> list[Mount]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append(
                Mount(str(volume["source"]), PurePosixPath(volume["target"]), bool(volume.get("read_only", False)))
            )
            continue
        source, target, *mode = str(volume).split(":")
        mounts.append(Mount(source, PurePosixPath(target), "ro" in ",".join(mode).split(",")))
    return mounts


def _repo_file(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file bind-mounted at ``container_path``, if any."""
    for mount in _mounts(service):
        if mount.bind and mount.target == PurePosixPath(container_path):
            return (COMPOSE.parent / mount.source).resolve()
    return None


def _published(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host IP or "", container port) for each published port."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((str(port.get("host_ip", "")), int(port["target"])))
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)
        out.append((parts[0].strip("[]") if len(parts) == 3 else "", int(parts[-1])))
    return out


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency → condition (the short list form means service_started)."""
    raw = service.get("depends_on", {})
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in raw.items()}


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return bool(tag) and tag != "latest"


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe_target(address: HostPort) -> str:
    """Where a probe inside the container reaches ``address``: a wildcard is reached on loopback."""
    host = "127.0.0.1" if address.host in ("0.0.0.0", "::") else address.host
    return str(HostPort.model_validate(f"{host}:{address.port}"))


# --- commands ------------------------------------------------------------------------------


def _sidegate_args(argv: list[str]) -> list[str] | None:
    """The CLI arguments when ``argv`` runs ``sidegate`` (or ``python -m sidegate``)."""
    if argv[:1] == ["sidegate"]:
        return argv[1:]
    if argv[:1] and argv[0] in PYTHONS and argv[1:3] == ["-m", "sidegate"]:
        return argv[3:]
    if argv[:1] and argv[0] in PYTHONS and argv[1:3] == ["-m", "sidegate.health"]:
        return ["health", *argv[3:]]  # the probe's light entry point: `sidegate health`'s code
    return None


def _python_code(argv: list[str]) -> str | None:
    return argv[2] if len(argv) > 2 and argv[0] in PYTHONS and argv[1] == "-c" else None


def _parse(args: list[str], where: str) -> argparse.Namespace:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return cli.parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: the CLI rejects `sidegate {shlex.join(args)}`: {stderr.getvalue().strip()}")


def _host_port(host: str, port: int) -> HostPort:
    return HostPort.model_validate(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def _serve_settings(args: argparse.Namespace, env: dict[str, str], repo_file: dict[str, Path]) -> Settings:
    """The settings a parsed ``serve`` or ``health`` runs with in its container, resolved by the
    CLI's own code: the gateway.yaml in the container (SIDEGATE_CONFIG) read from the repository
    file mounted or copied there (``repo_file``: container path → repository file)."""
    env = dict(env)
    container_config = env.get(ENV["config"])
    if container_config is not None:
        assert container_config in repo_file, f"{ENV['config']}={container_config}: no repository file is there"
        env[ENV["config"]] = str(repo_file[container_config])
    names = [n.strip() for n in args.sidecars.split(",")]
    return serving.serve_settings(args, names, env)


def _targets(settings: Settings) -> tuple[str, ...]:
    return tuple(serving.targets(settings))


def _all_commands(compose: dict[str, Any], instructions: list[Instruction]) -> list[tuple[str, list[str]]]:
    """(where, argv) for every command the image or compose runs, health probes included."""
    commands = [("Dockerfile CMD", _image_cmd(instructions))]
    image_probe = _image_healthcheck(instructions)
    if image_probe:
        commands.append(("Dockerfile HEALTHCHECK", image_probe))
    for name, service in _services(compose).items():
        if "command" in service:
            commands.append((f"compose {name}.command", _command(service, instructions)))
        probe = service.get("healthcheck") and _healthcheck(service, instructions)
        if probe:
            commands.append((f"compose {name}.healthcheck", probe))
    return commands


def _repo_files(service: dict[str, Any], instructions: list[Instruction]) -> dict[str, Path]:
    """Container path → repository file, for the files a service gets from the repository: those
    its image copies in (ours only), then those compose bind-mounts over them."""
    files = _image_files(instructions) if _built_here(service) else {}
    for mount in _mounts(service):
        if mount.bind:
            files[str(mount.target)] = (COMPOSE.parent / mount.source).resolve()
    return files


def _image_files(instructions: list[Instruction]) -> dict[str, Path]:
    """Container path → repository file for each single-file COPY of the final stage."""
    final = max(i for i, inst in enumerate(instructions) if inst.keyword == "FROM")
    files = {}
    for inst in instructions[final:]:
        if inst.keyword != "COPY":
            continue
        words = [w for w in _argv(inst.args) if not w.startswith("--")]
        if len(words) == 2 and (ROOT / words[0]).is_file():
            files[words[1]] = ROOT / words[0]
    return files


def _served_by(
    where: str, argv: list[str], env: dict[str, str], repo_file: dict[str, Path], name: str = ""
) -> Served | None:
    args = _sidegate_args(argv)
    if args is None:
        return None
    parsed = _parse(args, where)
    if parsed.command in ("serve", "health"):
        settings = _serve_settings(parsed, env, repo_file)
        address = None if settings.socket is not None else _host_port(settings.host, settings.port)
        sidecars = tuple(parsed.sidecars.split(","))
        return Served(name, parsed.command, sidecars, address, settings, _targets(settings))
    if parsed.command == "echo":
        return Served(name, parsed.command, (), _host_port(parsed.host, parsed.port))
    return None


def _served(compose: dict[str, Any], instructions: list[Instruction]) -> list[Served]:
    served = []
    for name, service in _services(compose).items():
        env, files = _environment(service, instructions), _repo_files(service, instructions)
        found = _served_by(f"compose {name}", _command(service, instructions), env, files, name)
        if found is not None and found.command in ("serve", "echo"):
            served.append(found)
    return served


def _unresolved(code: str) -> list[str]:
    """Names a ``python -c`` one-liner imports, or reads from what it imported, that do not exist."""
    tree = ast.parse(code)
    bound: dict[str, object] = {}
    missing: list[str] = []
    for node in ast.walk(tree):
        try:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module = importlib.import_module(alias.name)
                    top = alias.name.partition(".")[0]
                    bound[alias.asname or top] = module if alias.asname else importlib.import_module(top)
            elif isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        importlib.import_module(f"{node.module}.{alias.name}")
                    bound[alias.asname or alias.name] = getattr(module, alias.name)
        except (ImportError, AttributeError):
            missing.append(ast.unparse(node))
    for node in ast.walk(tree):
        chain = _dotted(node)
        if chain and chain[0] in bound:
            obj = bound[chain[0]]
            for attr in chain[1:]:
                if not hasattr(obj, attr):
                    missing.append(".".join(chain))
                    break
                obj = getattr(obj, attr)
    return missing


def _dotted(node: ast.AST) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) and parts else None


def _ensure_dir(code: str) -> str | None:
    """The directory a one-liner passes to ``devcerts.ensure``."""
    for node in ast.walk(ast.parse(code)):
        if (
            isinstance(node, ast.Call)
            and _dotted(node.func) == ["devcerts", "ensure"]
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            return str(node.args[0].value)
    return None


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # Compose's `${NAME:-default}` read as its default: what `docker compose up` does unset.
    text = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", COMPOSE.read_text())
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return _instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def sidecar_config(compose: dict[str, Any], dockerfile: list[Instruction]) -> Path:
    """The gateway.yaml the compose sidecars read: SIDEGATE_CONFIG, bind-mounted from the repo."""
    servers = [s.service for s in _served(compose, dockerfile) if s.command == "serve"]
    assert servers, "no compose service runs `sidegate serve`"
    service = _services(compose)[servers[0]]
    container_path = _environment(service, dockerfile).get(ENV["config"])
    assert container_path, f"compose {servers[0]}: {ENV['config']} is not set"
    path = _repo_file(service, container_path)
    assert path is not None, f"compose {servers[0]}: nothing from the repo is mounted at {container_path}"
    return path


@pytest.fixture(scope="module")
def gateway(sidecar_config: Path) -> Gateway:
    return config.load(sidecar_config)


# --- tests ----------------------------------------------------------------------------------


def test_compose_file_matches_the_official_compose_schema() -> None:
    tool = Path(sys.executable).parent / "check-jsonschema"
    assert tool.exists(), f"{tool} is missing: pip install check-jsonschema"
    result = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_image_is_built_from_our_dockerfile_or_pinned(
    compose: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    base = _last(dockerfile, "FROM")
    assert base is not None, "Dockerfile: no FROM"
    assert _pinned(base.split()[0]), f"Dockerfile: FROM {base} is not pinned"
    services = _services(compose)
    ours = {s["image"] for s in services.values() if "build" in s and "image" in s}
    for name, service in services.items():
        if "build" in service:
            assert _built_here(service), f"compose {name}: builds from something other than {DOCKERFILE.name}"
            continue
        image = service.get("image", "")
        if image in ours:
            assert service.get("pull_policy") == "never", f"compose {name}: {image} is only built here, never pull it"
            continue
        assert _pinned(image), f"compose {name}: image {image!r} is not pinned to a tag or digest"


def test_every_mount_from_the_repo_exists_and_is_read_only(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    checked = 0
    for name, service in _services(compose).items():
        for mount in _mounts(service):
            if not mount.bind:
                assert mount.source in declared, f"compose {name}: volume {mount.source!r} is not declared"
                continue
            path = (COMPOSE.parent / mount.source).resolve()
            assert path.exists(), f"compose {name}: mounts {mount.source}, which does not exist"
            assert mount.read_only, f"compose {name}: {mount.source} is mounted writable; add :ro"
            checked += 1
    assert checked >= 2, "expected the Envoy bootstrap and the gateway.yaml to be mounted from the repo"


def test_every_sidegate_command_is_accepted_by_the_cli(compose: dict[str, Any], dockerfile: list[Instruction]) -> None:
    seen = set()
    for where, argv in _all_commands(compose, dockerfile):
        args = _sidegate_args(argv)
        if args is None:
            continue
        parsed = _parse(args, where)
        if parsed.command == "serve":
            unknown = set(parsed.sidecars.split(",")) - set(contract.SIDECARS)
            assert not unknown, f"{where}: --sidecars names unknown sidecars {sorted(unknown)}"
        seen.add(where)
    assert {"Dockerfile CMD", "compose sidecars.command", "compose echo.command"} <= seen


def test_every_python_one_liner_names_what_exists(compose: dict[str, Any], dockerfile: list[Instruction]) -> None:
    snippets = [(where, code) for where, argv in _all_commands(compose, dockerfile) if (code := _python_code(argv))]
    assert any("devcerts" in code for _, code in snippets), "no one-liner makes the dev certificate"
    for where, code in snippets:
        assert not _unresolved(code), f"{where}: {code!r} names what does not exist: {_unresolved(code)}"


def test_every_sidegate_variable_is_a_known_setting() -> None:
    known = set(ENV.values())
    for path in (COMPOSE, DOCKERFILE):
        # `${SIDEGATE_PUBLISH:-…}` and the like are Compose's own interpolation (published ports),
        # read by `docker compose`, not by sidegate: they are not settings.
        text = path.read_text()
        named = set(SETTING.findall(text)) - set(re.findall(r"\$\{([A-Z0-9_]+)", text))
        assert named, f"{path.name}: names no SIDEGATE_* setting"
        assert named <= known, f"{path.name}: unknown settings {sorted(named - known)} (see sidegate/settings.py)"


def test_the_pod_publishes_exactly_the_listener_ports_on_loopback(compose: dict[str, Any], gateway: Gateway) -> None:
    services = _services(compose)
    for name, service in services.items():
        if name != POD and "grafana" not in name:
            assert not service.get("ports"), f"compose {name}: only {POD} publishes ports"
    listener_ports = set()
    for host_ip, port in _published(services[POD]):
        assert _loopback(host_ip), f"compose {POD}: port {port} is published beyond 127.0.0.1 by default"
        if port == gateway.admin.port:
            assert _loopback(host_ip), f"Envoy admin port {port} must not be published beyond 127.0.0.1"
            continue
        listener_ports.add(port)
    assert listener_ports == {listener.port for listener in gateway.listeners}


def _bootstrap_targets(cluster: dict[str, Any]) -> tuple[str, ...]:
    """The gRPC targets of an Envoy cluster's endpoints: ``unix:PATH`` for a pipe, else host:port."""
    return tuple(host if port == 0 else str(_host_port(host, port)) for host, port in endpoints(cluster))


def test_sidecars_serve_where_envoy_looks_for_them(compose: dict[str, Any], dockerfile: list[Instruction]) -> None:
    """Every worker socket of the sidecars' server is an endpoint of Envoy's cluster, and no
    other; the folder holding them is one volume, mounted in both containers at that path."""
    services = _services(compose)
    served = {kind: s for s in _served(compose, dockerfile) for kind in s.sidecars}
    clusters = {c["name"]: c for c in yaml.safe_load(BOOTSTRAP.read_text())["static_resources"]["clusters"]}
    for kind in contract.SIDECARS:
        assert kind in served, f"no compose service serves the {kind} sidecar"
        host = served[kind]
        expected = _bootstrap_targets(clusters[compiler.SIDECAR_CLUSTER[kind]])
        assert host.targets == expected, f"{kind}: compose {host.service} serves {host.targets}, Envoy calls {expected}"
        assert host.settings is not None
        assert host.settings.socket is not None, f"{kind}: served over TCP; compose runs the sidecars on sockets"
        assert host.settings.workers >= 2, f"{kind}: one worker: Envoy has nothing to balance"
        folder = PurePosixPath(host.settings.socket.parent.as_posix())
        theirs = {m.target: m.source for m in _mounts(services[host.service]) if not m.bind}
        ours = {m.target: m for m in _mounts(services[ENVOY]) if not m.bind}
        assert folder in theirs, f"compose {host.service}: its sockets' folder {folder} is not a volume"
        assert folder in ours, f"compose {ENVOY}: does not mount the sockets' folder {folder}"
        assert ours[folder].source == theirs[folder], f"{folder}: Envoy and {host.service} mount other volumes"
        # Sockets are made 0600 unless SIDEGATE_SOCKET_GROUP says otherwise: Envoy needs the same uid.
        if host.settings.socket_group is None:
            assert _uid(_user(services[ENVOY], dockerfile)) == _uid(_user(services[host.service], dockerfile))
        # Envoy's first health checks find the workers: it starts once the sidecars are healthy.
        assert _depends_on(services[ENVOY]).get(host.service) == "service_healthy"


def test_the_image_makes_the_sockets_folder_for_its_user(dockerfile: list[Instruction]) -> None:
    env = _image_env(dockerfile)
    folder = env.get(ENV["socket_dir"])
    assert folder, f"Dockerfile: no {ENV['socket_dir']}: the sockets would go in the state volume"
    uid = _uid(_image_user(dockerfile))
    made = chowned = False
    final = max(i for i, inst in enumerate(dockerfile) if inst.keyword == "FROM")
    for inst in dockerfile[final:]:
        if inst.keyword != "RUN":
            continue
        for command in inst.args.split("&&"):
            words = shlex.split(command)
            made |= words[:2] == ["mkdir", "-p"] and folder in words
            chowned |= words[:1] == ["chown"] and folder in words and words[1].split(":")[0] == uid
    assert made, f"Dockerfile: {folder} is not made"
    assert chowned, f"Dockerfile: {folder} is not owned by the image's user {uid}"


def test_echo_serves_the_echo_endpoint(
    compose: dict[str, Any], dockerfile: list[Instruction], gateway: Gateway
) -> None:
    echoes = [s for s in _served(compose, dockerfile) if s.command == "echo"]
    assert len(echoes) == 1, "expected one compose service running `sidegate echo`"
    endpoints = gateway.services["echo"].endpoints
    assert echoes[0].address in endpoints, f"echo serves {echoes[0].address}, Envoy calls {endpoints}"


def test_loopback_services_share_the_pods_network_namespace(
    compose: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    for served in _served(compose, dockerfile):
        if served.address is not None and _loopback(served.address.host):
            mode = _services(compose)[served.service].get("network_mode")
            assert mode == f"service:{POD}", (
                f"compose {served.service}: serves loopback, so needs network_mode service:{POD} (has {mode!r})"
            )
    for name in (ENVOY, *(s.service for s in _served(compose, dockerfile))):
        service = _services(compose)[name]
        assert service.get("network_mode") == f"service:{POD}", f"compose {name}: not in the {POD} namespace"
        # A restart of the namespace holder must restart what lives in it, or they keep the old one.
        assert service["depends_on"][POD].get("restart") is True, f"compose {name}: depends_on {POD} needs restart"


def test_envoy_runs_the_committed_bootstrap_of_the_sidecars_config(
    compose: dict[str, Any], dockerfile: list[Instruction], sidecar_config: Path
) -> None:
    envoy = _services(compose)[ENVOY]
    argv = _command(envoy, dockerfile)
    assert "--disable-hot-restart" in argv
    flag = next((f for f in ("-c", "--config-path") if f in argv), None)
    assert flag is not None, f"compose {ENVOY}: no -c in {argv}"
    container_path = argv[argv.index(flag) + 1]
    assert _repo_file(envoy, container_path) == BOOTSTRAP, f"compose {ENVOY}: {container_path} is not {BOOTSTRAP}"
    # The sidecars and Envoy must run the same policy: the bootstrap is compiled from their config.
    [sidecars] = [s for s in _served(compose, dockerfile) if s.command == "serve"]
    assert sidecars.settings is not None
    compiled = compiler.compile_bootstrap(
        config.load(sidecar_config), listen_address=LISTEN_ADDRESS, socket_dir=str(sidecars.settings.sockets)
    )
    assert yaml.safe_load(BOOTSTRAP.read_text()) == yaml.safe_load(yaml.safe_dump(compiled)), (
        f"{BOOTSTRAP.relative_to(ROOT)} is stale: make envoy-config"
    )
    # Docker forwards published ports to the container's own address, never to its loopback.
    for listener in yaml.safe_load(BOOTSTRAP.read_text())["static_resources"]["listeners"]:
        assert listener["address"]["socket_address"]["address"] == LISTEN_ADDRESS, listener["name"]


def test_envoy_finds_its_tls_files_where_the_certs_job_writes_them(
    compose: dict[str, Any], dockerfile: list[Instruction], gateway: Gateway, tmp_path: Path
) -> None:
    services = _services(compose)
    envoy = services[ENVOY]
    jobs = {
        n: d
        for n, s in services.items()
        if (code := _python_code(_command(s, dockerfile))) and (d := _ensure_dir(code))
    }
    assert len(jobs) == 1, f"expected one compose job calling devcerts.ensure, found {sorted(jobs)}"
    [(job, directory)] = jobs.items()
    assert _depends_on(envoy).get(job) == "service_completed_successfully"
    devcerts.ensure(tmp_path)
    written = {
        PurePosixPath(directory) / p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
    }
    files = tls_files(yaml.safe_load(BOOTSTRAP.read_text()))
    assert bool(files) == any(listener.tls for listener in gateway.listeners)
    for name in files:
        path = PurePosixPath(envoy.get("working_dir", "/")) / name
        mount = next((m for m in _mounts(envoy) if not m.bind and path.is_relative_to(m.target)), None)
        assert mount is not None, f"compose {ENVOY}: {path} (TLS file {name}) is on no volume"
        theirs = [m.target for m in _mounts(services[job]) if m.source == mount.source]
        assert theirs, f"compose {job}: does not mount volume {mount.source!r}"
        assert theirs[0] / path.relative_to(mount.target) in written, f"{job} does not write {name}"
    # The key is written 0600 by the job's user: Envoy must run as that uid to read it.
    assert _uid(_user(envoy, dockerfile)) == _uid(_user(services[job], dockerfile)) != "0"


def test_health_probes_check_the_address_each_service_serves(
    compose: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    """The image's HEALTHCHECK asks exactly the targets its CMD serves (every worker socket),
    resolved by the CLI from the same variables, in the image and in each compose service."""
    image_probe = _image_healthcheck(dockerfile)
    assert image_probe, "Dockerfile: no HEALTHCHECK"
    image_files = _image_files(dockerfile)
    cmd = _served_by("Dockerfile CMD", _image_cmd(dockerfile), _image_env(dockerfile), image_files)
    probe = _served_by("Dockerfile HEALTHCHECK", image_probe, _image_env(dockerfile), image_files)
    assert cmd is not None
    assert cmd.command == "serve", "Dockerfile: the CMD is not `sidegate serve`"
    assert probe is not None
    assert probe.command == "health", "Dockerfile: the HEALTHCHECK is not `python -m sidegate.health`"
    assert probe.targets == cmd.targets, f"Dockerfile: HEALTHCHECK asks {probe.targets}, CMD serves {cmd.targets}"
    assert set(probe.sidecars) == set(cmd.sidecars), "Dockerfile: HEALTHCHECK asks for other sidecars than CMD's"
    assert not _last(dockerfile, "EXPOSE"), "Dockerfile: EXPOSEs a port; the sidecars listen on sockets"
    for s in _served(compose, dockerfile):
        service = _services(compose)[s.service]
        argv = _healthcheck(service, dockerfile)
        assert argv, f"compose {s.service}: no health check"
        if s.command == "echo":
            assert s.address is not None
            assert _probe_target(s.address) in shlex.join(argv), f"compose {s.service}: probe misses {s.address}"
            continue
        env, files = _environment(service, dockerfile), _repo_files(service, dockerfile)
        checked = _served_by(f"compose {s.service}.healthcheck", argv, env, files, s.service)
        assert checked is not None
        assert checked.command == "health", f"compose {s.service}: probe is not sidegate health"
        assert checked.targets == s.targets, f"compose {s.service}: probe asks {checked.targets}, serves {s.targets}"


def test_every_healthy_dependency_has_a_health_check(compose: dict[str, Any], dockerfile: list[Instruction]) -> None:
    services = _services(compose)
    for name, service in services.items():
        for target, condition in _depends_on(service).items():
            assert target in services, f"compose {name}: depends on unknown service {target!r}"
            if condition == "service_healthy":
                assert _healthcheck(services[target], dockerfile), f"compose {target}: no health check"
        mode = str(service.get("network_mode", ""))
        if mode.startswith("service:"):
            assert mode.removeprefix("service:") in services, f"compose {name}: unknown {mode}"


def test_dockerfile_runs_as_a_non_root_user_with_a_health_check(
    compose: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    user = _image_user(dockerfile)
    assert _uid(user) != "0", f"Dockerfile: runs as {user}; add a USER that is not root"
    built = [s for s in _services(compose).values() if _built_here(s)]
    assert _image_healthcheck(dockerfile) or all(s.get("healthcheck") for s in built)


def test_dockerfile_copies_only_what_the_build_context_holds(dockerfile: list[Instruction]) -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    sources = _copy_sources(dockerfile)
    assert sources, "Dockerfile: copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile: COPY {source}: no such file"
        assert not _dockerignore_excludes(source, patterns), f"Dockerfile: COPY {source}: excluded by .dockerignore"
    for secret in (".sidegate/tls/server.key", ".venv/bin/python", ".git/config"):
        assert _dockerignore_excludes(secret, patterns), f".dockerignore: {secret} would reach the build context"
