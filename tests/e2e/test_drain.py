"""Graceful drain: SIGTERM to one of two authz replicas under a burst loses no request.

The replicas are two sidecar servers on their own ports, both endpoints of Envoy's authz
cluster, as two pods would be. Every request in the burst needs an authz callout; each must
get authz's own answer (401), never Envoy's "authz unavailable" (503). The victim drains as
in production: it reports NOT_SERVING for ``DRAIN`` seconds, so Envoy's health checks take
it out of the pool, then stops accepting and lets in-flight calls finish.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx

from tests.conftest import LOGS, free_port
from tests.e2e.conftest import new_gateway

BURST = 2000
CONCURRENCY = 24
DRAIN = 3.0  # > Envoy's sidecar health check: interval 1s times unhealthy threshold 2
TEMPLATE = Path(__file__).with_name("gateway.yaml")


async def _burst(base_url: str, on_progress: int, progress: asyncio.Event) -> Counter[int]:
    statuses: Counter[int] = Counter()
    queue = iter(range(BURST))
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, limits=limits) as client:

        async def worker() -> None:
            for _ in queue:
                reply = await client.get("/orders/1")
                statuses[reply.status_code] += 1
                if sum(statuses.values()) >= on_progress:
                    progress.set()
                await asyncio.sleep(0.002)  # spread the burst over the drain

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


def test_sigterm_to_one_of_two_replicas_under_burst_loses_no_request(tmp_path: Path) -> None:
    replica = free_port()
    template = tmp_path / "template.yaml"
    template.write_text(
        TEMPLATE.read_text().replace(
            'authz: {address: "127.0.0.1:$sidecars", timeout: 1s}',
            f'authz: {{address: "127.0.0.1:$sidecars", replicas: ["127.0.0.1:{replica}"], timeout: 1s}}',
        )
    )
    gateway = new_gateway(tmp_path, template)
    stack = gateway.stack
    stack.settings = replace(stack.settings, drain=DRAIN)
    with stack.running():
        LOGS.extend(c.log_path for c in stack.children if c.log_path)
        victim = stack.child(f"sidecars@{replica}")

        async def scenario() -> Counter[int]:
            progress = asyncio.Event()
            burst = asyncio.create_task(_burst(f"http://127.0.0.1:{gateway.ports['http']}", BURST // 5, progress))
            await progress.wait()
            victim.signal(signal.SIGTERM)
            return await burst

        statuses = asyncio.run(scenario())
        text = httpx.get(f"http://127.0.0.1:{gateway.ports['admin']}/stats?filter=sidegate_authz|ext_authz").text
        (tmp_path / "envoy-stats.txt").write_text(text)  # for a person reading a failure
        assert statuses == Counter({401: BURST}), f"{statuses}; Envoy stats in {tmp_path}/envoy-stats.txt"
        assert victim.proc is not None
        assert victim.proc.wait(10) == 0, "the drained replica must exit cleanly"
        assert '"msg":"stopped"' in victim.tail(5)
