"""Rate-limit service benchmark: decisions per second of one worker and Python CPU per decision.

Two ways in, each printed as a table:

* ``direct`` — ``RateLimitService.ShouldRateLimit`` called in-process with real protos (proto →
  domain → limiter → store → proto), ``--concurrency`` calls in flight, CPU measured with
  ``time.process_time`` around the batch. The only way to switch the over-limit cache off.
* ``grpc`` — a real ``sidegate serve --sidecars ratelimit --workers 1`` process driven by a
  grpc.aio client over loopback; the server's CPU is read from ``/proc/PID/stat``.

Traffic is ``under`` (a huge limit: every decision reaches the store), ``over`` (limit 1 on one
key: every decision is a refusal, which the over-limit cache answers without Redis), ``none``
(a domain without limits: the floor of gRPC and proto handling, no limiter work) or ``ref`` (a
domain of a reference-format file, counted as envoyproxy/ratelimit counts: every decision
reaches the store).

    .venv/bin/python bench/ratelimit_bench.py                  # starts its own redis-server
    .venv/bin/python bench/ratelimit_bench.py --requests 20000 --concurrency 64 --redis redis://…
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvloop
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratelimit import limits, reference, servicer  # noqa: E402 - after the path is set
from ratelimit.limiter import Limiter  # noqa: E402
from ratelimit.store import MemoryStore, RedisStore, Store  # noqa: E402
from sidegate import config  # noqa: E402

GATEWAY = """\
listeners: [{{name: http, port: 8080}}]
sidecars:
  ratelimit: {{address: "127.0.0.1:{port}", timeout: 1s}}
services: {{echo: {{endpoints: ["127.0.0.1:9080"]}}}}
ratelimit: {{redis_timeout: 500ms}}
apis:
  - name: under
    match: {{prefix: /under}}
    service: echo
    auth: {{anonymous: true}}
    limits: [{{by: ip, requests: 1000000000, window: 1h}}]
  - name: over
    match: {{prefix: /over}}
    service: echo
    auth: {{anonymous: true}}
    limits: [{{by: ip, requests: 1, window: 1h}}]
"""
IPS = 1_000  # distinct client addresses of the "under" and "ref" traffic
REFERENCE = """\
domain: bench
descriptors:
  - key: remote_address
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
"""


@dataclass
class Row:
    mode: str
    store: str
    traffic: str
    cache: str
    decisions: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.decisions / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.decisions * 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(traffic: str, i: int) -> Any:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    address = f"10.0.{i % IPS // 256}.{i % 256}" if traffic in ("under", "ref") else "10.9.9.9"
    if traffic == "ref":
        return rls_pb2.RateLimitRequest(
            domain="bench",
            descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry(key="remote_address", value=address)])],
        )
    return rls_pb2.RateLimitRequest(
        domain="nobody" if traffic == "none" else "sidegate",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[
                    entry(key="api", value=traffic),
                    entry(key="remote_address", value=address),
                    entry(key="method", value="GET"),
                ]
            )
        ],
    )


# --- direct -------------------------------------------------------------------------------


async def direct(store_kind: str, traffic: str, *, cache: bool, redis_url: str, total: int, concurrency: int) -> Row:
    gateway = config.parse(GATEWAY.format(port=9001))
    store: Store = RedisStore(redis_url, timeout=0.5) if store_kind == "redis" else MemoryStore()
    domains = dict([reference.parse(REFERENCE, "bench.yaml")])
    made = limits.from_gateway(gateway, domains)
    service = servicer.RateLimitService(Limiter(made, store, time.time, over_limit_cache=cache))
    messages = [request(traffic, i) for i in range(total)]
    warm = [service.ShouldRateLimit(m, None) for m in messages[: min(total, 500)]]
    await asyncio.gather(*warm)

    async def worker(offset: int) -> None:
        for i in range(offset, total, concurrency):
            await service.ShouldRateLimit(messages[i], None)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await store.close()
    return Row("direct", store_kind, traffic, "on" if cache else "off", total, wall, cpu)


# --- through a real gRPC server -----------------------------------------------------------


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, traffic: str, total: int, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        messages = [request(traffic, i) for i in range(total)]
        await asyncio.gather(*(stub.ShouldRateLimit(m) for m in messages[:200]))

        async def worker(offset: int) -> None:
            for i in range(offset, total, concurrency):
                await stub.ShouldRateLimit(messages[i], timeout=10)

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return time.perf_counter() - start


def through_grpc(store_kind: str, traffic: str, *, redis_url: str, total: int, concurrency: int, work: Path) -> Row:
    port = free_port()
    path = work / f"gateway-{port}.yaml"
    path.write_text(GATEWAY.format(port=port))
    argv = [sys.executable, "-m", "sidegate", "serve", "--sidecars", "ratelimit", "--config", str(path)]
    argv += ["--port", str(port), "--workers", "1", "--log-level", "warning", "--state-dir", str(work / "state")]
    if store_kind == "redis":
        argv += ["--redis", redis_url]
    with (work / f"server-{port}.log").open("ab") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"server did not start: see {work}") from None
                time.sleep(0.05)
        before = cpu_of(proc.pid)
        wall = asyncio.run(drive(port, traffic, total, concurrency))
        cpu = cpu_of(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(15)
    return Row("grpc", store_kind, traffic, "on", total, wall, cpu)


# --- main ---------------------------------------------------------------------------------


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH: install it or pass --redis URL")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*argv, "--logfile", str(work / "redis.log")])
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="decisions per row (default 20000)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (default 64)")
    parser.add_argument("--redis", help="Redis URL (default: a redis-server of its own on a free port)")
    parser.add_argument("--skip-grpc", action="store_true", help="only the in-process rows")
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        work = Path(tmp)
        redis_proc, url = (None, args.redis) if args.redis else start_redis(work)
        try:
            rows = [
                asyncio.run(
                    direct(
                        store, traffic, cache=cache, redis_url=url, total=args.requests, concurrency=args.concurrency
                    )
                )
                for store, traffic, cache in [
                    ("memory", "under", True),
                    ("memory", "over", True),
                    ("memory", "over", False),
                    ("redis", "under", True),
                    ("redis", "over", True),
                    ("redis", "over", False),
                    ("memory", "ref", True),
                    ("redis", "ref", True),
                ]
            ]
            if not args.skip_grpc:
                rows += [
                    through_grpc(
                        store, traffic, redis_url=url, total=args.requests, concurrency=args.concurrency, work=work
                    )
                    for store, traffic in [
                        ("memory", "none"),
                        ("memory", "under"),
                        ("redis", "under"),
                        ("redis", "over"),
                    ]
                ]
        finally:
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(10)
    print(f"{os.cpu_count()} CPUs, {args.requests} decisions per row, {args.concurrency} in flight\n")
    print(f"{'mode':<7} {'store':<7} {'traffic':<8} {'cache':<6} {'decisions/s':>12} {'CPU µs/decision':>16}")
    print("-" * 60)
    for row in rows:
        print(f"{row.mode:<7} {row.store:<7} {row.traffic:<8} {row.cache:<6} {row.rate:>12,.0f} {row.cpu_us:>16,.1f}")
    print("\ndirect: CPU of this process (servicer + limiter + store client); grpc: CPU of the server process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
