"""Where `sidegate serve` (and `sidegate health`, its probe) listens: by default where gateway.yaml
tells Envoy to find the sidecars it serves, so a server started with the same file and variables
serves exactly the endpoints of the compiled Envoy config."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidegate import cli, compiler, config, serving
from sidegate.errors import SettingsError
from sidegate.settings import Settings

BASE = """\
listeners: [{name: http, port: 8080}]
services: {echo: {endpoints: ["127.0.0.1:9080"]}}
apis: [{name: public, match: {prefix: /public}, service: echo, auth: {anonymous: true}}]
"""


def _gateway(tmp_path: Path, sidecars: str = "") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(BASE + sidecars)
    return path


def _settings(path: Path, *argv: str, environ: dict[str, str] | None = None, sidecars: str = "authz") -> Settings:
    args = cli.parser().parse_args(["serve", "--sidecars", sidecars, "--config", str(path), *argv])
    return serving.serve_settings(args, sidecars.split(","), environ or {})


def _pipes(path: Path, state_dir: str, socket_dir: str | None = None) -> list[str]:
    bootstrap = compiler.compile_bootstrap(config.load(path), state_dir=state_dir, socket_dir=socket_dir)
    [authz] = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "sidegate_authz"]
    return [
        f"unix:{ep['endpoint']['address']['pipe']['path']}"
        for ep in authz["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]


def test_with_no_sidecars_section_serve_listens_on_the_socket_the_gateway_compiles_to(tmp_path: Path) -> None:
    """No `sidecars:` means unix:sidecars.sock in the state folder: serve goes there, not to TCP 9001."""
    path = _gateway(tmp_path)
    state = tmp_path / "state"
    settings = _settings(path, "--state-dir", str(state), "--workers", "1")
    assert settings.socket == state / "sidecars.sock"
    assert serving.targets(settings) == _pipes(path, str(state))


def test_serve_follows_the_workers_and_the_socket_dir(tmp_path: Path) -> None:
    path = _gateway(tmp_path, 'sidecars: {authz: {address: "unix:sidecars.sock", workers: 3}}\n')
    environ = {"SIDEGATE_SOCKET_DIR": "/run/sidegate", "SIDEGATE_STATE_DIR": str(tmp_path)}
    settings = _settings(path, environ=environ)
    assert serving.targets(settings) == _pipes(path, str(tmp_path), "/run/sidegate")
    assert settings.workers == 3
    # SIDEGATE_WORKERS still overrides it (Envoy then lists sockets nobody serves, or misses some).
    assert _settings(path, environ={**environ, "SIDEGATE_WORKERS": "1"}).workers == 1


def test_serve_follows_a_tcp_address(tmp_path: Path) -> None:
    path = _gateway(tmp_path, 'sidecars: {authz: {address: "127.0.0.2:9301"}}\n')
    settings = _settings(path)
    assert (settings.socket, settings.host, settings.port) == (None, "127.0.0.2", 9301)


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["--port", "9401"], {}, ("127.0.0.1", 9401, None)),
        ([], {"SIDEGATE_PORT": "9402"}, ("127.0.0.1", 9402, None)),
        (["--socket", "/tmp/x.sock"], {}, ("127.0.0.1", 9001, Path("/tmp/x.sock"))),
    ],
    ids=["port flag", "port variable", "socket flag"],
)
def test_a_flag_or_variable_saying_where_wins_over_the_gateway(
    tmp_path: Path, argv: list[str], environ: dict[str, str], expected: tuple[str, int, Path | None]
) -> None:
    settings = _settings(_gateway(tmp_path), *argv, environ=environ)
    assert (settings.host, settings.port, settings.socket) == expected


def test_a_host_alone_says_which_interface_not_where(tmp_path: Path) -> None:
    """SIDEGATE_HOST with sockets is where the key-admin API and metrics listen (a pod's address);
    with a TCP address it replaces the gateway's host, not its port."""
    settings = _settings(_gateway(tmp_path), "--host", "0.0.0.0", "--state-dir", str(tmp_path))
    assert (settings.socket, settings.host) == (tmp_path / "sidecars.sock", "0.0.0.0")
    tcp = _gateway(tmp_path, 'sidecars: {authz: {address: "authz.internal:9301"}}\n')
    settings = _settings(tcp, environ={"SIDEGATE_HOST": "0.0.0.0"})
    assert (settings.socket, settings.host, settings.port) == (None, "0.0.0.0", 9301)


def test_sidecars_at_different_addresses_cannot_share_one_server(tmp_path: Path) -> None:
    path = _gateway(tmp_path, 'sidecars: {authz: {address: "127.0.0.1:9001"}, ratelimit: {address: "unix:rl.sock"}}\n')
    with pytest.raises(SettingsError, match=r"^gateway.yaml gives authz, ratelimit different addresses"):
        _settings(path, sidecars="authz,ratelimit")
    assert _settings(path, "--port", "9001", sidecars="authz,ratelimit").port == 9001


def test_an_unknown_socket_group_is_a_bad_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"SIDEGATE_SOCKET_GROUP / --socket-group: no group 'no-such-group-x'"):
        _settings(_gateway(tmp_path), "--socket-group", "no-such-group-x")
    assert _settings(_gateway(tmp_path), "--socket-group", "4242").socket_group == "4242"
