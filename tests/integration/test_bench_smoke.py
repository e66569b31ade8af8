"""The load-test harness end to end, tiny: one scenario for ~1.5 s per phase through the real code.

``bench.harness.run`` starts Envoy, the sidecar server and the stub upstream, issues an API key,
drives h2load and the constant-rate driver, reads CPU from /proc and writes the report. This
checks the report's shape and that its numbers are sane; it asserts no speed (the harness
measures, tests do not). h2load comes from Debian's nghttp2-client: the harness installs it when
it is missing and it can (root), and otherwise this fails saying how to install it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import harness, report
from bench.load import BenchError
from sidegate import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(output: Path, scenarios: tuple[str, ...], **overrides: Any) -> harness.Options:
    """A run of a second or two per phase, a few connections, one Envoy thread: the harness
    end to end, measuring nothing."""
    settings: dict[str, Any] = {
        "seconds": 1.5,
        "warmup": 0.5,
        "connections": 4,
        "rate": 200,
        "rate_connections": 4,
        "envoy_concurrency": 1,
        "workers": 1,
    }
    return harness.Options(output=output, scenarios=scenarios, quiet=True, **(settings | overrides))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    output = tmp_path_factory.mktemp("bench")
    options = tiny(output, ("authz", "rest-grpc-envoy"))
    try:
        doc = harness.run(options, "pytest")
    except BenchError as exc:
        pytest.fail(f"the bench harness could not run: {exc}")
    return doc, output


def test_sidegate_bench_finds_the_harness_in_the_source_tree(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "--help"])
    assert exited.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The authz scenario under two layouts in one run: one TCP port, and a Unix socket per worker."""
    options = tiny(tmp_path_factory.mktemp("bench-layouts"), ("authz",), workers=2, layouts=("workers", "uds"))
    try:
        return harness.run(options, "pytest")
    except BenchError as exc:
        pytest.fail(f"the bench harness could not run: {exc}")


def test_layouts_run_side_by_side_with_each_workers_share(compared: dict[str, Any]) -> None:
    """TCP and Unix sockets in one table: on sockets Envoy has an endpoint per worker and its
    counters show each one's calls; on one TCP port it sees one endpoint for both workers."""
    assert compared["settings"]["sidecar_layouts"] == ["workers", "uds"]
    tcp, uds = compared["scenarios"]
    assert (tcp["name"], tcp["layout"], uds["name"], uds["layout"]) == ("authz", "workers", "authz", "uds")
    for row in (tcp, uds):
        sat = row["saturation"]
        assert len(sat["sidecar_workers_cpu_seconds"]) == 2, sat
        assert 0.5 <= sat["busiest_worker_cpu_share"] <= 1.0
    sockets = uds["saturation"]["calls_by_endpoint"]
    assert len(sockets) == 2, sockets
    assert all(where.startswith("unix:") and where.endswith((f"-{n}.sock",)) for n, where in enumerate(sorted(sockets)))
    assert sum(sockets.values()) >= uds["saturation"]["requests"] * 0.9  # one authz call per request
    assert 0.5 <= uds["saturation"]["busiest_endpoint_calls_share"] <= 1.0
    [port] = tcp["saturation"]["calls_by_endpoint"]
    assert not port.startswith("unix:")
    assert tcp["saturation"]["busiest_endpoint_calls_share"] is None  # one endpoint: Envoy cannot tell
    report.add_ratios(compared)  # each layout's row gets its ratios, not only the first
    assert tcp.keys() >= {"ratio_to_bare", "ratio_to_native"}
    assert uds.keys() >= {"ratio_to_bare", "ratio_to_native"}
    table = report.table(compared)
    assert "| busiest worker |" in table.splitlines()[0]
    rows = [line.split(" | ")[0] for line in table.splitlines()[2:4]]
    assert rows == ["| authz [tcp]", "| authz [uds]"]
    assert "(calls " in table.splitlines()[3]


def test_report_has_every_field_with_sane_numbers(run: tuple[dict[str, Any], Path]) -> None:
    doc, _ = run
    assert doc["settings"]["envoy_concurrency"] == 1
    assert doc["machine"]["cpus"] >= 1
    scenario, native = doc["scenarios"]
    assert scenario["name"] == "authz"
    assert scenario["skipped"] is None
    saturation, fixed = scenario["saturation"], scenario["fixed_rate"]
    for phase in (saturation, fixed):
        assert phase["rps"] > 0
        assert phase["requests"] > 0
        assert phase["errors"] == {}, phase["errors"]
        assert set(phase["statuses"]) == {"200"}
        latency = phase["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99_9"] <= latency["max"]
        cpu = phase["cpu_us_per_request"]
        assert set(cpu) == {"envoy", "sidecars", "redis", "upstream", "loadgen"}
        assert cpu["envoy"] > 0
        assert cpu["sidecars"] > 0
        assert cpu["redis"] == 0  # this scenario has no Redis
        # Every request went through authz once, and never through ext_proc or the rate limiter.
        calls = phase["callouts_per_request"]
        assert 0.9 <= calls["authz"] <= 1.1, calls
        assert calls["extproc"] == 0
        assert calls["ratelimit"] == 0
        assert len(phase["sidecar_processes_cpu_seconds"]) >= 1
        assert 0 <= phase["background_cpu_percent"] <= 100
    assert fixed["offered_rps"] == 200
    assert fixed["rps"] > 100  # 200 req/s offered for 1.5 s to a gateway that does thousands
    assert scenario["ratio_to_bare"] is None  # no baseline in this run
    # REST → gRPC in Envoy's transcoder: a 200 per request, and no callout at all.
    assert native["name"] == "rest-grpc-envoy"
    for phase in (native["saturation"], native["fixed_rate"]):
        assert set(phase["statuses"]) == {"200"}
        assert phase["callouts_per_request"] == {"authz": 0, "ratelimit": 0, "extproc": 0}
        assert phase["cpu_us_per_request"]["upstream"] > 0  # the demo gRPC service answered
    targets = {t["target"]: t for t in doc["targets"]}
    assert targets["authz Python CPU (cache hit)"]["value"] == saturation["cpu_us_per_request"]["sidecars"]
    assert targets["full chain throughput"]["met"] is None  # not measured here


def test_files_are_written(run: tuple[dict[str, Any], Path]) -> None:
    doc, output = run
    assert json.loads((output / "results.json").read_text())["scenarios"][0]["name"] == "authz"
    table = (output / "results.md").read_text()
    assert "| authz |" in table
    assert report.table(doc).splitlines()[0].startswith("| scenario | req/s |")
    assert (output / "results.png").read_bytes().startswith(PNG_MAGIC)
    assert (output / "logs" / "authz" / "gateway.yaml").exists()
    assert (output / "logs" / "authz" / "bench-envoy.yaml").exists()


def test_nothing_is_left_running(run: tuple[dict[str, Any], Path]) -> None:
    _, output = run
    leftovers = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(output) in cmdline:
                leftovers.append(f"{entry.name}: {cmdline[:200]}")
    assert leftovers == []


def test_the_grpc_floor_bench_measures_a_real_server_and_stops_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.grpc_floor", "--calls", "2000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for layer in ("grpc.aio", "grpc_h2c"):  # both server layers, side by side
        found = re.search(layer + r"\s+2,000 calls\s+([\d,]+) calls/s\s+server CPU ([\d,]+) µs/call", done.stdout)
        assert found, done.stdout
        rate, cpu = found.groups()
        assert int(rate.replace(",", "")) > 0
        assert 1 <= int(cpu.replace(",", "")) < 100_000  # measured by the server, not made up


@pytest.fixture(scope="module")
def east_west(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    scenarios = ("east-west", "east-west-direct")
    options = tiny(tmp_path_factory.mktemp("bench-east-west"), scenarios, seconds=1.0, warmup=0.3, rate=100, workers=2)
    try:
        return harness.run(options, "pytest")
    except BenchError as exc:
        pytest.fail(f"the bench harness could not run the east-west scenarios: {exc}")


def test_east_west_goes_through_both_sidecar_envoys_and_is_compared_with_a_direct_call(
    east_west: dict[str, Any],
) -> None:
    mesh, direct = east_west["scenarios"]
    for scenario in (mesh, direct):
        for phase in (scenario["saturation"], scenario["fixed_rate"]):
            assert phase["errors"] == {}, phase["errors"]  # every call was a 200 (rbac allowed it)
            assert phase["requests"] > 0
    # Through the mesh, both sidecar Envoys worked; directly, there is no Envoy but the callee.
    assert mesh["saturation"]["cpu_us_per_request"]["envoy"] > 0
    assert direct["saturation"]["cpu_us_per_request"]["envoy"] == 0
    assert mesh["saturation"]["cpu_us_per_request"]["sidecars"] == 0  # no Python on the path
    assert mesh["ratio_to_direct"] == round(mesh["saturation"]["rps"] / direct["saturation"]["rps"], 3)
    text = report.east_west_text(east_west)
    assert text is not None
    assert f"{mesh['ratio_to_direct']:,.2f} of the direct call" in text
