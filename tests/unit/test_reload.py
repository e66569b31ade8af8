"""The kernel's one reload path: an edit of gateway.yaml or of a file it names is one reload of
every sidecar, or of none when anything is bad (logged with FILE:LINE, once)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from ratelimit.limiter import Limiter
from ratelimit.limits import Descriptor, Request
from ratelimit.servicer import RateLimitSidecar
from sidegate import config, grpc_h2c, server
from sidegate.config import Gateway
from sidegate.errors import ConfigError
from sidegate.settings import Settings

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
PUBLIC = (("api", "public"), ("remote_address", "10.0.0.1"), ("method", "GET"))


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


class Refuses:
    """A sidecar whose own check refuses every new config (as extproc does bad descriptors)."""

    service = "test.Refuses"

    def __init__(self) -> None:
        self.reloads = 0

    def files(self, gateway: Gateway) -> list[Path]:
        return []

    def check(self, gateway: Gateway) -> None:
        raise ConfigError("descriptors.pb", 3, "apis[0].translate.grpc", "not a descriptor set")

    async def start(self, server: grpc_h2c.Server, gateway: Gateway) -> None:
        return None

    def reload(self, gateway: Gateway) -> None:
        self.reloads += 1

    async def close(self) -> None:
        return None


async def started(path: Path, *extra: server.Sidecar) -> tuple[server.Reloader, Limiter, RateLimitSidecar]:
    gateway = config.load(path)
    ratelimit = RateLimitSidecar(Settings(config=path, workers=1))
    await ratelimit.start(grpc_h2c.Server(), gateway)
    settings = Settings(config=path, workers=1)
    return server.Reloader(settings, gateway, [ratelimit, *extra]), ratelimit.runner.limiter, ratelimit


async def admitted(limiter: Limiter, domain: str, entries: tuple[tuple[str, str], ...], tries: int = 5) -> int:
    request = Request(domain, (Descriptor(entries),))
    return sum([(await limiter.decide(request)).ok for _ in range(tries)])


def test_reference_configs_are_read_relative_to_gateway_yaml_and_watched(files: tuple[Path, Path]) -> None:
    async def go() -> None:
        reloader, limiter, ratelimit = await started(files[0])
        assert await admitted(limiter, "sidegate", PUBLIC) == 2
        assert await admitted(limiter, "edge", (("user", "u"),)) == 1
        assert set(reloader.watch.paths) == set(files)
        await ratelimit.close()

    asyncio.run(go())


@pytest.mark.parametrize("edited", ["gateway", "reference", "both"])
def test_an_edit_is_one_reload_whichever_file_it_touched(
    files: tuple[Path, Path], edited: str, caplog: pytest.LogCaptureFixture
) -> None:
    gateway, edge = files

    async def go() -> None:
        reloader, limiter, ratelimit = await started(gateway)
        assert not reloader.watch.changed()
        if edited in ("reference", "both"):
            write(edge, EDGE.format(requests=3))
        if edited in ("gateway", "both"):
            write(gateway, GATEWAY.format(requests=4))
        assert reloader.watch.changed()
        with caplog.at_level(logging.INFO, "sidegate.server"):
            assert reloader.reload("test")
        assert not reloader.watch.changed()
        assert [r.message for r in caplog.records].count("config reloaded") == 1
        assert await admitted(limiter, "edge", (("user", "v"),)) == (3 if edited != "gateway" else 1)
        other = (*PUBLIC[:1], ("remote_address", "10.0.0.2"), PUBLIC[2])
        assert await admitted(limiter, "sidegate", other) == (4 if edited != "reference" else 2)
        await ratelimit.close()

    asyncio.run(go())


@pytest.mark.parametrize("which", ["gateway", "reference"])
def test_a_bad_file_keeps_the_old_config_and_logs_file_and_line_once(
    files: tuple[Path, Path], which: str, caplog: pytest.LogCaptureFixture
) -> None:
    gateway, edge = files
    if which == "gateway":
        expected = f"{gateway}:10: apis[0].limits[0].requests: input should be greater than or equal to 0"
    else:
        expected = (
            f"{edge}:4: descriptors[0].rate_limit.unit: unknown unit 'fortnight' "
            "(known: second, minute, hour, day, week, month, year)"
        )

    async def go() -> None:
        reloader, limiter, ratelimit = await started(gateway)
        if which == "gateway":
            write(gateway, GATEWAY.format(requests=-1))
        else:
            write(edge, "domain: edge\ndescriptors:\n  - key: user\n    rate_limit: {unit: fortnight}\n")
        with caplog.at_level(logging.INFO, "sidegate.server"):
            assert not reloader.reload("test")
        (record,) = caplog.records
        assert record.levelname == "ERROR"
        assert record.fields["error"] == expected  # type: ignore[attr-defined]
        assert record.exc_info is None
        assert await admitted(limiter, "edge", (("user", "w"),)) == 1  # the old limits are in force
        assert not reloader.watch.changed()  # one bad save is reported once
        write(gateway, GATEWAY.format(requests=2))
        write(edge, EDGE.format(requests=2))
        assert reloader.reload("fixed")
        assert await admitted(limiter, "edge", (("user", "x"),)) == 2
        await ratelimit.close()

    asyncio.run(go())


def test_when_one_sidecar_refuses_a_config_no_sidecar_reloads(files: tuple[Path, Path]) -> None:
    gateway, edge = files

    async def go() -> None:
        refuses = Refuses()
        reloader, limiter, ratelimit = await started(gateway, refuses)
        write(edge, EDGE.format(requests=3))
        assert not reloader.reload("test")
        assert refuses.reloads == 0
        assert await admitted(limiter, "edge", (("user", "v"),)) == 1  # ratelimit kept its limits
        await ratelimit.close()

    asyncio.run(go())


def test_a_bad_reference_file_at_start_is_a_config_error(files: tuple[Path, Path]) -> None:
    gateway, edge = files
    edge.unlink()
    with pytest.raises(ConfigError, match=r"edge\.yaml: cannot read: No such file or directory$"):
        RateLimitSidecar(Settings(config=gateway)).check(config.load(gateway))


def test_the_watch_loop_reloads_on_an_edit(files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    gateway, edge = files
    monkeypatch.setattr(server, "POLL_INTERVAL", 0.01)

    async def go() -> int:
        reloader, limiter, ratelimit = await started(gateway)
        task = asyncio.create_task(reloader.run())
        write(edge, EDGE.format(requests=4))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not reloader.watch.changed():
                break
        task.cancel()
        result = await admitted(limiter, "edge", (("user", "y"),), tries=6)
        await ratelimit.close()
        return result

    assert asyncio.run(go()) == 4


def test_the_local_fallback_is_shared_by_every_worker_of_every_replica(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(
        path,
        GATEWAY.format(requests=2).replace("  reference_configs: [limits/edge.yaml]\n", "  expected_replicas: 3\n"),
    )
    gateway = config.load(path)
    assert RateLimitSidecar(Settings(config=path, workers=4)).runner.local_processes(gateway) == 12
    assert RateLimitSidecar(Settings(config=path, workers=1)).runner.local_processes(gateway) == 3
