"""Graceful drain: SIGTERM to one of two sidecar replicas under a burst loses no request.

Both replicas serve one port (SO_REUSEPORT), as worker processes do. Every request in the
burst needs an authz callout; each must get authz's own answer (401), never Envoy's
"authz unavailable" (503).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from sidegate.stack import grpc_serving
from tests.conftest import LOGS, wait_until
from tests.e2e.conftest import new_gateway

BURST = 1500
CONCURRENCY = 24


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

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


@pytest.mark.parametrize("workers", [1])
def test_sigterm_to_a_replica_under_burst_loses_no_request(tmp_path: Path, workers: int) -> None:
    gateway = new_gateway(tmp_path)
    stack = gateway.stack
    address = f"127.0.0.1:{gateway.ports['sidecars']}"
    replica_log = tmp_path / "logs" / "replica.log"
    with stack.running():
        LOGS.extend(c.log_path for c in stack.children if c.log_path)
        LOGS.append(replica_log)
        argv = [
            sys.executable,
            "-m",
            "sidegate",
            "serve",
            "--config",
            str(stack.config_path),
            "--port",
            str(gateway.ports["sidecars"]),
            "--workers",
            str(workers),
            "--grace",
            "5",
            "--state-dir",
            str(stack.state_dir),
            "--admin-port",
            "0",
        ]
        with replica_log.open("ab") as log:
            replica = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "serving" in replica_log.read_text(), what="second replica")
            assert grpc_serving(address)
            victim = stack.child("sidecar-authz+ratelimit+extproc")

            async def scenario() -> Counter[int]:
                progress = asyncio.Event()
                burst = asyncio.create_task(_burst(f"http://127.0.0.1:{gateway.ports['http']}", BURST // 3, progress))
                await progress.wait()
                victim.signal(signal.SIGTERM)
                return await burst

            statuses = asyncio.run(scenario())
            assert statuses == Counter({401: BURST}), statuses
            assert victim.proc is not None
            assert victim.proc.wait(10) == 0, "the drained replica must exit cleanly"
            assert "stopped" in victim.tail(5)
        finally:
            replica.terminate()
            replica.wait(10)
