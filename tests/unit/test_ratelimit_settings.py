"""The reference's environment (ratelimit/settings.py), `sidegate ratelimit`'s settings
(ratelimit/cli.py), the config folder's listing and the reference keys the parser now takes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from ratelimit import cli, reference
from ratelimit import settings as rs
from ratelimit.limiter import ReferenceOptions
from sidegate import server
from sidegate.cli import main, parser
from sidegate.cli.up import Stack
from sidegate.errors import ConfigError, SettingsError
from sidegate.settings import Settings


def test_reference_env_defaults_are_the_references() -> None:
    env = rs.reference_env({})
    assert env.folder == Path("/srv/runtime_data/current/config")
    assert (env.redis_url, env.port, env.host, env.over_limit_cache) == (None, 8081, None, False)
    assert env.options == ReferenceOptions()


def test_reference_env_reads_the_references_variables_with_their_meanings() -> None:
    env = rs.reference_env(
        {
            "RUNTIME_ROOT": "/data/current",
            "RUNTIME_SUBDIRECTORY": "ratelimit",
            "RUNTIME_IGNOREDOTFILES": "true",
            "REDIS_SOCKET_TYPE": "tcp",
            "REDIS_URL": "redis.local:6380",
            "REDIS_AUTH": "user:p@ss",
            "GRPC_HOST": "0.0.0.0",
            "GRPC_PORT": "9999",
            "LOG_LEVEL": "warn",
            "LOCAL_CACHE_SIZE_IN_BYTES": "1048576",
            "LIMIT_RESPONSE_HEADERS_ENABLED": "true",
            "LIMIT_RESET_HEADER": "X-RateLimit-Reset",
            "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT": "true",
            "SHADOW_MODE": "false",
            "USE_STATSD": "false",  # the README's own example command sets it
            "REDIS_POOL_SIZE": "10",
        }
    )
    assert env.folder == Path("/data/current/ratelimit/config")
    assert env.ignore_dotfiles
    assert env.redis_url == "redis://user:p%40ss@redis.local:6380"
    assert (env.host, env.port, env.log_level, env.over_limit_cache) == ("0.0.0.0", 9999, "warning", True)
    assert env.options == ReferenceOptions(headers=True, reset_header="X-RateLimit-Reset", stop_increment=True)


@pytest.mark.parametrize(
    ("environ", "url"),
    [
        ({"REDIS_URL": "127.0.0.1:6379"}, "redis://127.0.0.1:6379"),
        ({"REDIS_URL": "/var/run/redis.sock", "REDIS_SOCKET_TYPE": "unix"}, "unix:///var/run/redis.sock"),
        ({"REDIS_URL": "a:7000,b:7001", "REDIS_TYPE": "CLUSTER"}, "redis://a:7000"),
        ({"REDIS_URL": "h:1", "REDIS_TLS": "true", "REDIS_AUTH": "secret"}, "rediss://:secret@h:1"),
        ({"REDIS_URL": "redis://h:1/2"}, "redis://h:1/2"),
    ],
)
def test_redis_url_as_the_reference_takes_it(environ: dict[str, str], url: str) -> None:
    assert rs.redis_url(environ) == url


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"REDIS_URL": "localhost"}, "REDIS_URL='localhost': not host:port"),
        ({"REDIS_URL": "h:1", "REDIS_TYPE": "sentinel"}, "REDIS_TYPE='sentinel' is not supported here"),
        ({"USE_STATSD": "true"}, "USE_STATSD='true' is not supported here: metrics are Prometheus only"),
        ({"BACKEND_TYPE": "memcache"}, "BACKEND_TYPE='memcache' is not supported here"),
        ({"CONFIG_TYPE": "GRPC_XDS_SOTW"}, "CONFIG_TYPE='GRPC_XDS_SOTW' is not supported here"),
        ({"MERGE_DOMAIN_CONFIG": "true"}, "MERGE_DOMAIN_CONFIG='true' is not supported here"),
        ({"REDIS_PERSECOND": "true"}, "REDIS_PERSECOND='true' is not supported here"),
        ({"CACHE_KEY_PREFIX": "app:"}, "CACHE_KEY_PREFIX='app:' is not supported here"),
        ({"GRPC_PORT": "http"}, "GRPC_PORT='http': not a whole number"),
        ({"SHADOW_MODE": "maybe"}, "SHADOW_MODE='maybe': not true or false"),
        ({"LOG_LEVEL": "trace"}, "LOG_LEVEL='trace': use debug, info, warn or error"),
    ],
)
def test_what_we_do_not_provide_is_refused_by_name_in_one_line(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        rs.reference_env(environ)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_variables_at_their_accepted_value_pass() -> None:
    environ = {name: accepted for name, (accepted, _why) in rs.REFUSED.items()}
    assert rs.refused(environ) is None
    assert rs.refused(dict.fromkeys(rs.TUNING, "5")) is None


def args(*argv: str) -> argparse.Namespace:
    return parser().parse_args(["ratelimit", *argv])


def test_sidegate_ratelimit_on_a_folder_takes_the_references_port_and_one_worker(tmp_path: Path) -> None:
    base = Settings.from_env({})
    settings = cli.settings_for(args("--reference-config", str(tmp_path)), base, {})
    assert (settings.reference_config, settings.port, settings.workers, settings.config) == (tmp_path, 8081, 1, None)
    flagged = cli.settings_for(args("--reference-config", str(tmp_path), "--port", "7000"), base, {"GRPC_PORT": "9"})
    assert flagged.port == 7000
    redis = cli.settings_for(
        args("--reference-config", str(tmp_path), "--workers", "2"),
        Settings.from_env({}, workers=2),
        {"REDIS_URL": "h:1"},
    )
    assert (redis.redis_url, redis.workers) == ("redis://h:1", 2)


def test_the_folder_can_come_from_runtime_root(tmp_path: Path) -> None:
    (tmp_path / "rl" / "config").mkdir(parents=True)
    environ = {"RUNTIME_ROOT": str(tmp_path), "RUNTIME_SUBDIRECTORY": "rl"}
    settings = cli.settings_for(args(), Settings.from_env({}), environ)
    assert settings.reference_config == tmp_path / "rl" / "config"


def test_memory_counters_refuse_more_than_one_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*_: object) -> int:
        raise AssertionError("the server must not start")

    monkeypatch.setattr(server, "run", never)
    with pytest.raises(SettingsError) as info:
        cli.settings_for(
            args("--reference-config", str(tmp_path), "--workers", "2"), Settings.from_env({}, workers=2), {}
        )
    assert str(info.value).startswith("--workers 2 with rate-limit counters in memory")
    gateway = Path(__file__).resolve().parents[2] / "examples" / "gateway.yaml"
    assert main(["serve", "--config", str(gateway), "--workers", "2"]) == 2
    assert "with rate-limit counters in memory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("--reference-config", "/nonexistent/folder"),
            "sidegate: --reference-config /nonexistent/folder: not a folder\n",
        ),
        ((), "sidegate: nothing to serve: give --reference-config DIR (or RUNTIME_ROOT), or --config FILE\n"),
    ],
)
def test_bad_starts_are_one_line(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RUNTIME_ROOT", "SIDEGATE_CONFIG", "SIDEGATE_REFERENCE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert main(["ratelimit", *argv]) == 2
    assert capsys.readouterr().err == message


def test_folder_files_lists_the_tree_resolved_and_follows_a_symlink_swap(tmp_path: Path) -> None:
    for version in ("v1", "v2"):
        (tmp_path / version / "config" / "nested").mkdir(parents=True)
        (tmp_path / version / "config" / "a.yaml").write_text("domain: a\n")
        (tmp_path / version / "config" / "nested" / "b.yml").write_text("domain: b\n")
        (tmp_path / version / "config" / ".hidden.yaml").write_text("domain: h\n")
        (tmp_path / version / "config" / "notes.txt").write_text("not config\n")
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v1")
    folder = current / "config"
    v1 = tmp_path.resolve() / "v1" / "config"
    assert reference.folder_files(folder) == [v1 / ".hidden.yaml", v1 / "a.yaml", v1 / "nested" / "b.yml"]
    assert reference.folder_files(folder, ignore_dotfiles=True) == [v1 / "a.yaml", v1 / "nested" / "b.yml"]
    swap = tmp_path / "swap"
    swap.symlink_to(tmp_path / "v2")
    os.replace(swap, current)  # how the reference's runtime publishes a new config
    assert reference.folder_files(folder, ignore_dotfiles=True)[0] == tmp_path.resolve() / "v2" / "config" / "a.yaml"
    assert reference.folder_files(tmp_path / "missing") == []


def test_the_newer_reference_keys_parse_and_quota_mode_is_refused_by_name(tmp_path: Path) -> None:
    domain, root = reference.parse(
        "domain: d\ndescriptors:\n  - key: k\n    value: 'a*b'\n    share_threshold: true\n"
        "    value_to_metric: true\n    metadata: {team: x}\n    rate_limit: {unit: second, requests_per_unit: 1}\n"
        "  - key: plain\n    share_threshold: true\n",
        "d.yaml",
    )
    node = root.children[("k", "a*b")]
    assert (domain, node.share, node.value_to_metric) == ("d", True, True)
    assert root.children[("plain", None)].share is False  # share_threshold only means something on a wildcard
    path = tmp_path / "q.yaml"
    path.write_text(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n      quota_mode: true\n"
    )
    with pytest.raises(ConfigError) as info:
        reference.load([path])
    assert str(info.value) == f"{path}:6: descriptors[0].rate_limit.quota_mode: {reference.QUOTA_MODE}"


def test_sidegate_up_gives_a_server_counting_limits_in_memory_one_worker(tmp_path: Path) -> None:
    """examples/gateway.yaml has limits: without Redis its sidecar server runs one worker. (Its
    sidecars on TCP here: on sockets the stack also sets the gateway's workers to match.)"""
    example = (Path(__file__).resolve().parents[2] / "examples" / "gateway.yaml").read_text()
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text(example.replace('"unix:sidecars.sock", workers: 2', '"127.0.0.1:9001"'))
    assert "unix:" not in gateway.read_text()
    everything = ["authz", "ratelimit", "extproc"]
    memory = Stack(gateway, Settings(workers=2, state_dir=tmp_path))
    assert (memory._workers(everything), memory._workers(["authz", "extproc"])) == (1, 2)
    shared = Stack(gateway, Settings(workers=2, state_dir=tmp_path, redis_url="redis://127.0.0.1:1/0"))
    assert shared._workers(everything) == 2
