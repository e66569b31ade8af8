"""The README's five-minute tour, run as written: ``sidegate up --config examples/gateway.yaml``
(on free ports, from a copy of the repository's example), then every line of the tour's ``sh``
block through bash, and each line's comment checked against what it printed.

A line added to the tour without an expectation here fails the test, so the tour cannot drift."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port
from tests.e2e.test_up import running_up

pytestmark = pytest.mark.e2e


def _tour() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A five-minute tour", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", section, re.S | re.M)
    assert block, "the tour has a sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _expectations() -> list[tuple[str, re.Pattern[str]]]:
    """What each tour line must print, in order: (what the README promises, a pattern)."""
    return [
        ("anonymous: straight through Envoy to the echo", re.compile(r'"path":\s*"/public/hello"')),
        ("needs credentials: 401 from authz", re.compile(r"^HTTP/1.1 401", re.M)),
        ("KEY holds a new key", re.compile(r"^\S{20,}$")),
        ("the echo shows x-consumer-id: acme", re.compile(r'"x-consumer-id":\s*"acme"')),
        ("version 1, served by v2, with Deprecation", re.compile(r"^deprecation: ", re.M | re.I)),
    ]


def _example_on_free_ports(folder: Path) -> dict[str, int]:
    """examples/gateway.yaml copied to ``folder/examples`` with each port moved to a free one."""
    data = yaml.safe_load((ROOT / "examples" / "gateway.yaml").read_text())
    ports = {"echo": free_port(), "admin": free_port(), "sidecars": free_port()}
    for listener in data["listeners"]:
        ports[listener["name"]] = listener["port"] = free_port()
    data["admin"]["port"] = ports["admin"]
    for sidecar in data.get("sidecars", {}).values():
        if not sidecar["address"].startswith("unix:"):
            sidecar["address"] = f"127.0.0.1:{ports['sidecars']}"
    data["services"]["echo"]["endpoints"] = [f"127.0.0.1:{ports['echo']}"]
    (folder / "examples").mkdir()
    (folder / "examples" / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return ports


def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    ports = _example_on_free_ports(tmp_path)
    (tmp_path / ".venv").symlink_to(sys.prefix)  # the tour calls .venv/bin/sidegate
    lines = _tour()
    expected = _expectations()
    assert len(lines) == len(expected), "each tour line needs an expectation in this test"
    http = f"127.0.0.1:{ports['http']}"
    # Each line's output goes to its own file; a { …; } group keeps KEY=$(…) in this shell.
    script = "".join(
        f"{{ {line.replace('127.0.0.1:8080', http)}\n}} >out-{n}.txt 2>&1\n" for n, line in enumerate(lines)
    )
    up = [str(Path(sys.prefix) / "bin" / "sidegate"), "up", "--config", "examples/gateway.yaml"]
    up += ["--echo", f"127.0.0.1:{ports['echo']}", "--workers", "1", "--admin-port", "0", "--metrics-port", "0"]
    with running_up(up, tmp_path / "up.out", cwd=tmp_path):
        result = subprocess.run(
            ["bash", "-c", f'set -euo pipefail\n{script}echo "$KEY" >key.txt'],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    key = (tmp_path / "key.txt").read_text().strip()
    for n, (line, (promise, pattern)) in enumerate(zip(lines, expected, strict=True)):
        output = key if line.startswith("KEY=") else (tmp_path / f"out-{n}.txt").read_text()
        assert pattern.search(output), f"README tour: {line!r} should show {promise}; it printed:\n{output[:2000]}"
    assert key not in (tmp_path / "up.out").read_text(), "the key reached sidegate up's log"
