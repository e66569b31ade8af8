"""Hot reload: changed files are read again; a bad one keeps the limits in force and says where."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from ratelimit.limiter import Limiter
from ratelimit.limits import Descriptor, Request
from ratelimit.reload import LimitsFiles
from ratelimit.store import MemoryStore
from sidegate import config
from sidegate.errors import ConfigError

GATEWAY = """\
listeners: [{{name: http, port: 8080}}]
services: {{echo: {{endpoints: ["127.0.0.1:9080"]}}}}
ratelimit:
  reference_configs: [limits/edge.yaml]
apis:
  - name: public
    match: {{prefix: /public}}
    service: echo
    auth: {{anonymous: true}}
    limits: [{{by: ip, requests: {requests}, window: 1m}}]
"""
EDGE = """\
domain: edge
descriptors:
  - key: user
    rate_limit: {{unit: minute, requests_per_unit: {requests}}}
"""


def write(path: Path, text: str) -> None:
    """Write and move the mtime on, so a change within one clock tick is still seen."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "limits").mkdir()
    gateway, edge = tmp_path / "gateway.yaml", tmp_path / "limits" / "edge.yaml"
    write(gateway, GATEWAY.format(requests=2))
    write(edge, EDGE.format(requests=1))
    return gateway, edge


def admitted(limiter: Limiter, domain: str, entries: tuple[tuple[str, str], ...], tries: int = 5) -> int:
    async def go() -> int:
        req = Request(domain, (Descriptor(entries),))
        return sum([(await limiter.decide(req)).ok for _ in range(tries)])

    return asyncio.run(go())


PUBLIC = (("api", "public"), ("remote_address", "10.0.0.1"), ("method", "GET"))


def loaded(gateway: Path) -> tuple[LimitsFiles, Limiter]:
    files = LimitsFiles(gateway, config.load(gateway))
    _gw, limits = files.load()
    return files, Limiter(limits, MemoryStore(), lambda: 1_700_000_000.0)


def test_reference_configs_are_read_relative_to_gateway_yaml(files: tuple[Path, Path]) -> None:
    _files, limiter = loaded(files[0])
    assert admitted(limiter, "sidegate", PUBLIC) == 2
    assert admitted(limiter, "edge", (("user", "u"),)) == 1


def test_a_changed_file_is_reloaded(files: tuple[Path, Path]) -> None:
    gateway, edge = files
    watched, limiter = loaded(gateway)
    assert not watched.changed()
    write(edge, EDGE.format(requests=3))
    write(gateway, GATEWAY.format(requests=4))
    assert watched.changed()
    assert watched.reload(limiter, "test")
    assert not watched.changed()
    assert admitted(limiter, "edge", (("user", "v"),)) == 3
    assert admitted(limiter, "sidegate", (*PUBLIC[:1], ("remote_address", "10.0.0.2"), PUBLIC[2])) == 4


@pytest.mark.parametrize("which", ["gateway", "reference"])
def test_a_bad_file_keeps_the_old_limits_and_logs_file_and_line(
    files: tuple[Path, Path], which: str, caplog: pytest.LogCaptureFixture
) -> None:
    gateway, edge = files
    watched, limiter = loaded(gateway)
    if which == "gateway":
        write(gateway, GATEWAY.format(requests=-1))
        expected = f"{gateway}:10: apis[0].limits[0].requests: input should be greater than or equal to 0"
    else:
        write(edge, "domain: edge\ndescriptors:\n  - key: user\n    rate_limit: {unit: fortnight}\n")
        expected = (
            f"{edge}:4: descriptors[0].rate_limit.unit: unknown unit 'fortnight' "
            "(known: second, minute, hour, day, week, month, year)"
        )
    with caplog.at_level(logging.INFO, "ratelimit.reload"):
        assert not watched.reload(limiter, "test")
    (record,) = caplog.records
    assert record.levelname == "ERROR"
    assert record.fields["error"] == expected  # type: ignore[attr-defined]
    assert record.exc_info is None
    assert admitted(limiter, "edge", (("user", "w"),)) == 1  # the old limits are in force
    assert not watched.changed()  # one bad save is reported once
    write(gateway, GATEWAY.format(requests=2))
    write(edge, EDGE.format(requests=2))
    assert watched.reload(limiter, "fixed")
    assert admitted(limiter, "edge", (("user", "x"),)) == 2


def test_a_bad_reference_file_at_start_is_a_config_error(files: tuple[Path, Path]) -> None:
    gateway, edge = files
    edge.unlink()
    with pytest.raises(ConfigError, match=r"edge\.yaml: cannot read: No such file or directory$"):
        LimitsFiles(gateway, config.load(gateway)).load()


def test_watch_reloads_on_change(files: tuple[Path, Path]) -> None:
    gateway, edge = files
    watched, limiter = loaded(gateway)

    async def go() -> int:
        task = asyncio.create_task(watched.watch(limiter, interval=0.01))
        write(edge, EDGE.format(requests=4))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not watched.changed():
                break
        task.cancel()
        req = Request("edge", (Descriptor((("user", "y"),)),))
        return sum([(await limiter.decide(req)).ok for _ in range(6)])

    assert asyncio.run(go()) == 4
