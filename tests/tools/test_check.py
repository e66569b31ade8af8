"""``sidegate check`` and ``envoy --mode validate`` as subprocesses: what a person runs on a bad
config, and Envoy's own view of what the compiler writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidegate import compiler
from sidegate.config import Sidecars
from sidegate.envoy_bin import envoy_binary
from tests.unit.test_config import (
    BAD_CONFIGS,
    CLI_SAMPLES,
    ROOT,
    SEVERAL_ERRORS,
    SEVERAL_ERRORS_EXPECTED,
    expected_error,
)
from tests.unit.test_ratelimit_compiler import PLANS, api, gateway


def run_sidegate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidegate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", CLI_SAMPLES)
def test_check_prints_the_error_and_exits_2(name: str) -> None:
    path = BAD_CONFIGS / name
    result = run_sidegate("check", path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == expected_error(path) + "\n"
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_prints_every_error_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(SEVERAL_ERRORS)
    result = run_sidegate("check", path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [line.format(file=path) for line in SEVERAL_ERRORS_EXPECTED]


def test_envoy_accepts_every_kind_of_rate_limit_action(tmp_path: Path) -> None:
    gw = gateway(
        [
            api(
                "orders",
                {"by": "consumer", "requests": 1, "window": "1s"},
                {"by": "ip", "requests": 1, "window": "1s"},
                {"by": "global", "requests": 1, "window": "1s"},
            ),
            api("public", {"by": "ip", "requests": 1, "window": "1s"}, anonymous=True),
        ],
        plans=PLANS,
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(compiler.render(gw, source="test"))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"configuration '{path}' OK" in result.stdout + result.stderr


SECRETS_CONFIG = """\
listeners: [{name: http, port: 8080}]
services: {echo: {endpoints: ["127.0.0.1:9080"]}}
issuers:
  corp:
    issuer: https://idp.example.com
    audiences: [orders-api]
    algorithms: [HS256]
    shared_secret_env: SIDEGATE_TEST_UNSET_HMAC
    introspection:
      {endpoint: "https://idp.example.com/introspect", client_id: sg, client_secret_env: SIDEGATE_TEST_UNSET_CLIENT}
apis: [{name: orders, match: {prefix: /orders}, service: echo, auth: {jwt: [corp]}}]
"""


def test_check_warns_about_every_secret_variable_that_is_unset(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(SECRETS_CONFIG)
    result = run_sidegate("check", path)
    assert result.returncode == 0, result.stderr  # a warning: the file itself is good
    assert result.stderr.splitlines() == [
        f"{path}: warning: issuers.corp.shared_secret_env: environment variable SIDEGATE_TEST_UNSET_HMAC is not set"
        " (the sidecars will not start without it)",
        f"{path}: warning: issuers.corp.introspection.client_secret_env: environment variable"
        " SIDEGATE_TEST_UNSET_CLIENT is not set (the sidecars will not start without it)",
    ]


def test_envoy_validates_sidecars_on_unix_sockets(tmp_path: Path) -> None:
    unix = {"address": "unix:sidecars.sock", "workers": 2}
    gw = gateway([api("orders", {"by": "consumer", "requests": 1, "window": "1s"})], plans=PLANS)
    sidecars = Sidecars.model_validate(dict.fromkeys(("authz", "ratelimit", "extproc"), unix))
    gw = gw.model_copy(update={"sidecars": sidecars})
    path = tmp_path / "envoy.yaml"
    path.write_text(compiler.render(gw, source="test", state_dir=str(tmp_path)))
    assert f"{tmp_path}/sidecars-1.sock" in path.read_text()
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
