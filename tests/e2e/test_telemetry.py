"""Observability through real Envoy: one trace holds Envoy's span and authz's decision span, and
the sidecars' Prometheus endpoint counts decisions as traffic flows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import TEMPLATE, Collector, Gateway, new_gateway, start


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, collector: tuple[Collector, int]) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("telemetry")
    template = workdir / "template.yaml"
    template.write_text(TEMPLATE.read_text() + f'telemetry: {{otlp: "127.0.0.1:{collector[1]}", sampling: 100}}\n')
    running = new_gateway(workdir, template)
    running.stack.settings = replace(running.stack.settings, workers=2, metrics_port=free_port())
    start(running.stack)
    try:
        yield running
    finally:
        running.stack.stop()


def test_envoy_and_authz_spans_share_one_trace(observed: Gateway, collector: tuple[Collector, int]) -> None:
    receiver, _ = collector
    with httpx.Client(base_url=f"http://127.0.0.1:{observed.ports['http']}") as client:
        assert client.get("/orders/1").status_code == 401
    deadline = time.monotonic() + 15  # Envoy flushes its spans every 5 s
    joined: set[bytes] = set()
    while time.monotonic() < deadline and not joined:
        with receiver.lock:
            envoy = {s.trace_id for service, s in receiver.spans if service == "sidegate-envoy"}
            authz = {s.trace_id: s for service, s in receiver.spans if service.startswith("sidegate-authz")}
        joined = envoy & set(authz)
        time.sleep(0.2)
    assert joined, f"no common trace; services seen: {sorted({svc for svc, _ in receiver.spans})}"
    trace = next(iter(joined))
    span = authz[trace]
    attributes = {a.key: a.value.string_value for a in span.attributes}
    assert span.name == "authz.check"
    assert attributes["sidegate.outcome"] == "deny"
    assert attributes["sidegate.reason"] == "api_key_missing"
    sidecar_log = next(c for c in observed.stack.children if c.name.startswith("sidecars@")).tail(400)
    assert f'"trace_id":"{trace.hex()}"' in sidecar_log  # the denial's log line names its trace


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_counts_decisions_across_workers(observed: Gateway) -> None:
    metrics = f"http://127.0.0.1:{observed.stack.settings.metrics_port}/metrics"
    before = _metric(httpx.get(metrics).text, "sidegate_decisions_total", sidecar="authz", reason="api_key_missing")
    with httpx.Client(base_url=f"http://127.0.0.1:{observed.ports['http']}") as client:
        for _ in range(20):
            assert client.get("/orders/1").status_code == 401
    text = httpx.get(metrics).text
    after = _metric(text, "sidegate_decisions_total", sidecar="authz", outcome="deny", reason="api_key_missing")
    assert after - before == 20
    assert _metric(text, "sidegate_decision_duration_seconds_count", sidecar="authz") >= 20
