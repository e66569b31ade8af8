"""gateway.yaml loading: every bad config pins its exact one-line error, good ones load frozen.

Each file in ``tests/bad_configs`` holds one problem and opens with ``# expect: LINE``, the full
error with the file name written as ``{file}`` (and literal braces doubled, as in ``str.format``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from bench import scale
from extproc import grpc_translate
from sidegate import config
from sidegate.config import positions
from sidegate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BAD_CONFIGS = ROOT / "tests" / "bad_configs"
EXAMPLE = ROOT / "examples" / "gateway.yaml"
EXPECT = "# expect: "

# One file per kind of check that produces the error, for the slower subprocess tests.
CLI_SAMPLES = (
    "yaml_syntax.yaml",  # the YAML parser
    "duplicate_key.yaml",  # the line-keeping composer
    "empty_file.yaml",  # no document
    "not_a_mapping.yaml",  # wrong top-level type
    "port_out_of_range.yaml",  # pydantic field validation
    "tls_cert_without_key.yaml",  # a model validator
    "unknown_service.yaml",  # the cross-reference checks
)


def bad_configs() -> list[Path]:
    files = sorted(BAD_CONFIGS.glob("*.yaml"))
    assert len(files) >= 20, f"expected the bad config folder at {BAD_CONFIGS}"
    return files


def expected_error(path: Path) -> str:
    """The ``# expect:`` line of a bad config, with ``{file}`` filled in as ``load`` names it."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(EXPECT), f"{path.name} must open with '{EXPECT}<the exact error>'"
    return first.removeprefix(EXPECT).format(file=str(path))


def load_error(path: Path | str) -> ConfigError:
    """What ``sidegate check`` reports: the model's problems, then extproc's gRPC check."""

    def check() -> None:
        gateway = config.load(path)
        config.verify(gateway, grpc_translate.problems(gateway))

    with pytest.raises(ConfigError) as info:
        check()
    return info.value


def parse_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.parse(text, "gw.yaml")
    return info.value


# --- the bad config folder ---------------------------------------------------------------


@pytest.mark.parametrize("path", bad_configs(), ids=lambda p: p.stem)
def test_bad_config_error_is_pinned(path: Path) -> None:
    err = load_error(path)
    assert str(err) == expected_error(path)
    assert err.errors == (str(err),), "each bad config holds exactly one problem"


# --- several errors, other failures ------------------------------------------------------

# Written in the reverse of the model's field order, so validation order != line order.
SEVERAL_ERRORS = """\
apis:
  - name: public
    match: {prefix: /public}
    service: echo
    timeout: soon
services:
  echo:
    endpoints: ["127.0.0.1:9080"]
    protocol: http3
listeners:
  - name: http
    port: 0
"""
SEVERAL_ERRORS_EXPECTED = (
    "{file}:5: apis[0].timeout: not a duration: 'soon' (use e.g. 250ms, 5s, 2m, 24h, 90d)",
    "{file}:9: services.echo.protocol: input should be 'http1', 'http2' or 'grpc'",
    "{file}:12: listeners[0].port: input should be greater than or equal to 1",
)


def test_several_errors_are_all_reported_sorted_by_line() -> None:
    err = parse_error(SEVERAL_ERRORS)
    assert err.errors == tuple(line.format(file="gw.yaml") for line in SEVERAL_ERRORS_EXPECTED)
    assert str(err) == err.errors[0]
    assert (err.file, err.line, err.path) == ("gw.yaml", 5, "apis[0].timeout")


def test_parse_names_gateway_yaml_by_default() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse("listeners:\n  - name: http\n    port: 8080\n    port: 8081\n")
    assert str(info.value) == "gateway.yaml:4: listeners[0].port: duplicate key"


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    assert str(load_error(missing)) == f"{missing}: cannot read: No such file or directory"


def test_unknown_yaml_tag_is_a_config_error() -> None:
    err = parse_error("listeners:\n  - name: http\n    port: !!python/object:os.system x\n")
    assert err.line == 3
    assert err.problem.startswith("not valid YAML: could not determine a constructor")


def test_yaml_merge_keys_are_supported() -> None:
    text = (
        "listeners: [{name: http, port: 8080}]\n"
        "services:\n"
        "  a: &svc {endpoints: ['127.0.0.1:1'], connect_timeout: 2s}\n"
        "  b: {<<: *svc, timeout: 3s}\n"
        "apis: [{name: x, match: {prefix: /x}, service: b}]\n"
    )
    gateway = config.parse(text)
    assert gateway.services["b"].connect_timeout == 2.0
    assert gateway.services["b"].timeout == 3.0


# --- the example and the model ------------------------------------------------------------


def test_example_gateway_loads() -> None:
    gateway = config.load(EXAMPLE)
    assert [(lst.name, lst.port, lst.tls is not None) for lst in gateway.listeners] == [
        ("https", 8443, True),
        ("http", 8080, False),
    ]
    assert [api.name for api in gateway.apis] == ["public", "orders", "catalog"]
    assert gateway.apis[0].auth.anonymous is True
    assert gateway.apis[1].auth.anonymous is False
    assert gateway.apis[0].match.methods == ("GET", "HEAD")
    assert gateway.sidecars.authz.timeout == pytest.approx(0.25)
    assert gateway.sidecars.ratelimit.failure_mode == "allow"
    echo = gateway.services["echo"]
    assert [str(ep) for ep in echo.endpoints] == ["127.0.0.1:9080"]
    assert echo.retries.attempts == 2
    assert echo.retries.per_try_timeout == 5.0
    assert gateway.api("orders") is gateway.apis[1]
    assert gateway.api("nope") is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("24h", 86400.0), ("90d", 7_776_000.0), ("1.5s", 1.5)],
)
def test_duration_parses(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5", "5x", "-1s", "", "ms", "5 s", 5, None])
def test_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"^not a duration: .* \(use e\.g\. 250ms, 5s, 2m, 24h, 90d\)$"):
        config.parse_duration(value)


@pytest.mark.parametrize(
    ("part", "field", "value"),
    [
        (lambda g: g, "apis", ()),
        (lambda g: g.listeners[0], "port", 1),
        (lambda g: g.apis[0].match, "prefix", "/other"),
        (lambda g: g.services["echo"], "timeout", 1.0),
        (lambda g: g.sidecars.authz, "failure_mode", "allow"),
        (lambda g: g.admin, "address", "0.0.0.0"),
    ],
    ids=["gateway", "listener", "match", "service", "sidecar", "admin"],
)
def test_models_are_frozen(part: Callable[[config.Gateway], object], field: str, value: object) -> None:
    gateway = config.load(EXAMPLE)
    target = part(gateway)
    before = getattr(target, field)
    with pytest.raises(ValidationError, match="frozen"):
        setattr(target, field, value)
    assert getattr(target, field) == before


def test_state_and_up_sections_are_defaults_that_the_environment_and_flags_override(tmp_path: Path) -> None:
    from sidegate.settings import Settings, from_gateway  # noqa: PLC0415 - only this test

    path = tmp_path / "conf" / "gateway.yaml"
    path.parent.mkdir()
    path.write_text(
        EXAMPLE.read_text()
        + "state: {dir: state, redis: 'redis://127.0.0.1:6390/0'}\n"
        + "up: {echo: '127.0.0.1:9180', key_admin_port: 9102, metrics_port: 0}\n"
    )
    gateway = config.load(path)
    assert str(gateway.up.echo) == "127.0.0.1:9180"
    from_file = Settings.from_env({}, base=from_gateway(gateway, up=True))
    assert (from_file.state_dir, from_file.redis_url) == (tmp_path / "conf" / "state", "redis://127.0.0.1:6390/0")
    assert (from_file.admin_port, from_file.metrics_port) == (9102, 0)
    assert Settings.from_env({}, base=from_gateway(gateway)).metrics_port == 0  # serve and keys: no up: section
    env = {"SIDEGATE_STATE_DIR": "/srv/state", "SIDEGATE_ADMIN_PORT": "9202"}
    from_env = Settings.from_env(env, base=from_gateway(gateway, up=True))
    assert (from_env.state_dir, from_env.admin_port) == (Path("/srv/state"), 9202)
    flagged = Settings.from_env(env, base=from_gateway(gateway, up=True), state_dir="/flag", redis_url="redis://x/1")
    assert (flagged.state_dir, flagged.redis_url) == (Path("/flag"), "redis://x/1")
    bare = config.load(EXAMPLE)
    assert Settings.from_env({}, base=from_gateway(bare, up=True)).metrics_port == 9464
    assert Settings.from_env({}, base=from_gateway(bare)).state_dir == Path(".sidegate")


# --- the fast reader ---------------------------------------------------------------------


def test_libyaml_events_read_plain_files_as_pyyaml_does() -> None:
    """The same data and lines from libyaml's events as from PyYAML's composer."""
    big = yaml.safe_dump(scale.gateway(5, 40), sort_keys=False)
    e2e = [path.read_text(encoding="utf-8") for path in (ROOT / "tests" / "e2e").glob("*.yaml")]
    for text in (EXAMPLE.read_text(encoding="utf-8"), big, *e2e):
        assert positions._fast(text) == positions._careful(text, "gw.yaml")


def test_anchors_merge_keys_and_tags_are_read_by_pyyaml() -> None:
    text = "base: &b {a: 1}\nother:\n  <<: *b\n  c: !!str 2\n"
    with pytest.raises(positions._UnusualError):
        positions._fast(text)
    data, lines = positions._compose(text, "gw.yaml")
    assert data == {"base": {"a": 1}, "other": {"a": 1, "c": "2"}}
    assert lines[("other", "c")] == 4
