"""Pinned API versions through real Envoy: a consumer's key carries its version (authz sets the
pin header and Envoy re-matches the route); an explicit version in the request wins; only authz
sets pins."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.e2e.conftest import Gateway
from tests.e2e.test_versions import upstream


def _key(versions: Gateway, *args: str) -> str:
    argv = [
        sys.executable,
        "-m",
        "sidegate",
        "keys",
        "--config",
        str(versions.stack.config_path),
        "--state-dir",
        str(versions.stack.state_dir),
        "create",
        "--consumer",
        "acme",
        *args,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_pinned_consumer_gets_its_version_unless_it_asks_for_another(versions: Gateway, client: httpx.Client) -> None:
    pinned = _key(versions, "--version", "2025-01-01")
    unpinned = _key(versions)
    as_pinned = client.get("/accounts/1", headers={"x-partner-key": pinned})
    assert upstream(as_pinned) == ("/legacy/accounts/1", "2025-01-01")
    assert upstream(client.get("/accounts/1", headers={"x-partner-key": unpinned})) == ("/accounts/1", "2026-02-01")
    asked = client.get("/accounts/1", headers={"x-partner-key": pinned, "api-version": "2026-02-01"})
    assert upstream(asked) == ("/accounts/1", "2026-02-01")
    forged = client.get("/accounts/1", headers={"x-partner-key": unpinned, "x-sidegate-version": "2025-01-01"})
    assert upstream(forged) == ("/accounts/1", "2026-02-01")  # only authz sets pins
