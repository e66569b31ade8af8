"""How many ext_authz ``Check`` calls one authz worker answers from its key cache, and the CPU each costs.

    .venv/bin/python -m bench.authz_bench [--iterations N] [--seconds S] [--concurrency C]

(a) in-process: the real ``Authorization`` servicer over a ``KeyCache`` over a ``SqliteKeyStore`` in a
    temp dir, awaited directly on pre-built ``CheckRequest`` protos; CPU from ``time.process_time``
    (denials are logged as in the server, as JSON lines, to /dev/null).
(b) over gRPC: ``python -m authz --workers 1`` on loopback, driven by one grpc.aio client process at
    a fixed concurrency; the server's CPU (every thread: user + system) from ``/proc/<pid>/stat``.
    On a small machine the client competes with the server for cores: read calls/s with the
    server's CPU busy share printed under the table, and µs/call as the server's real cost.

Every record is in the cache before measuring (long TTLs), so this is the hot path: parse the
request, find the credential, one dict lookup, one HMAC, the decision, the response proto.
Loopback only, bounded (< 30 s with the defaults); it starts one server and stops it by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.checker import Checker
from authz.keycache import KeyCache
from authz.keyservice import KeyService
from authz.keystore import SqliteKeyStore
from authz.servicer import Authorization
from authz.verifiers.apikey import ApiKeyVerifier
from sidegate import config, logs

ROOT = Path(__file__).resolve().parent.parent
PEPPER = "bench-pepper-not-a-secret"
CONFIG = """
listeners: [{name: http, port: 8080}]
services: {echo: {endpoints: ["127.0.0.1:9000"]}}
api_keys: {cache_ttl: 1h, negative_cache_ttl: 1h}
apis:
  - name: orders
    match: {prefix: /orders}
    service: echo
    auth: {api_key: true, scopes: {GET: [orders:read], POST: [orders:write]}}
"""
UNKNOWN_KEY = "sg_live_aaaaaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"  # well formed, never issued


@dataclass
class Row:
    scenario: str
    calls: int
    seconds: float  # wall
    cpu: float  # seconds of CPU spent by whoever answers the calls

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.calls * 1e6


def check_request(key: str | None, method: str = "GET") -> Any:
    request = external_auth_pb2.CheckRequest()
    request.attributes.context_extensions["api"] = "orders"
    http = request.attributes.request.http
    http.method = method
    http.path = "/orders/42?page=1"
    http.id = "1234567890"
    http.headers.update({":authority": "api.example.com", "user-agent": "bench/1.0", "x-request-id": "r-1"})
    if key is not None:
        http.headers["x-api-key"] = key
    return request


def requests(key: str) -> dict[str, tuple[Any, str]]:
    """Scenario → (request, what the answer must be: ok or the denial's HTTP status)."""
    return {
        "allow (cache hit)": (check_request(key), "ok"),
        "401 unknown key (negative cache)": (check_request(UNKNOWN_KEY), "401"),
        "401 no key": (check_request(None), "401"),
        "403 missing scope": (check_request(key, "POST"), "403"),
    }


def outcome(reply: Any) -> str:
    return "ok" if reply.HasField("ok_response") else str(reply.denied_response.status.code)


async def issue_key(db: Path) -> str:
    store = SqliteKeyStore(db)
    try:
        service = KeyService(store, PEPPER.encode(), config.parse(CONFIG).api_keys, time.time)
        new = await service.create(consumer="bench", scopes=["orders:read"], actor="bench", plan="gold")
        return new.key
    finally:
        await store.close()


# --- (a) in-process ------------------------------------------------------------------------


async def in_process(db: Path, key: str, iterations: int) -> list[Row]:
    gateway = config.parse(CONFIG)
    store = SqliteKeyStore(db)
    policy = gateway.api_keys
    cache = KeyCache(store, time.time, ttl=policy.cache_ttl, negative_ttl=policy.negative_cache_ttl)
    verifier = ApiKeyVerifier(cache, PEPPER.encode(), policy, time.time)
    servicer = Authorization(Checker(gateway, [verifier], time.time))
    rows = []
    try:
        for scenario, (request, expected) in requests(key).items():
            for _ in range(200):  # warm: the record (or its absence) is cached now
                reply = await servicer.Check(request, None)  # type: ignore[arg-type]  # context: only for aborts
            assert outcome(reply) == expected, (scenario, outcome(reply))
            misses = cache.misses
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(iterations):
                await servicer.Check(request, None)  # type: ignore[arg-type]
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            assert cache.misses == misses, f"{scenario}: the store was asked while measuring"
            rows.append(Row(f"in-process  {scenario}", iterations, wall, cpu))
    finally:
        await store.close()
    return rows


# --- (b) over gRPC ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted after "(comm)"
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def authz_server(state: Path, cfg: Path) -> Iterator[tuple[int, int]]:
    """``python -m authz`` with one worker on a free loopback port: ``(pid, port)``."""
    port = free_port()
    argv = [sys.executable, "-m", "authz", "--config", str(cfg), "--port", str(port), "--workers", "1"]
    argv += ["--state-dir", str(state), "--admin-port", "0", "--log-level", "info"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDEGATE_")} | {"SIDEGATE_KEY_PEPPER": PEPPER}
    with (state / "authz.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 20
        while not serving(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"authz did not start: {(state / 'authz.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield proc.pid, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serving(port: int) -> bool:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def drive(stub: Any, request: Any, expected: str, seconds: float, concurrency: int) -> int:
    """Calls answered in ``seconds`` by ``concurrency`` callers, each checking the answer."""
    deadline = time.monotonic() + seconds
    counts = [0] * concurrency

    async def caller(slot: int) -> None:
        while time.monotonic() < deadline:
            reply = await stub.Check(request, timeout=5)
            if outcome(reply) != expected:
                raise AssertionError(f"expected {expected}, got {outcome(reply)}")
            counts[slot] += 1

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return sum(counts)


async def over_grpc(pid: int, port: int, key: str, seconds: float, concurrency: int) -> tuple[list[Row], list[str]]:
    rows, notes = [], []
    scenarios = requests(key)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for scenario in ("allow (cache hit)", "401 unknown key (negative cache)"):
            request, expected = scenarios[scenario]
            await drive(stub, request, expected, 0.5, concurrency)  # warm: connection, cache, JIT-free Python
            server, client = cpu_seconds(pid), time.process_time()
            wall = time.perf_counter()
            calls = await drive(stub, request, expected, seconds, concurrency)
            wall = time.perf_counter() - wall
            server, client = cpu_seconds(pid) - server, time.process_time() - client
            rows.append(Row(f"gRPC c={concurrency}  {scenario}", calls, wall, server))
            notes.append(
                f"gRPC {scenario}: server CPU busy {server / wall:.0%} of one core; "
                f"client {client / calls * 1e6:.0f} µs CPU per call"
            )
    return rows, notes


# --- the table ---------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    head = f"{'scenario':<48} {'calls':>9} {'calls/s':>10} {'CPU µs/call':>12}"
    lines = [head, "-" * len(head)]
    lines += [f"{r.scenario:<48} {r.calls:>9} {r.rate:>10,.0f} {r.cpu_us:>12.1f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.authz_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000, help="in-process calls per scenario")
    parser.add_argument("--seconds", type=float, default=3.0, help="gRPC measurement per scenario")
    parser.add_argument("--concurrency", type=int, default=32, help="gRPC calls in flight")
    args = parser.parse_args(argv)
    logs.setup("authz", "info")  # denials are logged in the server too: pay the same formatting
    null = open(os.devnull, "w")  # noqa: SIM115 - held for the run, closed below
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(null)
    try:
        with tempfile.TemporaryDirectory(prefix="authz-bench-") as tmp:
            state = Path(tmp)
            cfg = state / "gateway.yaml"
            cfg.write_text(CONFIG)
            key = asyncio.run(issue_key(state / "keys.db"))
            rows = asyncio.run(in_process(state / "keys.db", key, args.iterations))
            with authz_server(state, cfg) as (pid, port):
                grpc_rows, notes = asyncio.run(over_grpc(pid, port, key, args.seconds, args.concurrency))
    finally:
        null.close()
    rows += grpc_rows
    print(f"authz Check, one worker, answers from the key cache ({sys.implementation.name} {sys.version.split()[0]})")
    print(table(rows))
    for note in notes:
        print(note)
    allow = next(r for r in rows if r.scenario.startswith("gRPC") and "allow" in r.scenario)
    print(f"one worker's ceiling for allows over gRPC ≈ {1e6 / allow.cpu_us:,.0f} calls/s (1 core / CPU µs per call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
